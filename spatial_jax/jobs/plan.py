"""Job `plan`: will a full-size configuration fit, before a cluster is booked?

For each row of `config.rows` the job loads the named experiment config (e.g.
`configs/grpo_flux_dev.py`), applies the row's mesh, remat and overrides, builds the model
*abstractly* (`nnx.eval_shape`: no weight is read or allocated), gives every parameter the
NamedSharding its logical axes resolve to, and lowers and compiles the experiment's real jitted
step (`reward.step.make_train_step`, `rl.loop.jit_phases`' rollout / train step, jitted as the
trainers jit them) for a mesh of fake CPU devices. It reports per device:

- memory from XLA's `memory_analysis()`: arguments + outputs + temporaries - aliased (donated)
  buffers. The CPU compiler's buffer assignment is an estimate of an accelerator's (fusion and
  scheduling differ). cuDNN and Pallas flash attention cannot be compiled here and XLA attention
  materialises the score matrices: rows with `model.attention_impl="blockwise"` (tiles of
  scores, `models/attention.py`) show what a fused kernel holds;
- FLOPs: the matmul FLOPs of the step's jaxpr (`matmul_flops`), divided by the device count.
  XLA's `cost_analysis()` counts a while-loop body once (the scanned layers, the sampler's steps,
  the trained timesteps), so its number is recorded in plan.json only, for reference.

`config.target="tpu:v5p"` compiles for a TPU topology of the row's chip count instead, without
TPUs (libtpu's deviceless compilation, `jax.experimental.topologies`; `pip install 'jax[tpu]'`):
the accelerator's own compiler, with native bf16 matmuls and its memory-aware scheduler. The CPU
compiler computes bf16 matmuls in f32 and keeps f32 copies of weights and activations: for the
bf16 SpatialScore-7B step it reports 91 GB per device where the TPU compiler needs 36 GB.

The fake devices must exist before the JAX backend starts: `main.py` calls `configure_devices`
for this job before anything touches a device.
"""

from __future__ import annotations

import json
import os
import re
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from spatial_jax import configs_lib, lora, sharding

GB = 1e9
# (name, chips, memory per chip in GB): the targets the table answers for.
# 4 x 8 H20 is the paper's GRPO cluster.
TARGETS = (("H20", 8, 96.0), ("H100", 8, 80.0), ("v5p", 4, 95.0), ("4x8 H20", 32, 96.0))


# TPU generations `config.target` may name: chips -> topology (`topologies.get_topology_desc`).
TPU_TOPOLOGIES = {
  "v5p": {4: "v5p:2x2x1", 8: "v5p:2x2x2", 16: "v5p:2x2x4", 32: "v5p:2x4x4"},
}


def target_devices(target: str, count: int) -> list[Any]:
  """`count` devices to compile for: fake CPU devices (`cpu`) or a TPU topology (`tpu:v5p`).

  Raises:
    ValueError: an unknown target, or a chip count the generation has no topology for.
    RuntimeError: a TPU target without libtpu.
  """
  if target == "cpu":
    return jax.devices()[:count]
  platform, _, generation = target.partition(":")
  if platform != "tpu" or generation not in TPU_TOPOLOGIES:
    known = ["cpu", *(f"tpu:{g}" for g in TPU_TOPOLOGIES)]
    raise ValueError(f"Unknown plan target {target!r} (config.target); known: {known}.")
  names = TPU_TOPOLOGIES[generation]
  if count not in names:
    raise ValueError(f"{target} has no topology of {count} chips; rows may use {sorted(names)}.")
  from jax.experimental import topologies

  try:
    topology = topologies.get_topology_desc(topology_name=names[count], platform="tpu")
  except Exception as e:  # noqa: BLE001  Whatever the plugin says, the cure is the same.
    raise RuntimeError(
      f"Compiling for {target} needs libtpu (pip install 'jax[tpu]'); it could not describe "
      f"{names[count]}: {type(e).__name__}: {e}"
    ) from e
  return list(topology.devices)


