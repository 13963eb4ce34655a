r"""A tiny FLUX generator for the synthetic world, trained from scratch by flow matching on CPU.

Builds synthetic pairs into `<workdir>/pairs` (unless `config.data.pairs` names a pairs folder)
and trains the FLUX architecture at a tiny size on (prompt, chosen image) at 32x32: images
through the exact pixel codec (16x16x12 latents, 64 packed tokens of 48 features), prompts
through tiny frozen random T5 / CLIP encoders. Every `gallery.every_steps` it samples held-out
prompts with the Euler ODE sampler, writes `gallery/<step>.png` (samples above their reference
renders) and the oracle's verdict on the samples. At the end, `<workdir>/final/` holds the
generator for GRPO (`generator.load_generator`). Resumes from the workdir's latest checkpoint.

  python -m spatial_jax.main --config configs/flux_sft_synthetic.py --workdir workdirs/flux_sft
  python -m spatial_jax.main --config configs/flux_sft_synthetic.py:smoke --workdir /tmp/f
  # With a T5 pretrained on the grammar (configs/text_encoder_synthetic.py) instead of a random one:
  python -m spatial_jax.main --config configs/flux_sft_synthetic.py --workdir workdirs/flux_sft_t5 \
    --config.text.t5_pretrained=workdirs/t5/final
  # T5 trained with the transformer (from random, or from t5_pretrained), exported with it:
  python -m spatial_jax.main --config configs/flux_sft_synthetic.py --workdir workdirs/flux_sft_j \
    --config.text.t5_trainable=True

On the random T5 the layouts ignore the relation words; on the T5 of
configs/text_encoder_synthetic.py (colour and place of each colour word) they follow them in
part: docs/results/generator_text_encoder.md (the quickstart trains that T5 first).

What it reaches (2-core CPU, 1.8M-parameter transformer, ~0.55 s a step of 32 images: 1500
steps in ~15 min on an idle machine; the data build takes ~2.5 min more). On 128 held-out
prompts (`configs/sample.py`, unguided), the oracle finds 91% of the prompts' objects (51% when
each image is scored against another prompt) and 36% of their relations hold (31% of the same
relations with one changed: the layout is close to chance, the headroom GRPO is for); short
prompts 41% vs 23%, long 34% vs 35%. The samples are blobs of the right colours on the right
kind of background, without clean shapes. Without the object-weighted loss (weight 1) the same
run ignores its prompt: 28% of objects found against 26% for other prompts.
"""

from spatial_jax import configs_lib


