"""Qwen2.5-VL forward: our jitted JAX model vs transformers (PyTorch eager), same run.

Both load the same random weights (saved once with transformers, read by our
`from_pretrained`), run the same batch in the same dtype, and are timed after warm-up;
the ratio ours / PyTorch is printed (below 1.0: ours is faster).

  python benchmarks/qwen25vl_forward.py                      # small: CPU, fp32
  python benchmarks/qwen25vl_forward.py --size 7b --dtype bfloat16 --batch 8   # on a GPU

Requires the `test` extra (torch, transformers).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time

import jax
import numpy as np
import torch
from flax import nnx
from timing import compare, environment, warn_if_busy
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from spatial_jax.models.qwen25vl import params, prepare_inputs

SIZES = {
  # A small but real shape: 448x448 images -> 1024 patches, 256 language tokens each.
  "small": dict(
    text=dict(
      hidden_size=512,
      intermediate_size=1376,
      num_hidden_layers=8,
      num_attention_heads=8,
      num_key_value_heads=2,
      vocab_size=8192,
      rope_parameters=dict(rope_type="default", mrope_section=[8, 12, 12], rope_theta=1e6),
    ),
    vision=dict(
      depth=8,
      hidden_size=512,
      intermediate_size=1376,
      num_heads=8,
      out_hidden_size=512,
      fullatt_block_indexes=[3, 7],
    ),
  ),
  # Qwen2.5-VL-7B (qwen25vl_reward.md §3.7), random weights.
  "7b": dict(
    text=dict(
      hidden_size=3584,
      intermediate_size=18944,
      num_hidden_layers=28,
      num_attention_heads=28,
      num_key_value_heads=4,
      vocab_size=152064,
      rope_parameters=dict(rope_type="default", mrope_section=[16, 24, 24], rope_theta=1e6),
    ),
    vision=dict(
      depth=32,
      hidden_size=1280,
      intermediate_size=3420,
      num_heads=16,
      out_hidden_size=3584,
      fullatt_block_indexes=[7, 15, 23, 31],
    ),
  ),
}
IMAGE_TOKEN = 151655


def _config(size: str) -> Qwen2_5_VLConfig:
  spec = SIZES[size]
  return Qwen2_5_VLConfig(
    text_config=dict(spec["text"], rms_norm_eps=1e-6, bos_token_id=0, eos_token_id=1),
    vision_config=dict(spec["vision"], patch_size=14, spatial_merge_size=2, window_size=112),
    image_token_id=IMAGE_TOKEN if spec["text"]["vocab_size"] > IMAGE_TOKEN else 4,
    video_token_id=5,
    vision_start_token_id=6,
    vision_end_token_id=7,
    tie_word_embeddings=False,
  )


def _batch(config, batch: int, image: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  grid = [1, image // 14, image // 14]
  tokens = grid[1] * grid[2] // 4
  vocab = config.text_config.vocab_size
  prompt = list(rng.integers(8, min(vocab, 4000), size=24))
  row = prompt[:8] + [6] + [config.image_token_id] * tokens + [7] + prompt[8:]
  ids = np.array([row] * batch, np.int64)
  mask = np.ones_like(ids)
  pixels = rng.normal(size=(batch * grid[0] * grid[1] * grid[2], 3 * 2 * 14 * 14))
  return ids, mask, pixels.astype(np.float32), np.array([grid] * batch, np.int64)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--size", choices=sorted(SIZES), default="small")
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--image", type=int, default=448)
  parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
  parser.add_argument("--attention", default=None, help="ours: attention_impl (None: eager)")
  parser.add_argument("--repeats", type=int, default=10)
  parser.add_argument("--json", help="append the result as one JSON line to this file")
  args = parser.parse_args()
  warn_if_busy()

  device = "cuda" if torch.cuda.is_available() else "cpu"
  torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
  config = _config(args.size)
  torch.manual_seed(0)
  reference = Qwen2_5_VLForConditionalGeneration(config).to(torch_dtype).eval()
  ids, mask, pixels, grid = _batch(config, args.batch, args.image)

  with tempfile.TemporaryDirectory() as folder:
    reference.save_pretrained(folder)
    ours = params.from_pretrained(folder, dtype=args.dtype, attention_impl=args.attention)
  reference = reference.to(device)

  t_ids, t_mask = torch.from_numpy(ids).to(device), torch.from_numpy(mask).to(device)
  t_pixels = torch.from_numpy(pixels).to(device, torch_dtype)
  t_grid = torch.from_numpy(grid).to(device)
  t_types = (t_ids == config.image_token_id).long()

  def run_torch():
    with torch.no_grad():
      out = reference(
        input_ids=t_ids,
        attention_mask=t_mask,
        pixel_values=t_pixels,
        image_grid_thw=t_grid,
        mm_token_type_ids=t_types,
      ).logits
    if device == "cuda":
      torch.cuda.synchronize()
    return out

  graphdef, state = nnx.split(ours)
  forward = jax.jit(lambda s, x: nnx.merge(graphdef, s).forward(x).logits)
  inputs = prepare_inputs(ours.config, ids, mask, pixels, grid)

  def run_ours():
    return jax.block_until_ready(forward(state, inputs))

  def run_ours_with_prep():
    x = prepare_inputs(ours.config, ids, mask, pixels, grid)
    return jax.block_until_ready(forward(state, x))

  diff = float(np.abs(np.asarray(run_ours(), np.float32) - run_torch().float().cpu().numpy()).max())
  times = compare(run_ours, run_torch, args.repeats)
  times_with_prep = compare(run_ours_with_prep, run_torch, args.repeats)
  result = dict(
    size=args.size,
    batch=args.batch,
    image=args.image,
    dtype=args.dtype,
    attention=args.attention or "eager",
    repeats=args.repeats,
    jax_device=str(jax.devices()[0].device_kind),
    torch_device=torch.cuda.get_device_name()
    if device == "cuda"
    else platform.processor() or "cpu",
    environment=environment(torch),
    forward=times,
    forward_with_host_prep=times_with_prep,
    max_abs_logit_diff=diff,
    date=time.strftime("%Y-%m-%d"),
    host=f"{platform.node()} ({os.cpu_count()} cpus)",
  )
  print(json.dumps(result, indent=2))
  if args.json:
    with open(args.json, "a") as f:
      f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
  main()