def configure_devices(config: Any) -> None:
  """Asks for `config.devices` fake CPU devices; must run before the JAX backend starts.

  Raises:
    RuntimeError: the backend already runs with too few devices (then set
      XLA_FLAGS=--xla_force_host_platform_device_count=N before jax starts, or run the job
      through `python -m spatial_jax.main`).
  """
  forced = re.search(
    r"--xla_force_host_platform_device_count=(\d+)", os.environ.get("XLA_FLAGS", "")
  )
  try:
    jax.config.update("jax_platforms", "cpu")
    # Only ever more devices: a process (e.g. a test session) that asked for more keeps them.
    if not forced or int(forced.group(1)) < config.devices:
      jax.config.update("jax_num_cpu_devices", int(config.devices))
  except RuntimeError:
    pass  # Already started: fine when it has the devices (checked below).
  if jax.device_count() < config.devices or jax.default_backend() != "cpu":
    raise RuntimeError(
      f"The plan needs {config.devices} CPU devices (config.devices) but JAX already runs with "
      f"{jax.device_count()} {jax.default_backend()} devices. Run it as `python -m "
      "spatial_jax.main --config configs/plan.py:NAME`, or set XLA_FLAGS="
      f"--xla_force_host_platform_device_count={config.devices} JAX_PLATFORMS=cpu before jax starts."
    )


# -- Abstract state ------------------------------------------------------------------------------


def _abstract(shape, dtype, mesh, spec=()) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(
    shape, dtype, sharding=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec))
  )


def _batch(shape, dtype, mesh, rules, axis=0) -> jax.ShapeDtypeStruct:
  """An abstract array with dimension `axis` split over `act_batch`, as the trainers put it."""
  names = tuple("act_batch" if i == axis else None for i in range(len(shape)))
  sh = sharding.named_sharding(mesh, names, rules)
  return jax.ShapeDtypeStruct(shape, dtype, sharding=sh)


def abstract_split(ctor, trainable, mesh, rules):
  """(graphdef, trainable state, frozen state) of `ctor()`'s model, every leaf a sharded
  ShapeDtypeStruct: the model is traced with `nnx.eval_shape`, never materialised."""
  with nnx.use_eager_sharding(False):
    model = nnx.eval_shape(ctor)
  graphdef, *states = nnx.split(model, trainable, ...)

  def shard_leaves(state):
    shardings = sharding.state_shardings(state, mesh, rules)
    return jax.tree.map(
      lambda sh, v: v.replace(jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sh)),
      shardings,
      state,
      is_leaf=lambda x: isinstance(x, nnx.Variable),
    )

  return graphdef, *(shard_leaves(s) for s in states)


def abstract_opt_state(tx, trainable):
  """The optimizer state as the trainers' `jax.jit(tx.init)(trainable)` lays it out (its
  shardings come from compiling the small init; `eval_shape` alone would drop them)."""
  init = jax.jit(tx.init)
  shapes = jax.eval_shape(init, trainable)
  shardings = init.lower(trainable).compile().output_shardings
  return jax.tree.map(
    lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), shapes, shardings
  )


def _nbytes(tree) -> int:
  return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def _key(mesh) -> jax.ShapeDtypeStruct:
  key = jax.eval_shape(lambda: jax.random.key(0))
  return _abstract(key.shape, key.dtype, mesh)


# -- The steps -----------------------------------------------------------------------------------


def _spatial_score(config: Any, mesh, rules):
  """(graphdef, trainable, frozen) of `reward_train`'s SpatialScore model, abstract."""
  from spatial_jax.models.qwen25vl import DEFAULT_LORA_TARGETS, Qwen25VLModel
  from spatial_jax.reward import build
  from spatial_jax.reward.model import SpatialScoreModel, trainable_filter

  m = config.model
  bconfig = build.backbone_config(config)

  def ctor():  # build.build's model, without the weights.
    backbone = Qwen25VLModel(bconfig, rngs=nnx.Rngs(0))
    if m.trainable == "lora":
      targets = list(m.lora_targets or DEFAULT_LORA_TARGETS)
      lora.apply_lora(backbone, rank=m.lora_rank, alpha=m.lora_alpha, targets=targets,
                      rngs=nnx.Rngs(1))  # fmt: skip
    # The `<reward>` id only selects a position; its value does not change any shape.
    reward_id = bconfig.text.vocab_size - 1
    return SpatialScoreModel(backbone, reward_token_id=reward_id, head_hidden=m.head_hidden,
                             rngs=nnx.Rngs(2))  # fmt: skip

  return abstract_split(ctor, trainable_filter(m.trainable), mesh, rules)