def get_config(arg=None):
  arg = configs_lib.parse_arg(arg, smoke=False)
  config = configs_lib.base_config("flux_sft")

  config.data = dict(
    pairs="",  # A pairs folder; empty: build synthetic pairs into <workdir>/pairs.
    train_split="train",
    eval_split="test",  # Gallery prompts and their reference images come from here.
    image_size=32,
    synthetic=dict(
      num_train=20_000,
      num_test=512,
      image_size=32,
      min_objects=2,
      max_objects=4,
      max_relations=4,
      layout_candidates=1,  # > 1: layouts that separate related objects most.
      gallery_pairs=16,
      verify_with_oracle=False,
      log_every_secs=30.0,
    ),
  )
  # The VAE stand-in: space-to-depth by `scale_factor` (FLUX in_channels = 4 * 3 * f^2).
  config.codec = dict(scale_factor=2, scaling_factor=1.0, shift_factor=0.0)
  # Frozen random text encoders over the synthetic tokenizer (widths set the FLUX text dims).
  config.text = dict(
    seed=1234,
    max_length=80,  # The longest grammar prompt (76 words) + <bos> + <eos>.
    t5=dict(d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4),
    clip=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4),
    # A T5 pretrained on the grammar (configs/text_encoder_synthetic.py's <workdir>/final), read
    # as a real T5 is; its sizes replace `t5` above. Empty: the random frozen T5 of `seed`.
    t5_pretrained="",
    # Train T5 with the transformer (from `t5_pretrained` or random); the export keeps it.
    t5_trainable=False,
  )
  config.model = dict(
    # A diffusers transformer/ folder to start from (e.g. an earlier run's final/transformer);
    # empty: a new model from `flux` below.
    transformer="",
    # FluxConfig fields of a new model; in_channels and the text widths follow codec and text.
    flux=dict(
      num_layers=2,
      num_single_layers=2,
      attention_head_dim=32,
      num_attention_heads=4,
      axes_dims_rope=(8, 12, 12),
      guidance_embeds=False,
    ),
    dtype="float32",
    param_dtype="float32",
    remat="none",
    attention_impl="",
    scan_layers=True,
    zero_init=True,  # adaLN-Zero (DiT) for a new model; a loaded transformer keeps its weights.
    trainable="all",  # From scratch; "lora" trains adapters on params.lora_targets() only.
    lora_rank=16,
    lora_alpha=32.0,
    lora_targets=(),  # Empty: params.lora_targets(single_mlp=lora_single_mlp).
    lora_single_mlp=False,
  )
  config.train = dict(
    # Divergence guard: a save (or resume) with a |weight| beyond this stops the run; 0: off.
    max_abs_param=1e4,
    # Loss guard: a logged loss beyond this times the median of the recent ones stops; 0: off.
    max_loss_ratio=100.0,
    steps=1500,
    batch_size=32,
    lr=1e-3,
    warmup_steps=100,
    end_lr_fraction=0.05,
    weight_decay=0.0,
    grad_clip=1.0,
    grad_accum_steps=1,
    # Adam's denominator floor. Early updates of weights whose gradient is ~0 (behind zero-init
    # layers) are lr * sign(rounding noise) at the default; a larger value damps them.
    adam_eps=1e-8,
    checkpoint_every=500,
    keep_checkpoints=2,
    timestep_sampling="logit_normal",  # or "uniform"
    logit_mean=0.0,
    logit_std=1.0,
    # Shift t towards noise by the schedule's resolution-dependent mu (as the sampler's sigmas).
    # Off here: with the pixel codec the last, low-noise steps show directly as grain in the
    # image, and the shift would move training weight away from them.
    resolution_shift=False,
    guidance=1.0,  # The guidance value fed to a model with guidance embeddings.
    # EMA of the weights, used for galleries and the export; 0 turns it off.
    ema_decay=0.999,
    # Probability of training an example on the empty prompt instead of its own, so that the
    # model also learns the unconditional velocity classifier-free guidance subtracts.
    prompt_dropout=0.1,
    # Loss weight of object pixels (palette colours) vs the background's 1: the prompt only
    # says what the objects are (see flow_matching.object_weights). 8 draws the objects as large
    # blobs; 3 draws smaller ones, closer to the renders.
    object_weight=3.0,
    # Fraction of examples trained under their pair's perturbed prompt (one relation changed):
    # mis-captioned images, as web captions mis-state relations. 0: every caption is right.
    # The quickstart sets 0.3 so that its generator follows relations only in part (at guidance
    # 2.0 seed 1 still satisfies 0.93 of one-relation scenes; docs/results/grpo_synthetic.md).
    caption_noise=0.0,
  )
  config.gallery = dict(
    every_steps=500,  # 0: only at the end.
    num_prompts=16,
    num_steps=20,
    guidance=1.0,
    # Classifier-free guidance against the empty prompt (1.0: off; the export records it as the
    # generator's default). With the object-weighted loss, unguided sampling follows the prompt
    # best (held-out relations 0.34 at 1.0, 0.32 at 2.0, 0.31 at 4.0).
    cfg_scale=1.0,
    seed=0,  # Fixed noise: galleries of different steps are comparable.
    ncols=8,
  )
  config.log_every_steps = 50
  config.log_every_secs = 30.0

  if arg.smoke:
    config.data.synthetic.update(num_train=32, num_test=8, gallery_pairs=4)
    config.text.t5 = dict(d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4)
    config.text.clip = dict(
      hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4
    )
    config.model.flux = dict(
      num_layers=1,
      num_single_layers=1,
      attention_head_dim=16,
      num_attention_heads=2,
      axes_dims_rope=(4, 4, 8),
      guidance_embeds=False,
    )
    config.train.update(steps=4, batch_size=8, warmup_steps=1, checkpoint_every=2)
    config.gallery.update(every_steps=0, num_prompts=4, num_steps=2, ncols=4)
    config.log_every_steps = 1
  return config
