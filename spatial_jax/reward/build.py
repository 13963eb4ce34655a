"""Builds a SpatialScore model, tokenizer and batch preparer from a job config, and the train
step's batches from the loader's pairs (`pair_inputs`, `host_pair_batch`, `global_pair_inputs`).

One function for training, evaluation and `SpatialScore.load`, so a model is rebuilt
exactly as it was trained. Two worlds (DESIGN.md §2):

- `config.model.pretrained` set: a local Hugging Face Qwen2.5-VL folder (weights, tokenizer,
  preprocessor config); the backbone is loaded sharded and frozen, LoRA is added.
- otherwise: the synthetic world: the `config.model.preset` architecture (e.g. `tiny`) with
  `config.model.vision` / `config.model.text` overrides, random init, the synthetic
  word-level tokenizer.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import numpy as np
import transformers
from absl import logging
from flax import nnx, struct

from spatial_jax import lora, sharding
from spatial_jax.data import tokenizer as synthetic_tokenizer
from spatial_jax.models.qwen25vl import (
  DEFAULT_LORA_TARGETS,
  ModelInputs,
  Qwen25VLConfig,
  Qwen25VLModel,
  vision,
)
from spatial_jax.models.qwen25vl import params as qwen_params
from spatial_jax.models.qwen25vl import processor as qwen_processor
from spatial_jax.reward import grounding
from spatial_jax.reward.model import (
  QWEN_INSTRUCTION,
  REWARD_TOKEN,
  BatchPreparer,
  PromptTemplate,
  SpatialScoreModel,
)


@dataclasses.dataclass
class Built:
  model: SpatialScoreModel
  tokenizer: Any
  preparer: BatchPreparer
  backbone_config: Qwen25VLConfig
  lora_targets: list[str]


def backbone_config(config: Any) -> Qwen25VLConfig:
  """The synthetic-world architecture: a preset plus per-field overrides."""
  presets = {
    "tiny": Qwen25VLConfig.tiny,
    "qwen25vl_3b": Qwen25VLConfig.qwen25vl_3b,
    "qwen25vl_7b": Qwen25VLConfig.qwen25vl_7b,
  }
  if config.model.preset not in presets:
    raise ValueError(
      f"Unknown config.model.preset {config.model.preset!r}; known: {sorted(presets)}"
    )
  base = presets[config.model.preset]()
  vision = dataclasses.replace(base.vision, **_tuples(dict(config.model.vision)))
  text = dataclasses.replace(base.text, **_tuples(dict(config.model.text)))
  return base.replace(vision=vision, text=text, **_runtime(config))


def _tuples(fields: dict[str, Any]) -> dict[str, Any]:
  # ConfigDict stores tuples as lists; the frozen dataclasses want tuples (hashable).
  return {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}


def _runtime(config: Any) -> dict[str, Any]:
  return dict(
    dtype=config.model.dtype,
    param_dtype=config.model.param_dtype,
    remat=config.model.remat,
    attention_impl=config.model.get("attention_impl") or None,
  )


def tokenizer_for(config: Any, workdir: str | None) -> Any:
  """The real Qwen tokenizer (+ `<reward>`) or the synthetic one (saved in the workdir)."""
  if config.model.pretrained:
    tok = transformers.AutoTokenizer.from_pretrained(config.model.pretrained)
    if REWARD_TOKEN not in tok.get_vocab():
      tok.add_special_tokens({"additional_special_tokens": [REWARD_TOKEN]})
    return tok
  directory = os.path.join(workdir, "tokenizer") if workdir else None
  if directory and os.path.exists(os.path.join(directory, "tokenizer.json")):
    return synthetic_tokenizer.load_tokenizer(directory)
  if directory and jax.process_index() == 0:
    synthetic_tokenizer.save_tokenizer(directory)
    return synthetic_tokenizer.load_tokenizer(directory)
  import tempfile

  with tempfile.TemporaryDirectory() as tmp:
    synthetic_tokenizer.save_tokenizer(tmp)
    return synthetic_tokenizer.load_tokenizer(tmp)


def build(config: Any, workdir: str | None, mesh: jax.sharding.Mesh, rules: Any) -> Built:
  """Model (born sharded on `mesh`), tokenizer and preparer for a reward config."""
  tok = tokenizer_for(config, workdir)
  reward_id = tok.convert_tokens_to_ids(REWARD_TOKEN)
  seed = config.seed
  targets = list(config.model.lora_targets or DEFAULT_LORA_TARGETS)
  use_lora = config.model.trainable == "lora"
  if config.model.preset != "tiny" and not config.model.pretrained:
    raise ValueError(
      f"config.model.preset={config.model.preset!r} needs config.model.pretrained: a local "
      "Hugging Face folder with its weights (nothing is downloaded)."
    )

  def add_reward_parts(backbone: Qwen25VLModel) -> SpatialScoreModel:
    """LoRA (when configured), the `<reward>` embedding and the head, on a backbone."""
    if use_lora:
      lora.apply_lora(
        backbone,
        rank=config.model.lora_rank,
        alpha=config.model.lora_alpha,
        targets=targets,
        rngs=nnx.Rngs(seed + 1),
      )
    return SpatialScoreModel(
      backbone,
      reward_token_id=reward_id,
      head_hidden=config.model.head_hidden,
      grounding=config.train.get("grounding_weight", 0.0) > 0,
      rngs=nnx.Rngs(seed + 2),
    )

  if config.model.pretrained:
    backbone = qwen_params.from_pretrained(
      config.model.pretrained, mesh=mesh, sharding_rules=config.sharding_rules, **_runtime(config)
    )
    bconfig = backbone.config
    image_processor = qwen_processor.ImageProcessor.from_pretrained(config.model.pretrained)
    template = PromptTemplate(
      kind="qwen_chat", instruction=config.model.instruction or QWEN_INSTRUCTION
    )
    # The backbone was placed shard by shard as it was read; only the small new parts remain.
    with sharding.use_mesh(mesh, rules):
      model = add_reward_parts(backbone)
  else:
    bconfig = backbone_config(config)
    image_processor = qwen_processor.ImageProcessor.from_config(bconfig.vision)
    template = PromptTemplate(kind=config.model.get("template", "synthetic"))
    model = sharding.create_sharded(
      lambda: add_reward_parts(Qwen25VLModel(bconfig, rngs=nnx.Rngs(seed))), mesh, rules
    )
  preparer = BatchPreparer(
    bconfig, tok, image_processor, template, max_length=config.data.max_length
  )
  params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  logging.info("SpatialScore: %s backbone, %.2fM params", config.model.preset, params / 1e6)
  return Built(model, tok, preparer, bconfig, targets if use_lora else [])


# --- Train batches -------------------------------------------------------------------------------


def _pair_rows(batch: dict[str, np.ndarray], perturbed: bool) -> tuple[list, list[str]]:
  """(images, prompts) of the rows, each pair's rows together (see `pair_inputs`)."""
  images, prompts = [], []
  for i, (chosen, rejected) in enumerate(zip(batch["chosen"], batch["rejected"], strict=True)):
    texts = (
      (batch["prompt"][i], batch["perturbed_prompt"][i]) if perturbed else (batch["prompt"][i],)
    )
    for text in texts:
      images += [chosen, rejected]
      prompts += [text, text]
  return images, prompts