def _spatial_score_inputs(config: Any, seqs: int, mesh, rules):
  """SpatialScore's inputs for `seqs` sequences of `data.max_length` tokens, one image each."""
  from spatial_jax.models.qwen25vl import ModelInputs, vision
  from spatial_jax.models.qwen25vl.processor import ImageProcessor
  from spatial_jax.reward import build

  v = build.backbone_config(config).vision
  length, side = config.data.max_length, config.data.image_size
  h, w = ImageProcessor.from_config(v).resized_size(side, side)  # As build.build's processor.
  grid = np.tile([[1, h // v.patch_size, w // v.patch_size]], (seqs, 1))
  meta = vision.vision_metadata(grid, v)  # Host-side index arrays (no pixels needed).
  replicated = lambda x: _abstract(np.shape(x), np.asarray(x).dtype, mesh)  # noqa: E731
  return ModelInputs(
    input_ids=_batch((seqs, length), jnp.int32, mesh, rules),
    attention_mask=_batch((seqs, length), jnp.int32, mesh, rules),
    position_ids=_batch((3, seqs, length), jnp.int32, mesh, rules, axis=1),
    pixel_values=_batch((meta.num_patches, v.patch_dim), jnp.float32, mesh, rules),
    vision_meta=jax.tree.map(replicated, meta),
  )


def reward_train_program(config: Any, mesh, rules, key: jax.Array) -> dict[str, Any]:
  """`reward_train`'s jitted step on abstract SpatialScore state and a batch of pairs.

  `key` is made before the mesh is set: under a mesh of devices that are not attached (an
  accelerator topology compiled for from this host) no concrete op can run."""
  from spatial_jax.reward import build
  from spatial_jax.reward import step as reward_step

  graphdef, trainable, frozen = _spatial_score(config, mesh, rules)
  tx = reward_step.make_optimizer(config)
  opt_state = abstract_opt_state(tx, trainable)

  # One batch: B pairs -> 2B sequences of max_length tokens, one image each (pair_inputs); 4B
  # with `train.perturbed_pairs`. The grounding targets (a few floats a row) are left out.
  rows_per_pair = build.rows_per_pair(config)
  seqs = rows_per_pair * config.train.batch_size
  inputs = _spatial_score_inputs(config, seqs, mesh, rules)
  trainable_sh = sharding.state_shardings(trainable, mesh, rules)
  step = reward_step.make_train_step(graphdef, tx, config, key)
  replicated_metrics = sharding.named_sharding(mesh, (), rules)  # As reward_train.run jits it.
  fn = jax.jit(step, donate_argnums=(0, 1), out_shardings=(trainable_sh, None, replicated_metrics))
  batch = build.PairBatch(inputs, rows_per_pair=rows_per_pair)
  args = (trainable, opt_state, frozen, batch, _abstract((), jnp.int32, mesh))
  length, side = config.data.max_length, config.data.image_size
  shape = f"{config.train.batch_size} pairs: {seqs} x {length} tok, {side}px"
  return dict(fn=fn, args=args, trainable=trainable, frozen=frozen, shape=shape)


def _flux_policy(config: Any, row: Any, mesh, rules):
  """The GRPO policy (FLUX + LoRA) of `config`, abstract; the text encoders, VAE and reward
  are not part of the rollout or train step (the prompt embeddings are inputs)."""
  from spatial_jax.diffusion.build import runtime_kwargs
  from spatial_jax.diffusion.generator import Geometry
  from spatial_jax.diffusion.latents import image_ids, latent_size, text_ids
  from spatial_jax.diffusion.text_to_image import TextToImage
  from spatial_jax.models.flux import FluxConfig, FluxTransformer
  from spatial_jax.models.flux import params as flux_params

  presets = {"flux1_dev": FluxConfig.flux1_dev, "tiny": FluxConfig.tiny}
  if row.flux not in presets:
    raise ValueError(f"Unknown row flux={row.flux!r}; known: {sorted(presets)}.")
  overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in row.flux_overrides.items()}
  flux_config = presets[row.flux](**overrides, **runtime_kwargs(config))
  if config.sampling.cfg_scale not in (1.0, -1.0):  # text_to_image: negative -> 1.0 for FLUX.
    raise NotImplementedError("The plan covers guidance-distilled FLUX (sampling.cfg_scale=1).")
  c = config.lora

  def ctor():  # text_to_image's transformer + LoRA, without the weights.
    model = FluxTransformer(flux_config, rngs=nnx.Rngs(config.seed))
    targets = list(c.targets) or list(flux_params.lora_targets(c.single_mlp))
    lora.apply_lora(model, rank=c.rank, alpha=c.alpha, targets=targets, rngs=nnx.Rngs(0))
    return model

  graphdef, trainable, frozen = abstract_split(ctor, nnx.LoRAParam, mesh, rules)
  size = int(config.data.image_size)
  lh, lw = latent_size(size, size, row.vae_scale_factor)
  length = config.model.max_sequence_length
  geo = Geometry((size, size), (lh, lw), image_ids(lh // 2, lw // 2), text_ids(length))
  policy = TextToImage(
    transformer=nnx.merge(graphdef, trainable, frozen),
    encode=None,
    decode=None,
    geo=geo,
    guidance=float(config.sampling.guidance),
    cfg_scale=1.0,
    negative=None,
    source="plan (abstract)",
  )
  return graphdef, trainable, frozen, policy, flux_config


def grpo_program(config: Any, row: Any, mesh, rules) -> dict[str, Any]:
  """`grpo`'s jitted rollout (`row.step == "grpo_rollout"`) or train step (`"grpo_train"`), as
  `rl.loop.jit_phases` jits them for the job."""
  from spatial_jax.rl import loop
  from spatial_jax.rl import steps as steps_lib

  loop.check_config(config, sharding.batch_shard_count(mesh, rules))
  graphdef, trainable, frozen, policy, fc = _flux_policy(config, row, mesh, rules)
  g, steps = config.grpo, config.sampling.num_steps
  tokens, channels = policy.latent_shape
  length, dtype = config.model.max_sequence_length, jnp.dtype(config.model.dtype)
  size = config.data.image_size
  tx = steps_lib.make_optimizer(config)
  phases = loop.jit_phases(graphdef, trainable, frozen, policy, tx, config, mesh, rules)

  def embeds(b):
    return (_batch((b, length, fc.joint_attention_dim), dtype, mesh, rules),
            _batch((b, fc.pooled_projection_dim), dtype, mesh, rules))  # fmt: skip

  if row.step == "grpo_rollout":
    b = g.prompts_per_step * g.group_size  # The loop's one rollout call.
    fn, args = phases.rollout, (trainable, frozen, *embeds(b), _key(mesh))
    shape = f"{b} samples, {size}px, {steps} steps"
  else:
    topk = loop.kept_topk(config)
    kept = g.group_size if topk is None else 2 * topk
    b = g.prompts_per_step * kept // config.train.num_minibatches
    prompt_embeds, pooled = embeds(b)
    shapes = dict(
      latents=((steps + 1, b, tokens, channels), jnp.float32),
      log_probs=((steps, b), jnp.float32),
      advantages=((b,), jnp.float32),
      mask=((b,), jnp.bool_),
    )
    if "means" in loop.batch_keys(config):
      shapes["means"] = ((steps, b, tokens, channels), jnp.float32)
    batch = {
      k: _batch(shape, dt, mesh, rules, axis=loop.BATCH_AXES[k])
      for k, (shape, dt) in shapes.items()
    }
    batch.update(prompt_embeds=prompt_embeds, pooled=pooled)
    batch = {k: batch[k] for k in loop.batch_keys(config)}
    batch["timesteps"] = _abstract((len(phases.timesteps),), jnp.int32, mesh)
    fn, args = phases.train, (trainable, abstract_opt_state(tx, trainable), frozen, batch)
    shape = f"{b} samples, {size}px, {len(phases.timesteps)} timesteps"
  return dict(fn=fn, args=args, trainable=trainable, frozen=frozen, shape=shape)


def grpo_resident_program(config: Any, row: Any, mesh, rules) -> dict[str, Any]:
  """The real `grpo` job's resident set on one mesh, measured as its reward call.

  Every model the job holds on the devices at once: the FLUX policy + LoRA with the LoRA's Adam
  state, T5-XXL and CLIP-L (prompt encoding), the VAE (decoding) and SpatialScore
  (`row.reward`'s config, Qwen2.5-VL-7B + its LoRA). The program is SpatialScore scoring one
  call of `reward.batch_size` sequences, with every other model's weights as (kept) arguments:
  its arguments are the resident set per device, its temporaries the reward call's. The job's
  peak is about the resident set plus the largest temporaries of its rollout / train / reward
  calls (the rollout and train rows count the policy's weights once more)."""
  from spatial_jax.models.clip import CLIPTextConfig, CLIPTextModel
  from spatial_jax.models.t5 import T5Config, T5EncoderModel
  from spatial_jax.models.vae import AutoencoderKL, VAEConfig
  from spatial_jax.rl import steps as steps_lib

  _, trainable, frozen, _, _ = _flux_policy(config, row, mesh, rules)
  opt_state = abstract_opt_state(steps_lib.make_optimizer(config), trainable)
  dtypes = dict(dtype=config.model.dtype, param_dtype=config.model.param_dtype)
  presets = dict(
    flux1=(T5Config.t5_v1_1_xxl, CLIPTextConfig.clip_l, VAEConfig.flux1),
    tiny=(
      lambda **d: T5Config(d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4, **d),
      lambda **d: CLIPTextConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, **d
      ),  # fmt: skip
      lambda **d: VAEConfig.flux1(block_out_channels=(32, 32, 32, 32), norm_num_groups=8, **d),
    ),
  )
  if row.encoders not in presets:
    raise ValueError(f"Row {row.name!r}: encoders={row.encoders!r}; known: {sorted(presets)}.")
  t5_config, clip_config, vae_config = (make(**dtypes) for make in presets[row.encoders])
  encoders = {
    name: abstract_split(ctor, nnx.Param, mesh, rules)[1]
    for name, ctor in (
      ("t5", lambda: T5EncoderModel(t5_config, rngs=nnx.Rngs(0))),
      ("clip", lambda: CLIPTextModel(clip_config, rngs=nnx.Rngs(0))),
      ("vae", lambda: AutoencoderKL(vae_config, rngs=nnx.Rngs(0))),
    )
  }
  path, _, arg = row.reward.partition(":")
  reward_config = configs_lib.load_config(path, arg or None)
  r_graphdef, r_trainable, r_frozen = _spatial_score(reward_config, mesh, rules)
  inputs = _spatial_score_inputs(reward_config, config.reward.batch_size, mesh, rules)

  def score(r_trainable, r_frozen, inputs, resident):
    del resident  # Held on the devices by the job; the reward call does not read it.
    return nnx.merge(r_graphdef, r_trainable, r_frozen)(inputs)

  resident = dict(policy=(trainable, frozen), policy_opt_state=opt_state, **encoders)
  fn = jax.jit(score, keep_unused=True)  # Unused arguments still count as resident.
  shape = (
    f"resident set; reward call {config.reward.batch_size} seqs x "
    f"{reward_config.data.max_length} tok, {reward_config.data.image_size}px"
  )
  others = (frozen, r_frozen, encoders)
  return dict(
    fn=fn,
    args=(r_trainable, r_frozen, inputs, resident),
    trainable=trainable,
    frozen=others,
    shape=shape,
  )


# -- Measuring -----------------------------------------------------------------------------------


def _subjaxprs(eqn) -> list[list[Any]]:
  """The jaxprs inside `eqn` as alternatives: a list per branch of a `cond`, else one list."""
  found = []
  for value in eqn.params.values():
    values = value if isinstance(value, (tuple, list)) else (value,)
    jaxprs = [getattr(v, "jaxpr", v) for v in values]
    jaxprs = [j for j in jaxprs if hasattr(j, "eqns")]
    if jaxprs:
      found.append(jaxprs)
  return found


def matmul_flops(jaxpr) -> float:
  """2 * M * N * K summed over every `dot_general` of a (closed) jaxpr, scan bodies multiplied
  by their length (a `cond` counts its costliest branch; a while loop's body once).

  XLA's `cost_analysis()` and `jax.experimental.roofline` count a loop body once, which for
  scanned layers, sampler steps and trained timesteps undercounts by 10-500x. Matmuls (the
  projections and the attention einsums) are > 95% of these models' FLOPs; the backward pass and
  remat's recomputation are explicit in the jaxpr of a step and counted.
  """
  jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
  total = 0.0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      lhs = eqn.invars[0].aval
      (contracting, _), _ = eqn.params["dimension_numbers"]
      k = np.prod([lhs.shape[d] for d in contracting])
      total += 2.0 * np.prod(eqn.outvars[0].aval.shape) * k
      continue
    subs = _subjaxprs(eqn)
    if not subs:
      continue
    repeat = eqn.params.get("length", 1) if eqn.primitive.name == "scan" else 1
    if eqn.primitive.name == "cond":
      total += max(matmul_flops(branch) for group in subs for branch in group)
    else:
      total += repeat * sum(matmul_flops(j) for group in subs for j in group)
  return total


# -- Rows -----------------------------------------------------------------------------------


def experiment_config(row: Any):
  """The row's experiment config with its mesh, remat and `set` overrides (locked: a
  misspelled override fails)."""
  path, _, arg = row.experiment.partition(":")
  config = configs_lib.load_config(path, arg or None)
  config.lock()
  config.mesh = [list(axis) for axis in row.mesh]
  if row.step == "reward_train":
    if row.remat not in ("none", "full"):
      raise ValueError(
        f"Row {row.name!r}: Qwen2.5-VL remat is 'none' or 'full', not {row.remat!r}."
      )
    config.model.remat = row.remat == "full"
  else:
    config.model.remat = row.remat
  for key, value in row.set:
    *parents, leaf = key.split(".")
    node = config
    for part in parents:
      node = getattr(node, part)
    setattr(node, leaf, tuple(value) if isinstance(value, list) else value)
  return config


_HLO_ARRAY = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (\w+)\[([\d,]*)\]")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4,
                "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8}  # fmt: skip


def largest_arrays(hlo_text: str, count: int) -> list[dict[str, Any]]:
  """The `count` largest per-device arrays an optimized (partitioned) HLO module defines, with
  the op that makes each (its jax op_name): where to look when a step's temporaries do not shrink
  with more devices. Several instructions may share a buffer, so this is a list to read, not a
  sum to trust."""
  found = []
  for line in hlo_text.splitlines():
    match = _HLO_ARRAY.match(line)
    if not match or match.group(2) not in _DTYPE_BYTES:
      continue
    dims = [int(d) for d in match.group(3).split(",") if d]
    nbytes = int(np.prod(dims, dtype=np.int64)) * _DTYPE_BYTES[match.group(2)]
    op = _OP_NAME.search(line)
    found.append(dict(gb=nbytes / GB, shape=f"{match.group(2)}{dims}",
                      op=op.group(1) if op else match.group(1)))  # fmt: skip
  found.sort(key=lambda a: -a["gb"])
  unique, seen = [], set()
  for array in found:  # One entry per (shape, op): fusions repeat them.
    key = (array["shape"], array["op"])
    if key not in seen:
      seen.add(key)
      unique.append(array)
  return unique[:count]


def measure(
  row: Any, headroom: float = 0.9, largest: int = 0, target: str = "cpu"
) -> dict[str, Any]:
  """Lowers and compiles one row's step for `target`; returns its memory, FLOPs and timings."""
  programs = {"reward_train", "grpo_rollout", "grpo_train", "grpo_resident"}
  if row.step not in programs:
    raise ValueError(f"Row {row.name!r}: unknown step {row.step!r}; known: {sorted(programs)}.")
  config = experiment_config(row)
  devices = target_devices(target, row.devices)
  mesh = sharding.make_mesh(config.mesh, devices)
  rules = sharding.resolve_rules(config.sharding_rules)
  start = time.perf_counter()
  key = jax.random.key(config.seed)
  with sharding.use_mesh(mesh, rules):
    if row.step == "reward_train":
      program = reward_train_program(config, mesh, rules, key)
    elif row.step == "grpo_resident":
      program = grpo_resident_program(config, row, mesh, rules)
    else:
      program = grpo_program(config, row, mesh, rules)
    lowered = program["fn"].lower(*program["args"])
    lowered_at = time.perf_counter()
    compiled = lowered.compile()
    compiled_at = time.perf_counter()
    flops = matmul_flops(jax.make_jaxpr(program["fn"])(*program["args"]))
  mem = compiled.memory_analysis()
  xla_cost = compiled.cost_analysis() or {}
  total = (
    mem.argument_size_in_bytes
    + mem.output_size_in_bytes
    + mem.temp_size_in_bytes
    - mem.alias_size_in_bytes
  )
  result = dict(
    name=row.name,
    step=row.step,
    target=target if target == "cpu" else f"{target} ({devices[0].device_kind})",
    shape=program["shape"],
    mesh="x".join(f"{name}{size}" for name, size in mesh.shape.items() if size > 1) or "1",
    devices=row.devices,
    remat=str(row.remat),
    dtype=str(config.model.dtype),
    trainable_params=sum(int(np.prod(x.shape)) for x in jax.tree.leaves(program["trainable"])),
    frozen_params=sum(int(np.prod(x.shape)) for x in jax.tree.leaves(program["frozen"])),
    param_bytes=_nbytes((program["trainable"], program["frozen"])),
    argument_gb=mem.argument_size_in_bytes / GB,
    output_gb=mem.output_size_in_bytes / GB,
    temp_gb=mem.temp_size_in_bytes / GB,
    alias_gb=mem.alias_size_in_bytes / GB,
    total_gb=total / GB,
    tflops_per_device=flops / row.devices / 1e12,
    xla_cost_analysis_flops=float(xla_cost.get("flops", -1.0)),
    lower_s=round(lowered_at - start, 1),
    compile_s=round(compiled_at - lowered_at, 1),
  )
  if largest:
    result["largest_arrays"] = largest_arrays(compiled.as_text(), largest)
  result["fits"] = {
    name: (total / GB <= capacity * headroom if chips == row.devices else None)
    for name, chips, capacity in TARGETS
  }
  return result


# -- Report --------------------------------------------------------------------------------------

COLUMNS = ("row", "step", "batch / resolution", "mesh", "remat", "args GB", "temp GB",
           "total GB", "TFLOP/dev", *(name for name, _, _ in TARGETS), "compile s")  # fmt: skip


def _cells(r: dict[str, Any]) -> tuple[str, ...]:
  if "error" in r:
    return (r["name"], r["step"], "error: " + r["error"][:80], *[""] * (len(COLUMNS) - 3))
  fits = ("-" if r["fits"][name] is None else "yes" if r["fits"][name] else "no"
          for name, _, _ in TARGETS)  # fmt: skip
  return (r["name"], r["step"], r["shape"], r["mesh"], r["remat"], f"{r['argument_gb']:.2f}",
          f"{r['temp_gb']:.2f}", f"{r['total_gb']:.2f}", f"{r['tflops_per_device']:.1f}", *fits,
          f"{r['compile_s']:.0f}")  # fmt: skip


def table(results: list[dict[str, Any]]) -> str:
  """The per-device table as GitHub markdown."""
  rows = [_cells(r) for r in results]
  widths = [max(len(str(x)) for x in col) for col in zip(COLUMNS, *rows, strict=True)]

  def line(cells):
    return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

  return "\n".join([line(COLUMNS), line(["-" * w for w in widths]), *map(line, rows)])


def _compiler(target: str) -> str:
  return "CPU" if target == "cpu" else f"{target.partition(':')[2]} TPU (deviceless)"


def run(config: Any, workdir: str) -> list[dict[str, Any]]:
  """Measures every row of `config.rows`; prints the table, writes plan.json and plan.md."""
  import ml_collections

  configure_devices(config)
  target = config.get("target", "cpu")
  results = []
  for row in [ml_collections.ConfigDict(dict(r)) for r in config.rows]:
    logging.info("plan: %s (%s on %d devices)", row.name, row.step, row.devices)
    try:
      results.append(measure(row, config.headroom, config.get("largest_arrays", 0), target))
    except Exception as e:  # noqa: BLE001  A row that cannot compile is a finding, not a crash.
      if config.fail_fast:
        raise
      logging.exception("plan: %s failed", row.name)
      results.append(dict(name=row.name, step=row.step, error=f"{type(e).__name__}: {e}"))
    logging.info("plan: %s", json.dumps(results[-1]))
  capacities = ", ".join(f"{n} = {c} x {m:g} GB" for n, c, m in TARGETS)
  notes = (
    f"Per-device memory of XLA's {_compiler(target)} compile for the mesh "
    f"({capacities}); 'fits' means total <= "
    f"{config.headroom:.0%} of one chip's memory; '-': a row on another device count. "
    "TFLOP/dev: matmul FLOPs of one step (backward and remat recomputation included) / devices."
  )
  text = f"## plan: {config.plan}\n\n{table(results)}\n\n{notes}\n"
  print(text, flush=True)
  logging.info("\n%s", text)
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "plan.json"), "w") as f:
    json.dump(dict(plan=config.plan, rows=results, notes=notes), f, indent=2)
  with open(os.path.join(workdir, "plan.md"), "w") as f:
    f.write(text)
  return results
