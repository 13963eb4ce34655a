"""A tiny random diffusers FluxPipeline, built offline (flux.md §14), for pipeline parity tests.

Sizes follow diffusers' own FLUX pipeline test (transformer, CLIP, VAE) with two changes that
make the test stricter: a 2-level VAE (scale factor 2, so unpacking and the latent grid size are
exercised) and CLIP with 16 positions instead of 77. Both tokenizers are built in memory from
tiny vocabularies (nothing is downloaded) and round-trip through `save_pretrained`.
"""

from __future__ import annotations

import string

import torch
from diffusers import (
  AutoencoderKL,
  FlowMatchEulerDiscreteScheduler,
  FluxPipeline,
  FluxTransformer2DModel,
)
from transformers import (
  CLIPTextConfig,
  CLIPTextModel,
  CLIPTokenizer,
  T5Config,
  T5EncoderModel,
  T5TokenizerFast,
)

WORDS = ("a", "red", "cube", "left", "of", "blue", "sphere", "two", "green", "cats", "on", "the")
CLIP_LENGTH = 16

# FLUX.1-dev's scheduler_config.json (flux.md §8).
SCHEDULER = dict(
  num_train_timesteps=1000,
  shift=3.0,
  use_dynamic_shifting=True,
  base_shift=0.5,
  max_shift=1.15,
  base_image_seq_len=256,
  max_image_seq_len=4096,
)


def clip_tokenizer() -> CLIPTokenizer:
  """Byte-level BPE as CLIP's: letters (word-final ones end in `</w>`), merges that build the
  words of WORDS, and `<|startoftext|>`, `<|endoftext|>` last (the largest ids, as in CLIP)."""
  vocab: dict[str, int] = {}
  for c in string.ascii_lowercase:
    vocab.setdefault(c, len(vocab))
    vocab.setdefault(c + "</w>", len(vocab))
  merges: list[tuple[str, str]] = []
  for word in WORDS:
    symbols = list(word[:-1]) + [word[-1] + "</w>"]
    merged = symbols[0]
    for symbol in symbols[1:]:
      if (merged, symbol) not in merges:
        merges.append((merged, symbol))
      merged += symbol
      vocab.setdefault(merged, len(vocab))
  vocab["<|startoftext|>"] = len(vocab)
  vocab["<|endoftext|>"] = len(vocab)
  return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=CLIP_LENGTH)


def t5_tokenizer() -> T5TokenizerFast:
  """Unigram with Metaspace as T5's: `<pad>`=0, `</s>`=1, `<unk>`=2, whole words, letters."""
  pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
  pieces += [("▁" + w, -3.0) for w in WORDS]
  pieces += [(c, -5.0) for c in string.ascii_lowercase]
  return T5TokenizerFast(vocab=pieces, extra_ids=0)


def _randomize(module: torch.nn.Module, std: float) -> None:
  """Every weight random, norm scales around 1: a swapped or transposed tensor shows."""
  with torch.no_grad():
    for name, p in module.named_parameters():
      is_scale = p.ndim == 1 and ("norm" in name or "layer_norm" in name) and "bias" not in name
      p.copy_((1.0 if is_scale else 0.0) + std * torch.randn_like(p))


def diffusers_pipeline(*, guidance_embeds: bool, seed: int = 0) -> FluxPipeline:
  torch.manual_seed(seed)
  tokenizer, tokenizer_2 = clip_tokenizer(), t5_tokenizer()
  transformer = FluxTransformer2DModel(
    patch_size=1,
    in_channels=4,
    num_layers=1,
    num_single_layers=1,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=32,
    pooled_projection_dim=32,
    guidance_embeds=guidance_embeds,
    axes_dims_rope=[4, 4, 8],
  )
  text_encoder = CLIPTextModel(
    CLIPTextConfig(
      hidden_size=32,
      intermediate_size=37,
      num_attention_heads=4,
      num_hidden_layers=2,
      vocab_size=len(tokenizer),
      projection_dim=32,
      max_position_embeddings=CLIP_LENGTH,
      bos_token_id=tokenizer.bos_token_id,
      eos_token_id=tokenizer.eos_token_id,
      pad_token_id=tokenizer.pad_token_id,
      hidden_act="quick_gelu",
    )
  )
  text_encoder_2 = T5EncoderModel(
    T5Config(
      d_model=32,
      d_kv=8,
      d_ff=37,
      num_layers=2,
      num_heads=4,
      vocab_size=len(tokenizer_2),
      feed_forward_proj="gated-gelu",
      relative_attention_num_buckets=8,
      relative_attention_max_distance=16,
    )
  )
  vae = AutoencoderKL(
    sample_size=32,
    block_out_channels=(4, 8),
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    layers_per_block=1,
    latent_channels=1,
    norm_num_groups=2,
    use_quant_conv=False,
    use_post_quant_conv=False,
    shift_factor=0.0609,
    scaling_factor=1.5035,
  )
  _randomize(transformer, 0.2)
  _randomize(text_encoder, 0.2)
  _randomize(text_encoder_2, 0.2)
  _randomize(vae, 0.2)
  pipe = FluxPipeline(
    scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER),
    vae=vae.eval(),
    text_encoder=text_encoder.eval(),
    tokenizer=tokenizer,
    text_encoder_2=text_encoder_2.eval(),
    tokenizer_2=tokenizer_2,
    transformer=transformer.eval(),
  )
  pipe.set_progress_bar_config(disable=True)
  return pipe
