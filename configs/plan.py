r"""Memory and FLOPs of full-size steps on a simulated mesh, without any weights (job `plan`).

Each row lowers and compiles the real jitted step of an experiment config (with the row's mesh,
remat and overrides) on fake CPU devices, from abstract parameters, and reports XLA's per-device
memory and the step's FLOPs; see `spatial_jax/jobs/plan.py`. Plans (the arg):

  reward_7b      SpatialScore training, Qwen2.5-VL-7B + LoRA 64, 32 pairs of 448x448 (paper)
  flux_dev_grpo  FLUX.1-dev + LoRA 32 GRPO: rollout and train step at 512 and 1024
  tiny           the same code path on tiny models (tests, seconds)

  python -m spatial_jax.main --config configs/plan.py:flux_dev_grpo --workdir /tmp/plan
  python -m spatial_jax.main --config configs/plan.py:reward_7b --workdir /tmp/plan
  python -m spatial_jax.main --config configs/plan.py:flux_dev_grpo,only=1024 --workdir /tmp/plan

`only=TEXT` keeps the rows whose name contains TEXT (with `exact`: is TEXT). `target=tpu:v5p`
compiles for TPU v5p topologies (deviceless, needs `pip install 'jax[tpu]'`) instead of fake CPU
devices:

  python -m spatial_jax.main --config 'configs/plan.py:reward_7b,only=reward 8x fsdp,exact,target=tpu:v5p' \
      --workdir /tmp/plan

Mesh axes: `data` (replicated params, split batch), `fsdp` (params and batch split), `tensor`
(heads / mlp split).
"""

from spatial_jax import configs_lib

REWARD = "configs/reward_qwen25vl_7b.py"
GRPO = "configs/grpo_flux_dev.py"


def row(name, step, experiment, *, devices=8, mesh=None, remat="none", set=(), **extra):  # noqa: A002
  """One measured configuration; `set` holds (dotted.config.key, value) overrides."""
  fields = dict(
    name=name,
    step=step,
    experiment=experiment,
    devices=devices,
    mesh=mesh or [["fsdp", devices]],
    remat=remat,
    set=[list(item) for item in set],
    flux="flux1_dev",  # FluxConfig preset of the GRPO rows.
    flux_overrides={},
    vae_scale_factor=8,
    encoders="flux1",  # T5 / CLIP / VAE of the resident-set rows: "flux1" or "tiny".
    reward=REWARD,  # The SpatialScore config of the resident-set rows.
  )
  fields.update(extra)
  return fields


def reward_7b():
  accum = [("train.batch_size", 8), ("train.grad_accum_steps", 4)]
  return [
    row("reward 8x fsdp", "reward_train", REWARD),
    row("reward 8x fsdp remat", "reward_train", REWARD, remat="full"),
    row("reward 4x fsdp remat", "reward_train", REWARD, devices=4, remat="full"),
    row("reward 4x fsdp", "reward_train", REWARD, devices=4),
    # The same 32 pairs per update as 4 micro-batches of 8 (optax.MultiSteps).
    row("reward 8x fsdp accum4", "reward_train", REWARD, set=accum),
    row("reward 8x fsdp remat accum4", "reward_train", REWARD, remat="full", set=accum),
    row("reward 4x fsdp remat accum4", "reward_train", REWARD, devices=4, remat="full", set=accum),
  ]


