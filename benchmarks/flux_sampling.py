"""Text-to-image sampling: our `spatial_jax.diffusion.FluxPipeline` vs diffusers' `FluxPipeline`.

Both load the same small random pipeline (built offline by diffusers and saved once; ours reads
the folder with `from_pretrained`), sample the same prompts from the same packed latents with the
same steps, and are timed after a warm-up run (compilation excluded). Prints images per second
and the ratio of times ours / diffusers (below 1.0: ours is faster).

  python benchmarks/flux_sampling.py                 # CPU, fp32, from the repository root

Requires the `test` extra (torch, transformers, diffusers); the offline tokenizers come from the
test helpers in tests/diffusion.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

import jax
import numpy as np
import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
from diffusers import FluxPipeline as DiffusersFluxPipeline
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests", "diffusion"))
import tiny_flux_pipeline as tiny  # noqa: E402
from timing import compare, environment, warn_if_busy  # noqa: E402  (benchmarks/)

from spatial_jax.diffusion import FluxPipeline  # noqa: E402

PROMPTS = ("a red cube left of a blue sphere", "two green cats on the blue cube")


def small_pipeline(seed: int = 0) -> DiffusersFluxPipeline:
  """FLUX's layout at a small size: 3 heads x 128 (hidden 384), 4 double + 8 single blocks,
  16 latent channels, a 4-level VAE (x8), 2-layer CLIP and T5 encoders."""
  torch.manual_seed(seed)
  tokenizer, tokenizer_2 = tiny.clip_tokenizer(), tiny.t5_tokenizer()
  transformer = FluxTransformer2DModel(
    in_channels=64,
    num_layers=4,
    num_single_layers=8,
    attention_head_dim=128,
    num_attention_heads=3,
    joint_attention_dim=256,
    pooled_projection_dim=128,
    guidance_embeds=True,
  )
  text_encoder = CLIPTextModel(
    CLIPTextConfig(
      hidden_size=128,
      intermediate_size=512,
      num_attention_heads=4,
      num_hidden_layers=2,
      vocab_size=len(tokenizer),
      projection_dim=128,
      max_position_embeddings=tiny.CLIP_LENGTH,
      bos_token_id=tokenizer.bos_token_id,
      eos_token_id=tokenizer.eos_token_id,
      pad_token_id=tokenizer.pad_token_id,
      hidden_act="quick_gelu",
    )
  )
  text_encoder_2 = T5EncoderModel(
    T5Config(
      d_model=256,
      d_kv=64,
      d_ff=512,
      num_layers=2,
      num_heads=4,
      vocab_size=len(tokenizer_2),
      feed_forward_proj="gated-gelu",
    )
  )
  vae = AutoencoderKL(
    block_out_channels=(32, 64, 64, 64),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=1,
    latent_channels=16,
    norm_num_groups=32,
    use_quant_conv=False,
    use_post_quant_conv=False,
    shift_factor=0.1159,
    scaling_factor=0.3611,
  )
  for module in (transformer, text_encoder, text_encoder_2, vae):
    tiny._randomize(module, 0.02)
  return DiffusersFluxPipeline(
    scheduler=FlowMatchEulerDiscreteScheduler(**tiny.SCHEDULER),
    vae=vae.eval(),
    text_encoder=text_encoder.eval(),
    tokenizer=tokenizer,
    text_encoder_2=text_encoder_2.eval(),
    tokenizer_2=tokenizer_2,
    transformer=transformer.eval(),
  )


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--size", type=int, default=256, help="image height and width")
  parser.add_argument("--steps", type=int, default=4)
  parser.add_argument("--text", type=int, default=64, help="T5 tokens (max_sequence_length)")
  parser.add_argument("--attention", default=None, help="ours: the transformer's attention_impl")
  parser.add_argument("--repeats", type=int, default=10)
  parser.add_argument("--json", help="append the result as one JSON line to this file")
  args = parser.parse_args()
  warn_if_busy()

  reference = small_pipeline()
  with tempfile.TemporaryDirectory() as folder:
    reference.save_pretrained(folder)
    ours = FluxPipeline.from_pretrained(
      folder, max_sequence_length=args.text, attention_impl=args.attention
    )

  latent = args.size // 8
  rng = np.random.default_rng(0)
  packed = rng.standard_normal((len(PROMPTS), (latent // 2) ** 2, 64)).astype(np.float32)
  kwargs = dict(height=args.size, width=args.size, num_inference_steps=args.steps)

  def run_ours():
    return np.asarray(ours(list(PROMPTS), guidance_scale=3.5, latents=packed, **kwargs))

  def run_diffusers():
    with torch.no_grad():
      return reference(
        list(PROMPTS),
        guidance_scale=3.5,
        latents=torch.from_numpy(packed),
        output_type="np",
        max_sequence_length=args.text,
        **kwargs,
      ).images

  diff = float(np.abs(run_ours() - run_diffusers()).max())
  times = compare(run_ours, run_diffusers, args.repeats)
  result = dict(
    image=args.size,
    batch=len(PROMPTS),
    steps=args.steps,
    text_tokens=args.text,
    attention=args.attention or "xla",
    repeats=args.repeats,
    jax_device=str(jax.devices()[0].device_kind),
    environment=environment(torch),
    sampling=times,
    ours_images_per_s=round(len(PROMPTS) / times["ours_s"]["median"], 3),
    diffusers_images_per_s=round(len(PROMPTS) / times["reference_s"]["median"], 3),
    max_abs_pixel_diff=diff,
    date=time.strftime("%Y-%m-%d"),
    host=f"{platform.node()} ({os.cpu_count()} cpus)",
  )
  print(json.dumps(result, indent=2))
  if args.json:
    with open(args.json, "a") as f:
      f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
  main()
