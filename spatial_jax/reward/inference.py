"""SpatialScore inference: load a trained reward model, score images, export it.

The API GRPO uses in-process:

  scorer = SpatialScore.load("workdirs/reward")  # a training workdir or an export folder
  mu, sigma = scorer.score(images, prompts)      # numpy float32 (N,), one compiled program
  scorer.export("exports/spatial_score")

A *training workdir* (`spatial_jax.main` with a `reward_train` config) holds `config.json` and
`checkpoints/`: the model is rebuilt from the config exactly as it was trained
(`build.build`), and its trainable state is restored from the latest (or a given) checkpoint.

An *export folder* (`SpatialScore.export`) is self-describing:

  spatial_score.json     the job config (model + data sections), the `<reward>` token id, the
                         trainable mode, the base model source (`config.model.pretrained` or
                         "synthetic:<preset>"), the step. Written last: it marks a complete export.
  head.safetensors       `head.*` and `reward_embedding`, keyed by our nnx paths (fp32).
  adapter/               PEFT LoRA folder (transformers names), when trainable == "lora".
  backbone.safetensors   the backbone's non-LoRA parameters by our paths (relative to the
                         backbone, e.g. `language_model.layers.0.mlp.up_proj.kernel`), when they
                         cannot be re-read from a pretrained folder: trainable == "all", or the
                         synthetic world (its base is a random init). Real-world base weights are
                         never copied; `config.model.pretrained` is read again on load.
  tokenizer/             the tokenizer (`save_pretrained`); the synthetic world loads it from here.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx
from PIL import Image

from spatial_jax import checkpoint, fileio, hf, lora, metrics, sharding
from spatial_jax.data import pairs
from spatial_jax.models.qwen25vl import ModelInputs
from spatial_jax.models.qwen25vl import params as qwen_params
from spatial_jax.reward import build, evaluate
from spatial_jax.reward.build import input_shardings
from spatial_jax.reward.model import REWARD_TOKEN, trainable_filter

EXPORT_CONFIG = "spatial_score.json"
HEAD_FILE = "head.safetensors"
BACKBONE_FILE = "backbone.safetensors"
ADAPTER_DIR = "adapter"
TOKENIZER_DIR = "tokenizer"
EXPORT_FORMAT = "spatial_score"
EXPORT_VERSION = 1
PEFT_KEY_PREFIX = "base_model.model."
WORKDIR_CONFIG = "config.json"

# The backbone's own weights; LoRA adapters travel separately, in PEFT format.
_BASE_PARAMS = nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))


def base_model(config: Any) -> str:
  """Where the frozen base weights come from: a pretrained folder or the synthetic preset."""
  return config.model.pretrained or "synthetic:" + config.model.preset


def _exports_backbone(config: Any) -> bool:
  return not config.model.pretrained or config.model.trainable == "all"


class SpatialScore:
  """A SpatialScore model ready to score (image, prompt) pairs: `score(images, prompts)`.

  Build one with `load` (a training workdir or an export folder) or `from_config` (a freshly
  initialised model: the untrained baseline).

  Attributes:
    config: the job config the model was built from (model + data sections).
    model: the `SpatialScoreModel` (its arrays are shared with `trainable` / `frozen`).
    preparer: host-side `BatchPreparer` (images + prompts -> `ModelInputs`).
    tokenizer: the tokenizer, with `<reward>`.
    mesh, rules: the device mesh and logical sharding rules the model lives on.
    batch_size: sequences per compiled call (a multiple of the data-parallel size).
    image_size: side images are resized to (`config.data.image_size`), or None.
    step: the restored training step (None for a fresh model).
    source: the path the model was loaded from ("" for a fresh model).
  """

  def __init__(
    self,
    built: build.Built,
    config: Any,
    mesh: jax.sharding.Mesh,
    rules: sharding.Rules,
    *,
    batch_size: int | None = None,
    step: int | None = None,
    source: str = "",
  ):
    self.config = config
    self.model = built.model
    self.preparer = built.preparer
    self.tokenizer = built.tokenizer
    self.mesh, self.rules = mesh, rules
    self.step, self.source = step, source
    self.image_size = config.data.get("image_size") or None
    self._size_hw = pairs.image_size_hw(self.image_size)
    # Inputs are split over the data-parallel axes, so a chunk must divide evenly among them.
    batch_axes = sharding.logical_to_spec(("act_batch",), rules)[0] or ()
    batch_axes = (batch_axes,) if isinstance(batch_axes, str) else batch_axes
    self._data_parallel = int(np.prod([mesh.shape[a] for a in batch_axes]))
    self.batch_size = self._chunk_size(batch_size or 2 * config.eval.batch_size)
    graphdef, self.trainable, self.frozen = nnx.split(
      self.model, trainable_filter(config.model.trainable), ...
    )

    def score_fn(trainable, frozen, inputs):
      return nnx.merge(graphdef, trainable, frozen)(inputs)

    # Replicated outputs: N floats, readable on every process.
    self._score_fn = jax.jit(score_fn, out_shardings=sharding.named_sharding(mesh, (), rules))

  # -- Construction --------------------------------------------------------------------------

  @classmethod
  def load(
    cls,
    path: str | os.PathLike[str],
    *,
    mesh: jax.sharding.Mesh | None = None,
    step: int | None = None,
    batch_size: int | None = None,
  ) -> SpatialScore:
    """Loads a training workdir (`config.json` + `checkpoints/`) or an export folder.

    Args:
      path: the workdir of a `reward_train` run, or a folder written by `export`.
      mesh: the device mesh to place the model on (default: the config's `mesh`).
      step: the checkpoint step of a workdir (default: the latest).
      batch_size: sequences per compiled call (default: twice `config.eval.batch_size`).

    Raises:
      FileNotFoundError: `path` is neither kind of folder, or lacks a file it needs (named).
      checkpoint.CheckpointMismatchError: the checkpoint does not fit the model its config builds.
      ValueError: an export folder whose files do not fit the model (the file is named).
    """
    path = os.fspath(path)
    if os.path.isfile(os.path.join(path, EXPORT_CONFIG)):
      if step is not None:
        raise ValueError(f"step={step} applies to training workdirs; {path} is an export folder")
      return cls._load_export(path, mesh, batch_size)
    if os.path.isfile(os.path.join(path, WORKDIR_CONFIG)):
      return cls._load_workdir(path, mesh, step, batch_size)
    if not os.path.isdir(path):
      raise FileNotFoundError(f"SpatialScore model folder not found: {path}")
    raise FileNotFoundError(
      f"{path} is neither a training workdir ({WORKDIR_CONFIG} + checkpoints/, written by "
      f"`python -m spatial_jax.main` with a reward_train config) nor an export folder "
      f"({EXPORT_CONFIG}, written by SpatialScore.export)"
    )

  @classmethod
  def from_config(
    cls,
    config: Any,
    *,
    workdir: str | None = None,
    mesh: jax.sharding.Mesh | None = None,
    batch_size: int | None = None,
  ) -> SpatialScore:
    """A freshly initialised model of a reward config (no checkpoint): the untrained baseline."""
    mesh, rules = _mesh_and_rules(config, mesh)
    return cls(
      build.build(config, workdir, mesh, rules), config, mesh, rules, batch_size=batch_size
    )

  @classmethod
  def _load_workdir(cls, workdir, mesh, step, batch_size) -> SpatialScore:
    config = _read_config(os.path.join(workdir, WORKDIR_CONFIG))
    ckpt_dir = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(ckpt_dir):
      raise FileNotFoundError(f"No checkpoints/ in training workdir {workdir}: nothing to restore")
    with checkpoint.Checkpointer(
      workdir, metadata={checkpoint.BASE_MODEL_KEY: base_model(config)}
    ) as ckpt:
      steps = ckpt.all_steps()  # Checked before the (slow) build.
      if not steps or (step is not None and step not in steps):
        raise FileNotFoundError(
          f"No checkpoint {'' if step is None else f'for step {step} '}in {ckpt.directory}; "
          f"have steps {steps}"
        )
      step = steps[-1] if step is None else step
      mesh, rules = _mesh_and_rules(config, mesh)
      built = build.build(config, workdir, mesh, rules)
      _, trainable, _ = nnx.split(built.model, trainable_filter(config.model.trainable), ...)
      try:
        # Params only: the optimizer state and data iterator are training business.
        restored = ckpt.restore(step, params=trainable)
      except (checkpoint.CheckpointMismatchError, FileNotFoundError):
        raise
      except Exception as e:  # orbax / tensorstore errors on damaged files name no step.
        raise OSError(
          f"Could not read checkpoint step {step} in {ckpt.directory} (damaged or partly "
          f"written?): {type(e).__name__}: {str(e)[:500]}"
        ) from e
    nnx.update(built.model, restored.params)
    return cls(
      built, config, mesh, rules, batch_size=batch_size, step=restored.step, source=workdir
    )

  @classmethod
  def _load_export(cls, directory, mesh, batch_size) -> SpatialScore:
    meta_path = os.path.join(directory, EXPORT_CONFIG)
    fileio.verify_checksums(directory, "the SpatialScore export")
    with open(meta_path) as f:
      meta = json.load(f)
    if meta.get("format") != EXPORT_FORMAT or meta.get("version") != EXPORT_VERSION:
      raise ValueError(
        f"{meta_path}: format {meta.get('format')!r} version {meta.get('version')!r}; "
        f"expected {EXPORT_FORMAT!r} version {EXPORT_VERSION}"
      )
    config = ml_collections.ConfigDict(meta["config"])
    if not config.model.pretrained:  # Else build() would write a fresh tokenizer here.
      _require(os.path.join(directory, TOKENIZER_DIR, "tokenizer.json"))
    mesh, rules = _mesh_and_rules(config, mesh)
    built = build.build(config, directory, mesh, rules)
    if built.preparer.reward_token_id != meta["reward_token_id"]:
      raise ValueError(
        f"{meta_path}: {REWARD_TOKEN} was token {meta['reward_token_id']} when exported, but the "
        f"tokenizer of {base_model(config)} gives {built.preparer.reward_token_id}"
      )
    model = built.model
    if _exports_backbone(config):
      _fill(model.backbone, _BASE_PARAMS, _require(os.path.join(directory, BACKBONE_FILE)))
    if config.model.trainable == "lora":
      # build() applied LoRA with the config's targets, rank and alpha; import_peft checks them.
      lora.import_peft(
        model.backbone,
        os.path.join(directory, ADAPTER_DIR),
        name_map=qwen_params.PEFT_NAME_MAP,
        key_prefix=PEFT_KEY_PREFIX,
      )
    _fill(model, _head_filter(), _require(os.path.join(directory, HEAD_FILE)))
    return cls(
      built, config, mesh, rules, batch_size=batch_size, step=meta.get("step"), source=directory
    )

  # -- Scoring -------------------------------------------------------------------------------

  def score(
    self,
    images: Sequence[Any] | np.ndarray,
    prompts: Sequence[str] | str,
    *,
    batch_size: int | None = None,
  ) -> tuple[np.ndarray, np.ndarray]:
    """Scores each image against its prompt: (mu, sigma), numpy float32 arrays of shape (N,).

    Args:
      images: uint8 (H, W, 3) arrays, PIL images, float arrays in [0, 1], or one (N, H, W, 3)
        array; any size (resized to `image_size`, as in training).
      prompts: one prompt per image, or a single string for all of them.

    Runs in chunks of `batch_size` sequences (default: the scorer's), the last one padded, so
    one program is compiled per chunk size (the reward service keeps a few: its buckets).
    """
    if isinstance(images, Image.Image) or (
      isinstance(images, np.ndarray | jax.Array) and images.ndim == 3
    ):
      images = [images]  # One image.
    images = list(images)
    if isinstance(prompts, str):
      prompts = [prompts] * len(images)
    prompts = [str(p) for p in prompts]
    if not images:
      raise ValueError("SpatialScore.score got no images")
    if len(images) != len(prompts):
      raise ValueError(f"SpatialScore.score got {len(images)} images but {len(prompts)} prompts")
    images = [self._prepare_image(image, i) for i, image in enumerate(images)]
    chunk = self.batch_size if batch_size is None else self._chunk_size(batch_size)
    mu, sigma = evaluate.score_in_chunks(self.score_inputs, self.preparer, images, prompts, chunk)
    bad = np.flatnonzero(~(np.isfinite(mu) & np.isfinite(sigma)))
    if bad.size:
      raise FloatingPointError(
        f"SpatialScore {self.source or '(fresh model)'} gave non-finite scores for {bad.size} of "
        f"{len(mu)} images (first: images[{bad[0]}], prompt {prompts[bad[0]]!r}): its weights "
        "are damaged or diverged."
      )
    return mu, sigma

  def score_inputs(self, inputs: ModelInputs) -> tuple[jax.Array, jax.Array]:
    """(mu, sigma) of prepared inputs (`preparer(images, prompts)`); for `evaluate.evaluate`."""
    rows = inputs.input_ids.shape[0]
    patches = 0 if inputs.pixel_values is None else inputs.pixel_values.shape[0]
    with sharding.use_mesh(self.mesh, self.rules):
      if rows % self._data_parallel == 0 and patches % self._data_parallel == 0:
        inputs = jax.device_put(inputs, input_shardings(inputs, self.mesh, self.rules))
      return self._score_fn(self.trainable, self.frozen, inputs)

  def _chunk_size(self, batch_size: int) -> int:
    if batch_size < 1:
      raise ValueError(f"batch_size must be positive, got {batch_size}")
    return -(-batch_size // self._data_parallel) * self._data_parallel

  def _prepare_image(self, image: Any, index: int) -> np.ndarray:
    if isinstance(image, jax.Array):
      image = np.asarray(image)
    if isinstance(image, np.ndarray) and np.issubdtype(image.dtype, np.floating):
      # Floats are [0, 1] (a decoder's output); training saw uint8 PNGs, so quantise the same way.
      image = np.round(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)
    try:
      return pairs.resize_rgb(pairs.load_rgb(image), self._size_hw)
    except (ValueError, TypeError, OSError) as e:
      raise ValueError(f"SpatialScore.score: images[{index}]: {e}") from e

  # -- Export --------------------------------------------------------------------------------

  def export(self, directory: str | os.PathLike[str]) -> str:
    """Writes the export folder (see the module docstring); returns its path.

    Call on every process of a multi-process run (arrays are gathered); process 0 writes.
    """
    directory = os.fspath(directory)
    if os.path.exists(os.path.join(directory, WORKDIR_CONFIG)) and not os.path.exists(
      os.path.join(directory, EXPORT_CONFIG)
    ):
      raise ValueError(f"{directory} holds a {WORKDIR_CONFIG}: export to a folder of its own")
    marker = os.path.join(directory, EXPORT_CONFIG)
    if jax.process_index() == 0 and os.path.exists(marker):
      os.remove(marker)  # Re-exporting: the folder is incomplete until the new one is written.
    config, model = self.config, self.model
    head = _host_arrays(model, _head_filter())
    backbone = _host_arrays(model.backbone, _BASE_PARAMS) if _exports_backbone(config) else None
    if config.model.trainable == "lora":
      lora.export_peft(
        model.backbone,
        os.path.join(directory, ADAPTER_DIR),
        name_map=qwen_params.PEFT_NAME_MAP,
        base_model_name_or_path=config.model.pretrained or None,
        key_prefix=PEFT_KEY_PREFIX,
      )
    if jax.process_index() != 0:
      return directory
    os.makedirs(directory, exist_ok=True)
    hf.save_safetensors(head, os.path.join(directory, HEAD_FILE), metadata={"format": "flax"})
    if backbone is not None:
      hf.save_safetensors(
        backbone, os.path.join(directory, BACKBONE_FILE), metadata={"format": "flax"}
      )
    self.tokenizer.save_pretrained(os.path.join(directory, TOKENIZER_DIR))
    meta = dict(
      format=EXPORT_FORMAT,
      version=EXPORT_VERSION,
      base_model=base_model(config),
      trainable=config.model.trainable,
      reward_token=REWARD_TOKEN,
      reward_token_id=int(self.preparer.reward_token_id),
      step=self.step,
      exported_from=self.source,
      config=json.loads(config.to_json_best_effort()),
    )
    fileio.write_checksums(directory)  # Checked by `load`.
    metrics.write_summary(directory, meta, name=EXPORT_CONFIG)  # Last: marks the export complete.
    return directory


# -- Helpers -----------------------------------------------------------------------------------


def _mesh_and_rules(config: Any, mesh: jax.sharding.Mesh | None):
  return mesh or sharding.make_mesh(config.mesh), sharding.resolve_rules(config.sharding_rules)


def _read_config(path: str) -> ml_collections.ConfigDict:
  with open(path) as f:
    try:
      config = ml_collections.ConfigDict(json.load(f))
    except json.JSONDecodeError as e:
      raise ValueError(f"{path} is not valid JSON ({e}): the workdir's record is damaged") from e
  job = config.get("job")
  if job not in (None, "reward_train"):
    raise ValueError(
      f"{os.path.dirname(path)} is a {job!r} workdir, not a SpatialScore: give a reward_train "
      "workdir or a SpatialScore export folder."
    )
  missing = [k for k in ("model", "data", "eval", "seed", "mesh") if k not in config]
  if missing:
    raise ValueError(
      f"{path} is not a reward_train config (job {config.get('job')!r}): no {missing}"
    )
  return config


def _require(path: str) -> str:
  if not os.path.exists(path):
    raise FileNotFoundError(f"Export file missing: {path}")
  return path


def _head_filter() -> nnx.filterlib.Filter:
  # Top-level `head` / `reward_embedding` only: a `PathContains` would not tell `head` apart
  # from a future submodule of that name inside the backbone.
  return nnx.All(nnx.Param, lambda path, _: path[0] in ("head", "reward_embedding"))


def _flat(module: nnx.Module, filt: nnx.filterlib.Filter) -> list[tuple[tuple, nnx.Variable]]:
  return list(nnx.to_flat_state(nnx.state(module, filt)))


def _name(path: tuple) -> str:
  return ".".join(str(p) for p in path)


def _host_arrays(module: nnx.Module, filt: nnx.filterlib.Filter) -> dict[str, np.ndarray]:
  out = {}
  for path, var in _flat(module, filt):
    out[_name(path)] = sharding.to_host(var.get_value())
  return out


def _fill(module: nnx.Module, filt: nnx.filterlib.Filter, file: str) -> None:
  """Sets `module`'s variables (selected by `filt`) from a safetensors file keyed by our paths."""
  folder = hf.SafetensorsFolder(file)
  flat = _flat(module, filt)
  wanted = {_name(p): var for p, var in flat}
  missing = sorted(wanted.keys() - set(folder.keys()))
  unexpected = sorted(set(folder.keys()) - wanted.keys())
  shapes = [
    f"{k}: file {tuple(folder.info(k).shape)}, model {tuple(v.shape)}"
    for k, v in wanted.items()
    if k in folder and tuple(folder.info(k).shape) != tuple(v.shape)
  ]
  if missing or unexpected or shapes:
    raise ValueError(
      f"{file} does not fit the model:\n  missing: {missing[:20]}\n  unexpected: "
      f"{unexpected[:20]}\n  shape mismatches: {shapes[:20]}"
    )
  leaves = []
  for path, var in flat:
    old = var.get_value()
    value = np.array(folder.read(_name(path)), dtype=old.dtype)
    leaves.append((path, var.replace(jax.device_put(value, old.sharding))))
  nnx.update(module, nnx.from_flat_state(leaves))
