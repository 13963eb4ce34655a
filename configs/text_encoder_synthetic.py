r"""Pretrains the synthetic world's tiny T5 encoder on the scene grammar (T5-XXL's stand-in).

A parse head asks each colour word's features for its object's layout targets and, with the
default fixed readout, its colour (features of their own, `model.parse_readout`), optionally with
a masked-token head for the other words (`train.mlm_weight`, off by default, see below); see
`spatial_jax/diffusion/text_pretrain.py`. Prompts are drawn on the fly from the grammar and
encoded as FLUX reads T5 (padded to 80 tokens, no attention mask). `<workdir>/final/` is a
transformers T5 encoder folder + tokenizer; flux_sft reads it with

  python -m spatial_jax.main --config configs/text_encoder_synthetic.py --workdir workdirs/t5
  python -m spatial_jax.main --config configs/flux_sft_synthetic.py --workdir workdirs/flux_sft \
    --config.text.t5_pretrained=workdirs/t5/final
  python -m spatial_jax.main --config configs/text_encoder_synthetic.py:smoke --workdir /tmp/t5

`summary.json` holds the held-out parse-head sign accuracy, a linear probe of each object's
x / y side and a nearest-mean probe of its colour from the frozen colour-token features, for
this encoder and for flux_sft's random one. At the defaults (3,000 steps, ~3 min on 2 cores),
seeds 0 / 1 / 2: parse sign accuracy 0.997 / 0.996 / 0.993, side probe x >= 0.99 and y >= 0.985,
colour 1.00 (random T5: 0.46 / 0.48, colour 1.00).
"""

from spatial_jax import configs_lib


def get_config(arg=None):
  arg = configs_lib.parse_arg(arg, smoke=False)
  config = configs_lib.base_config("text_encoder_synthetic")

  config.data = dict(
    max_length=80,  # flux_sft's config.text.max_length: T5 states change with the padding.
    min_objects=2,
    max_objects=4,
    max_relations=4,
    eval_seed=12_345,  # The held-out prompts' stream (training draws from config.seed).
    num_eval=1024,  # Held-out prompts: half fit the probe, half score it.
  )
  # synthetic.t5_config fields: flux_sft's config.text.t5 (vocab_size follows the tokenizer).
  config.model = dict(
    t5=dict(d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4),
    # Init std of T5's relative position bias (transformers: d_model^-0.5 = 0.125). Wider makes
    # attention local from the start (text_pretrain.t5_init): at 0.125 the parse loss sits at
    # the targets' mean for the first ~800 steps.
    position_bias_std=1.0,
    # How the parse head reads the targets: "fixed", features of their own at parse_scale
    # times the layout targets and the colour one-hot; "linear", a learned head of the layout
    # alone. A generator reading the "linear" T5 neither draws the right colours nor follows
    # relations; reading the "fixed" one it does (docs/results/generator_text_encoder.md).
    parse_readout="fixed",
    parse_scale=3.0,
  )
  config.train = dict(
    # Divergence guard: a save (or resume) with a |weight| beyond this stops the run; 0: off.
    max_abs_param=1e4,
    # Loss guard: a logged loss beyond this times the median of the recent ones stops; 0: off.
    max_loss_ratio=100.0,
    # ~55 ms a step of 32 prompts on an idle 2-core CPU (~85 ms beside another job): ~3 min.
    steps=3000,
    batch_size=32,
    # At 1e-2, seeds 0 and 3 of 4 settled at a parse sign accuracy of ~0.82 (a heuristic they
    # never left; seeds 1 and 2 reached 0.99), and the generator reading such a T5 missed colours
    # and relations; at 5e-3 all four left it by step 1,500 (0.947-0.996;
    # docs/results/generator_text_encoder.md).
    lr=5e-3,
    warmup_steps=200,
    end_lr_fraction=0.05,
    weight_decay=0.01,
    grad_clip=1.0,
    # Weight of the masked-token objective; 0 turns it (and its second forward pass) off. Off
    # by default: measured over 800 steps (batch 32, lr 1e-2), it slows the parse objective it
    # shares the encoder with (held-out parse sign accuracy 0.80 without it, 0.67 at weight 0.1,
    # 0.52 at 0.5) and doubles the cost of a step. On, it also trains the other words' states.
    mlm_weight=0.0,
    mlm_rate=0.15,  # Fraction of the prompt's tokens replaced by random grammar tokens.
    checkpoint_every=1000,
    keep_checkpoints=2,
  )
  config.probe = dict(
    random_seed=1234,  # flux_sft's config.text.seed: the random T5 the probe compares against.
    ridge=1e-2,  # L2 penalty as a fraction of the mean feature variance.
  )
  config.eval_every_steps = 500  # 0: only at the end.
  config.log_every_steps = 100
  config.log_every_secs = 30.0

  if arg.smoke:
    config.data.num_eval = 32
    config.model.t5 = dict(d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4)
    # The masked-token pass on, so that smoke runs cover it.
    config.train.update(steps=4, batch_size=16, warmup_steps=1, checkpoint_every=2, mlm_weight=0.5)
    config.eval_every_steps = 2
    config.log_every_steps = 1
  return config