def pair_inputs(preparer, batch: dict[str, np.ndarray], *, perturbed: bool = False) -> ModelInputs:
  """One batch of sequences, each pair's rows together: chosen_0, rejected_0, chosen_1, ...

  Pairs together (not all chosen, then all rejected) so that any contiguous block of rows holds
  whole pairs: each process's slice of a global batch is then its own loader batch. With
  `perturbed`, each pair adds its two images under the perturbed prompt, four rows per pair:
  (chosen, prompt), (rejected, prompt), (chosen, perturbed), (rejected, perturbed).
  """
  return preparer(*_pair_rows(batch, perturbed))


@struct.dataclass
class PairBatch:
  """What the train step reads: the sequences and, optionally, colour-grounding targets."""

  inputs: ModelInputs
  centroids: jax.Array | None = None  # (rows, colours, 2): reward.grounding.colour_centroids
  present: jax.Array | None = None  # (rows, colours)
  rows_per_pair: int = struct.field(pytree_node=False, default=2)  # 2, or 4 with `perturbed`


def rows_per_pair(config: Any) -> int:
  """Sequences per pair in a train batch: 2, or 4 with `config.train.perturbed_pairs`."""
  return 4 if config.train.get("perturbed_pairs", False) else 2


def host_pair_batch(preparer, batch: dict[str, np.ndarray], config: Any) -> PairBatch:
  """The loader's pairs -> a host `PairBatch` as `config.train` asks (perturbed, grounding)."""
  rows = rows_per_pair(config)
  perturbed = rows == 4
  images, prompts = _pair_rows(batch, perturbed)
  inputs = preparer(images, prompts)
  centroids = present = None
  if config.train.get("grounding_weight", 0.0) > 0:
    # On each distinct image once (with `perturbed`, every image is in two rows), then
    # gathered back to the rows: per image the same numbers.
    slot: dict[int, int] = {}
    rows_of = [slot.setdefault(id(image), len(slot)) for image in images]
    distinct = list({id(image): image for image in images}.values())  # First-seen order.
    centroids, present = grounding.colour_centroids(np.stack(distinct))
    centroids, present = centroids[rows_of], present[rows_of]
  return PairBatch(inputs, centroids, present, rows_per_pair=rows)