def flux_dev_grpo():
  dots = "dots_with_no_batch_dims_saveable"  # The config's default.
  rows = []
  for res in (512, 1024):
    size = [("data.image_size", res)]
    # 2 prompts x 24 = 48 samples per rollout call (the loop's is prompts_per_step x group);
    # 24 kept samples in 3 minibatches of 8 keep the batch split over 8 or 4 devices.
    two_prompts = size + [("grpo.prompts_per_step", 2), ("train.num_minibatches", 3)]
    rows += [
      row(f"rollout {res} P=8", "grpo_rollout", GRPO, set=size),
      row(f"rollout {res} P=2", "grpo_rollout", GRPO, set=two_prompts),
      row(f"train {res} {dots}", "grpo_train", GRPO, remat=dots, set=size),
      row(f"train {res} full", "grpo_train", GRPO, remat="full", set=size),
      row(f"rollout {res} P=2 v5p", "grpo_rollout", GRPO, devices=4, set=two_prompts),
      row(f"train {res} full v5p", "grpo_train", GRPO, devices=4, remat="full", set=size),
    ]
  # The same 1024 px steps with the blockwise attention (models/attention.py): tiles of scores
  # instead of 4,608^2 per head, what a fused kernel (cuDNN, Pallas) holds too.
  blockwise = [("data.image_size", 1024), ("model.attention_impl", "blockwise")]
  rows += [
    row("rollout 1024 P=8 blockwise", "grpo_rollout", GRPO, set=blockwise),
    row(f"train 1024 {dots} blockwise", "grpo_train", GRPO, remat=dots, set=blockwise),
    row("train 1024 full blockwise", "grpo_train", GRPO, remat="full", set=blockwise),
    row(
      "train 1024 full v5p blockwise", "grpo_train", GRPO, devices=4, remat="full", set=blockwise
    ),
  ]
  # The paper's cluster (`grpo_flux_dev.py:nodes=4`): 4 nodes x 8 GPUs, FSDP within a node and
  # data-parallel across nodes. The whole rollout (8 prompts x 24 = 192 samples, 6 a device) in
  # one call; the 96 kept samples in 3 minibatches of 32 (one a device).
  paper = dict(devices=32, mesh=[["data", 4], ["fsdp", 8]])
  for res in (512, 1024):
    size = [("data.image_size", res)]
    rows += [
      row(f"rollout {res} P=8 4x8", "grpo_rollout", GRPO + ":nodes=4", set=size, **paper),
      row(
        f"train {res} full 4x8", "grpo_train", GRPO + ":nodes=4", remat="full", set=size, **paper
      ),  # fmt: skip
    ]
  # Everything the real job holds on the devices at once (policy + LoRA + Adam, T5-XXL, CLIP-L,
  # VAE, SpatialScore-7B), with the reward call of 32 sequences.
  rows += [
    row("resident 8x", "grpo_resident", GRPO),
    row("resident 4x8", "grpo_resident", GRPO + ":nodes=4", **paper),
  ]
  return rows


def tiny():
  """The plans' code path on tiny models: seconds on a CPU."""
  reward_set = [
    ("model.preset", "tiny"),
    ("data.image_size", 32),
    ("data.max_length", 64),
    ("model.dtype", "float32"),
    ("model.param_dtype", "float32"),
    ("model.lora_rank", 4),
    ("train.batch_size", 4),
  ]
  grpo_set = [
    ("data.image_size", 64),
    ("model.max_sequence_length", 16),
    ("model.dtype", "float32"),
    ("model.param_dtype", "float32"),
    ("grpo.prompts_per_step", 2),
    ("grpo.group_size", 4),
    ("grpo.topk", 1),
    ("train.num_minibatches", 1),
    ("sampling.num_steps", 2),
  ]
  # Wider than FluxConfig.tiny, so that the parameters are large enough to notice (~2 MB).
  flux = dict(flux="tiny", flux_overrides=dict(num_attention_heads=4, attention_head_dim=32,
                                               axes_dims_rope=[8, 12, 12]))  # fmt: skip
  return [
    row("tiny reward", "reward_train", REWARD, devices=2, set=reward_set),
    row("tiny rollout", "grpo_rollout", GRPO, devices=2, set=grpo_set, **flux),
    row("tiny train", "grpo_train", GRPO, devices=2, remat="full", set=grpo_set, **flux),
    row(
      "tiny resident",
      "grpo_resident",
      GRPO,
      devices=2,
      set=grpo_set + [("reward.batch_size", 4)],
      encoders="tiny",
      reward="configs/reward_synthetic.py:smoke",
      **flux,
    ),  # fmt: skip
  ]


PLANS = {"reward_7b": reward_7b, "flux_dev_grpo": flux_dev_grpo, "tiny": tiny}


def get_config(arg=None):
  name, _, rest = (arg or "").partition(",")
  if name not in PLANS:
    raise ValueError(f"Unknown plan {name!r} (configs/plan.py:NAME); known plans: {sorted(PLANS)}.")
  options = configs_lib.parse_arg(rest, only="", exact=False, target="cpu")
  config = configs_lib.base_config("plan")
  config.plan = name
  match = (lambda n: n == options.only) if options.exact else (lambda n: options.only in n)
  rows = [r for r in PLANS[name]() if match(r["name"])]
  if not rows:
    raise ValueError(f"only={options.only!r} matches no row of plan {name!r}.")
  config.rows = rows
  # What to compile for: "cpu" (fake CPU devices) or "tpu:v5p" (a v5p topology of each row's
  # chip count, without TPUs; needs libtpu: pip install 'jax[tpu]').
  config.target = options.target
  # The fake CPU devices (the largest mesh of the rows); rows may use fewer.
  config.devices = max(r["devices"] for r in rows)
  # A step "fits" when its total per-device memory is at most this fraction of a chip's
  # (room for the runtime, fragmentation and the CPU estimate's error).
  config.headroom = 0.9
  # Stop at the first row that fails to compile (tests); otherwise it is reported as a row.
  config.fail_fast = False
  # > 0: also list each row's N largest per-device arrays and the ops that make them (plan.json
  # and the log), to find what a larger mesh does not split.
  config.largest_arrays = 0
  return config
