r"""SpatialScore in the synthetic world: the embedded default, trained from scratch on CPU.

Builds synthetic preference pairs into `<workdir>/pairs` (unless `config.data.pairs`
names a pairs folder), then trains the tiny Qwen2.5-VL architecture + `<reward>` token
+ Gaussian head with the Gaussian Bradley-Terry loss, evaluating held-out pairwise
accuracy as it goes. Resumes from the workdir's latest checkpoint.

  python -m spatial_jax.main --config configs/reward_synthetic.py --workdir workdirs/reward
  python -m spatial_jax.main --config configs/reward_synthetic.py:smoke --workdir /tmp/r
"""

from spatial_jax import configs_lib


def get_config(arg=None):
  arg = configs_lib.parse_arg(arg, smoke=False)
  config = configs_lib.base_config("reward_train")

  config.data = dict(
    pairs="",  # A pairs folder; empty: build synthetic pairs into <workdir>/pairs.
    train_split="train",
    eval_split="test",
    image_size=32,
    max_length=96,  # Tokens per sequence: prompt words + 16 image tokens + specials.
    synthetic=dict(
      num_train=20_000,
      num_test=2_000,
      image_size=32,
      min_objects=2,
      max_objects=4,
      max_relations=4,
      gallery_pairs=16,
      verify_with_oracle=False,
      log_every_secs=30.0,
      max_changes=1,  # Relations a rejected image reverses (configs/data_synthetic.py).
      rejected="perturbed",  # Or "other_scene": generic image-text negatives.
    ),
  )
  config.model = dict(
    pretrained="",  # A Hugging Face Qwen2.5-VL folder; empty: the synthetic world's model.
    # A trained SpatialScore (reward_train workdir or export) of this architecture to start from:
    # fine-tuning, e.g. on pairs of a generator's own images. Empty: from `pretrained` / scratch.
    init_from="",
    preset="tiny",
    # Overrides of the preset's VisionConfig / TextConfig fields.
    vision=dict(
      depth=2,
      hidden_size=64,
      intermediate_size=128,
      num_heads=4,
      out_hidden_size=64,
      fullatt_block_indexes=(1,),
      # transformers' init std is 0.02, tuned for widths near 1000; at width 64 the tower
      # learns from scratch only with about 1/sqrt(width) (docs/results/spatialscore_synthetic.md).
      initializer_range=0.125,
    ),
    text=dict(
      hidden_size=64,
      intermediate_size=128,
      num_hidden_layers=2,
      num_attention_heads=4,
      num_key_value_heads=2,
      mrope_section=(2, 3, 3),
      rope_theta=10000.0,
      initializer_range=0.125,
    ),
    dtype="float32",
    param_dtype="float32",
    remat=False,
    attention_impl="",
    trainable="all",  # From scratch; "lora" trains adapters + head + reward token only.
    lora_rank=8,
    lora_alpha=16,
    lora_targets=[],  # Empty: q/k/v/o/gate/up/down of the language model.
    head_hidden=128,
    template="synthetic",  # or "synthetic_text_first"
    instruction="",
  )
  config.loss = "gaussian_mc"
  config.mc_samples = 64
  config.train = dict(
    # Divergence guard: a save (or resume) with a |weight| beyond this stops the run; 0: off.
    max_abs_param=1e4,
    # Loss guard: a logged loss beyond this times the median of the recent ones stops; 0: off.
    max_loss_ratio=100.0,
    steps=2200,  # ~19 minutes on a 2-core CPU, after ~0.5-1 minute building the pairs.
    batch_size=32,
    lr=2e-3,
    warmup_steps=200,
    end_lr_fraction=0.05,
    weight_decay=0.01,
    grad_clip=1.0,
    grad_accum_steps=1,
    # Four rows per pair: also the mirrored pair under the perturbed prompt, and each image
    # preferring its own prompt over the other (weight `text_contrast_weight`).
    perturbed_pairs=True,
    text_contrast_weight=1.0,
    # The colour-grounding auxiliary (reward.grounding): without it the tiny model trained
    # from scratch stays at chance.
    grounding_weight=1.0,
    # Each image token predicts its own place through the grounding head (grounding.py).
    grounding_image_weight=1.0,
    checkpoint_every=500,
    keep_checkpoints=2,
  )
  config.eval = dict(batch_size=64, max_pairs=2000)
  config.log_every_steps = 20
  # Four points of the held-out curve (each evaluation of the 2,000 pairs takes ~5 s of the
  # 20-minute budget); the quickstart evaluates 512 pairs every 250 steps.
  config.eval_every_steps = 550
  config.log_every_secs = 30.0

  if arg.smoke:
    config.data.synthetic.num_train = 64
    config.data.synthetic.num_test = 16
    config.model.vision = dict(depth=2, hidden_size=32, intermediate_size=48, num_heads=4)
    config.model.text = dict(num_hidden_layers=1)
    config.model.head_hidden = 16
    config.train.steps = 4
    config.train.batch_size = 8
    config.train.warmup_steps = 1
    config.train.checkpoint_every = 2
    config.eval.batch_size = 8
    config.eval.max_pairs = 16
    config.log_every_steps = 1
    config.eval_every_steps = 2
  return config
