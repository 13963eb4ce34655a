r"""GRPO on FLUX.1-dev with SpatialScore: the paper's recipe (arXiv 2602.24233, section 4).

Bring the weights and data yourself (nothing is downloaded):
  - `model.pipeline`: a local diffusers FLUX.1-dev folder (model_index.json, transformer/, vae/,
    text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/, scheduler/), e.g. from
    `huggingface-cli download black-forest-labs/FLUX.1-dev --local-dir /data/FLUX.1-dev`;
  - `reward.spatial_score`: a `reward_train` workdir or a `SpatialScore.export` folder trained
    with configs/reward_qwen25vl_7b.py;
  - `data.prompts`: training prompts with spatial relations, one per line (or jsonl with a
    `prompt` field); `data.eval_prompts` for held-out ones (default: the file's last 32).

  python -m spatial_jax.main --config configs/grpo_flux_dev.py --workdir /ckpt/grpo_dev \
    --config.model.pipeline=/data/FLUX.1-dev --config.reward.spatial_score=/ckpt/spatial_score \
    --config.data.prompts=/data/spatial_prompts.txt
  # The paper's cluster, 4 nodes x 8 GPUs (one process per GPU; launch/slurm.sbatch):
  sbatch --nodes=4 launch/slurm.sbatch configs/grpo_flux_dev.py:nodes=4 /shared/grpo_dev ...
  # A TPU v5p-64 slice, 8 hosts x 4 chips (launch/tpu_pod.sh):
  launch/tpu_pod.sh my-v5p-64 us-east5-a configs/grpo_flux_dev.py:nodes=8,chips=4 /mnt/gcs/grpo ...

`nodes=N,chips=C` (default 1 node): FSDP over a host's C devices, data-parallel over the N hosts,
the 96 kept samples of a step in minibatches of one per device.

The paper: G = 24 images per prompt, the top-6 and bottom-6 rewards trained (k = 6), lr 3e-4,
clip range 1e-4, KL beta 0.01, LoRA rank 32 (alpha 64, Flow-GRPO's SD3 ratio). FLUX.1-dev guides
through its distilled guidance embedding (3.5), without true CFG. The SDE noise level (0.9),
the 6 rollout steps (the last one deterministic) and 28 evaluation steps at 512x512 are
Flow-GRPO's FLUX recipe, which the paper builds on. Parameters are sharded FSDP over all devices
with bf16 compute; `python -m spatial_jax.main --config configs/plan.py:flux_dev_grpo` reports
whether a mesh fits before a cluster is booked.
"""

from spatial_jax import configs_lib


def get_config(arg=None):
  arg = configs_lib.parse_arg(arg, smoke=False, nodes=1, chips=8)
  config = configs_lib.base_config("grpo")
  config.mesh = [["data", 1], ["fsdp", -1], ["tensor", 1]]
  config.data = dict(
    image_size=512,
    prompts="",  # Required: the training prompt file.
    eval_prompts="",
    synthetic=dict(min_objects=2, max_objects=4, max_relations=4),  # Unused with a prompt file.
  )
  config.model = dict(
    pipeline="",  # Required: the FLUX.1-dev folder.
    generator="",
    max_sequence_length=512,
    dtype="bfloat16",
    param_dtype="bfloat16",
    remat="dots_with_no_batch_dims_saveable",
    attention_impl="",  # "cudnn" on NVIDIA GPUs.
    scan_layers=True,
  )
  config.lora = dict(rank=32, alpha=64.0, targets=(), single_mlp=False)
  config.reward = dict(
    spatial_score="",  # Required: the SpatialScore workdir, export, or reward_serve URL.
    tiny_spatial_score=False,
    remote_retry_s=300.0,  # A reward_serve URL in spatial_score: how long to retry.
    oracle=False,  # Real prompts: no rule-based oracle.
    train_on="spatial_score",
    batch_size=32,
    **configs_lib.grpo_reward_mix(),
  )
  config.sampling = configs_lib.grpo_sampling(6, guidance=3.5, cfg_scale=1.0)
  config.grpo = dict(
    prompts_per_step=8,
    group_size=24,
    topk=6,
    stats="kept",
    std="group",
    adv_eps=1e-4,
    adv_clip=5.0,
    noise_level=0.9,
    same_initial_noise=False,  # Flow-GRPO draws every sample's initial noise apart.
    timestep_fraction=1.0,
    clip_range=1e-4,
    beta=0.01,
    kl_form="flow_grpo",
    kl_target="mean",  # The KL of the step means, or "velocity": 0.5 mean((v - v_ref)^2).
    ratio_norm=False,  # GRPO-Guard's ratio normalisation and per-step gradient reweight.
  )
  config.train = dict(
    # Divergence guard: a save (or resume) with a |weight| beyond this stops the run; 0: off.
    max_abs_param=1e4,
    steps=1000,
    lr=3e-4,
    weight_decay=1e-4,
    grad_clip=1.0,
    num_minibatches=4,
    ema_decay=0.0,
    early_stop=configs_lib.early_stop(),
    checkpoint_every=20,
    keep_checkpoints=3,
  )
  config.eval = dict(every_steps=50, num_prompts=32, num_steps=28, seed=0)
  config.log_every_secs = 60.0
  if arg.nodes > 1:
    # Several hosts of `chips` devices (the paper: 4 nodes x 8 H20): FSDP within a host, data
    # parallel across hosts, and minibatches of one kept sample per device.
    devices = arg.nodes * arg.chips
    kept = config.grpo.prompts_per_step * 2 * config.grpo.topk
    if kept % devices:
      raise ValueError(
        f"configs/grpo_flux_dev.py:nodes={arg.nodes},chips={arg.chips}: the {kept} kept samples "
        f"of a step do not split over {devices} devices; change grpo.prompts_per_step."
      )
    config.mesh = [["data", arg.nodes], ["fsdp", arg.chips], ["tensor", 1]]
    config.train.num_minibatches = kept // devices
  if arg.smoke:
    raise ValueError(
      "grpo_flux_dev needs FLUX.1-dev weights; the smoke run of GRPO is configs/grpo_synthetic.py"
      ":smoke."
    )
  return config