def input_shardings(inputs: ModelInputs, mesh, rules) -> ModelInputs:
  """Sequences (and their image patches) split over `act_batch`; vision indices replicated."""
  batch = lambda ndim, axis=0: sharding.named_sharding(  # noqa: E731
    mesh, tuple("act_batch" if i == axis else None for i in range(ndim)), rules
  )
  replicated = sharding.named_sharding(mesh, (), rules)
  return ModelInputs(
    input_ids=batch(2),
    attention_mask=batch(2),
    position_ids=batch(3, axis=1),
    pixel_values=None if inputs.pixel_values is None else batch(2),
    vision_meta=jax.tree.map(lambda _: replicated, inputs.vision_meta),
  )


def global_pair_inputs(
  preparer, batch: dict[str, np.ndarray], mesh, rules, config: Any = None
) -> PairBatch | ModelInputs:
  """This process's loader batch -> the sharded global batch of the train step.

  Without `config`, the plain two-rows-per-pair `ModelInputs`; with it, the `PairBatch` that
  `config.train` asks for (`host_pair_batch`). With one process: placed on the mesh. With
  several, each process prepares its own pairs; the global batch is their concatenation in
  `sharding.process_batch_shard` order (`make_array_from_process_local_data`). The vision
  metadata indexes the patches of the whole batch, so it is rebuilt for the global image count
  (every image has the same size: the loader resizes them all).
  """
  host = host_pair_batch(preparer, batch, config) if config is not None else None
  inputs = host.inputs if host else pair_inputs(preparer, batch)
  shardings = input_shardings(inputs, mesh, rules)
  rows = lambda ndim: sharding.named_sharding(  # noqa: E731
    mesh, ("act_batch",) + (None,) * (ndim - 1), rules
  )
  targets = None if host is None else (host.centroids, host.present)
  target_shardings = jax.tree.map(lambda x: rows(np.ndim(x)), targets)
  if jax.process_count() == 1:
    inputs = jax.device_put(inputs, shardings)
    if host is None:
      return inputs
    centroids, present = jax.device_put(targets, target_shardings)
    return PairBatch(inputs, centroids, present, rows_per_pair=host.rows_per_pair)
  _, shards = sharding.process_batch_shard(mesh, rules)
  meta = None
  if inputs.pixel_values is not None:
    grid = np.asarray(preparer.image_processor([batch["chosen"][0]])["image_grid_thw"])
    num_images = inputs.input_ids.shape[0] * shards
    meta = vision.vision_metadata(
      np.tile(grid.reshape(1, 3), (num_images, 1)), preparer.config.vision
    )
  local = dataclasses.replace(inputs, vision_meta=None)
  out = sharding.process_local_to_global(local, dataclasses.replace(shardings, vision_meta=None))
  # Placed by the global metadata's own tree: with more images it may describe them per image.
  meta_shardings = input_shardings(dataclasses.replace(inputs, vision_meta=meta), mesh, rules)
  out = dataclasses.replace(out, vision_meta=jax.device_put(meta, meta_shardings.vision_meta))
  if host is None:
    return out
  centroids, present = sharding.process_local_to_global(targets, target_shardings)
  return PairBatch(out, centroids, present, rows_per_pair=host.rows_per_pair)
