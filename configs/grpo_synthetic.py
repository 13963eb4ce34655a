r"""GRPO in the synthetic world: the tiny FLUX generator of `flux_sft_synthetic` + LoRA, rewarded
in-process by the tiny SpatialScore of `reward_synthetic` and/or the scene oracle.

  python -m spatial_jax.main --config configs/grpo_synthetic.py --workdir workdirs/grpo \
    --config.model.generator=workdirs/flux_sft/final \
    --config.reward.spatial_score=workdirs/reward --config.reward.train_on=spatial_score
  # A fixed pool of 16 one-relation scenes, held out in other words (and fresh scenes):
  python -m spatial_jax.main --config configs/grpo_synthetic.py:pool=16 --workdir workdirs/pool \
    --config.model.generator=workdirs/flux_sft/final \
    --config.reward.spatial_score=workdirs/reward --config.reward.train_on=spatial_score
  python -m spatial_jax.main --config configs/grpo_synthetic.py:smoke --workdir /tmp/g

Without `reward.spatial_score` the oracle (the fraction of the prompt's relations an image
satisfies, Flow-GRPO's rule-based GenEval-like reward) drives training; with it, both are
logged and `reward.train_on` picks one. `:smoke` is self-contained: a random tiny generator and
a random tiny SpatialScore, two steps. The settings scale the paper's down to a CPU: G = 8
samples per prompt with the top-2 and bottom-2 kept (the paper: 24 and 6, the same quarter),
10 SDE steps (Flow-GRPO-Flux: 6 to train, 28 to evaluate), lr 3e-4, clip 1e-4, beta 0.01.

`simple` trains on fresh two-object, one-relation scenes (held out: other such scenes) with
the settings that move layouts within a CPU budget (docs/results/grpo_synthetic.md): 8 prompts x
16 samples a step, top-4 and bottom-4 kept, one update of 64 samples at lr 1e-3, one initial
noise per group and the first 4 of 10 steps stochastic (where the layout is decided), 80 steps.
`pool=N` (implies `simple`) trains on a fixed pool of N such scenes (`data.scene_pool`).
"""

from spatial_jax import configs_lib


def get_config(arg=None):
  arg = configs_lib.parse_arg(arg, smoke=False, simple=False, pool=0)
  config = configs_lib.base_config("grpo")

  config.data = dict(
    image_size=32,
    prompts="",  # A prompt file (txt / jsonl); empty: prompts drawn from the scene grammar.
    eval_prompts="",  # Held-out prompts; empty: drawn from the grammar (or the file's tail).
    synthetic=dict(min_objects=2, max_objects=4, max_relations=4),
    # No prompt file: > 0 trains on a fixed pool of this many grammar scenes (`pool_phrasings`
    # phrasings each) held out in their mirrored wording (`prompts.scene_pool_prompts`); 0 draws
    # fresh scenes at every step, held out as other scenes.
    scene_pool=0,
    pool_phrasings=4,
  )
  # `generator`: a flux_sft export (`<workdir>/final`); `pipeline`: a diffusers FLUX folder (the
  # real world); both empty: a random tiny generator (`tiny`).
  config.model = configs_lib.flux_model()
  config.lora = dict(rank=16, alpha=32.0, targets=(), single_mlp=False)
  config.reward = dict(
    # A reward_train workdir, a SpatialScore export, or a reward_serve URL (http://host:port).
    spatial_score="",
    tiny_spatial_score=False,  # No path: a random tiny SpatialScore (smoke runs).
    remote_retry_s=300.0,  # A reward_serve URL in spatial_score: how long to retry.
    oracle=True,  # The scene oracle (synthetic prompts only).
    train_on="oracle",  # "oracle" or "spatial_score" (when every reward weight is 0).
    batch_size=64,  # SpatialScore sequences per compiled call.
    **configs_lib.grpo_reward_mix(),
  )
  config.sampling = configs_lib.grpo_sampling(10)
  config.grpo = dict(
    prompts_per_step=4,
    group_size=8,
    topk=2,  # Keep the top-k and bottom-k of each group; None or 0 keeps all (Flow-GRPO).
    stats="kept",  # Normalise with the kept samples' statistics (the paper) or "group".
    std="group",  # Per-group std, or "global".
    adv_eps=1e-4,
    adv_clip=5.0,
    noise_level=0.7,  # Flow-GRPO's `a`.
    same_initial_noise=False,  # One initial noise per group (DanceGRPO's --init_same_noise).
    timestep_fraction=1.0,  # Of the stochastic steps, the first fraction is trained.
    clip_range=1e-4,
    beta=0.01,
    kl_form="flow_grpo",  # Flow-GRPO's KL (std without sqrt(dt)); "exact": the Gaussian KL.
    kl_target="mean",  # The KL of the step means, or "velocity": 0.5 mean((v - v_ref)^2).
    ratio_norm=False,  # GRPO-Guard's ratio normalisation and per-step gradient reweight.
  )
  config.train = dict(
    # Divergence guard: a save (or resume) with a |weight| beyond this stops the run; 0: off.
    max_abs_param=1e4,
    steps=60,
    lr=3e-4,
    weight_decay=1e-4,
    grad_clip=1.0,
    num_minibatches=2,  # Optimizer updates per rollout (on disjoint halves of the kept samples).
    ema_decay=0.0,
    early_stop=configs_lib.early_stop(),
    checkpoint_every=20,
    keep_checkpoints=2,
  )
  # num_long_prompts: also hold out this many full-grammar prompts with several relations
  # (`eval_long/`): what training on short scenes (`simple`) carries over to long prompts.
  config.eval = dict(every_steps=20, num_prompts=32, num_steps=20, seed=0, num_long_prompts=0)
  config.log_every_secs = 30.0

  if arg.simple or arg.pool:
    config.data.synthetic.update(max_objects=2, max_relations=1)
    config.grpo.update(prompts_per_step=8, group_size=16, topk=4, same_initial_noise=True)
    config.sampling.sde_window = (0, 4)
    # Held-out relations peak near step 80 at this lr; past it the images degrade (docs/results/grpo_synthetic.md).
    config.train.update(steps=80, lr=1e-3, num_minibatches=1)
    config.eval.update(every_steps=20, num_prompts=128)
  if arg.pool:
    config.data.update(scene_pool=arg.pool, pool_phrasings=4)
    config.eval.num_prompts = 4 * arg.pool
  if arg.smoke:
    config.reward.tiny_spatial_score = True
    config.sampling.update(num_steps=3, cfg_scale=4.0)  # The random generator has no default.
    if config.sampling.sde_window:
      config.sampling.sde_window = (0, 2)  # Within the 3 steps.
    config.grpo.update(prompts_per_step=2, group_size=8, topk=2)
    config.train.update(steps=2, checkpoint_every=1, num_minibatches=1)
    config.eval.update(every_steps=0, num_prompts=4, num_steps=2)
  return config
