"""FLUX transformer: our jitted JAX model vs diffusers (PyTorch eager), same run.

Both use the same random weights (saved once by diffusers, read by our `from_pretrained`) and
the same rank-32 LoRA (ours, exported and loaded into diffusers with `load_lora_weights`), run
the same batch in the same dtype, and are timed after warm-up:

- forward: the transformer's output (`torch.no_grad` for diffusers);
- forward + backward: gradients of mean(out^2) w.r.t. the LoRA parameters only (the base is
  frozen in both).

The ratios ours / PyTorch are printed (below 1.0: ours is faster).

  python benchmarks/flux_transformer.py                     # small: CPU, fp32
  python benchmarks/flux_transformer.py --size dev --dtype bfloat16 --batch 1 \\
      --grid 64 64 --text 512 --attention cudnn --remat dots_saveable   # a GPU

Requires the `test` extra (torch, diffusers, peft).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
from diffusers import FluxPipeline, FluxTransformer2DModel
from flax import nnx
from timing import compare, environment, warn_if_busy

from spatial_jax import lora
from spatial_jax.models.flux import FluxConfig, params

SIZES = {
  # A small but real shape: 3 heads x 128, 4 double + 8 single blocks, FLUX's widths otherwise.
  "small": dict(num_layers=4, num_single_layers=8, num_attention_heads=3),
  "dev": dict(),  # FLUX.1-dev: 19 + 38 blocks, 24 heads x 128.
}


def _inputs(config: FluxConfig, batch: int, grid: tuple[int, int], text: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  ids = np.zeros((*grid, 3), np.float32)
  ids[..., 1] = np.arange(grid[0])[:, None]
  ids[..., 2] = np.arange(grid[1])[None, :]
  return dict(
    hidden_states=rng.standard_normal((batch, grid[0] * grid[1], config.in_channels), np.float32),
    encoder_hidden_states=rng.standard_normal(
      (batch, text, config.joint_attention_dim), np.float32
    ),
    pooled_projections=rng.standard_normal((batch, config.pooled_projection_dim), np.float32),
    timestep=np.full((batch,), 0.6, np.float32),
    guidance=np.full((batch,), 3.5, np.float32),
    img_ids=ids.reshape(-1, 3),
    txt_ids=np.zeros((text, 3), np.float32),
  )


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--size", choices=sorted(SIZES), default="small")
  parser.add_argument("--batch", type=int, default=2)
  parser.add_argument("--grid", type=int, nargs=2, default=(16, 32), help="latent tokens h w")
  parser.add_argument("--text", type=int, default=64, help="text tokens")
  parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
  parser.add_argument(
    "--attention", default=None, help="ours: None (XLA), cudnn, blockwise or tpu_flash"
  )
  parser.add_argument("--remat", default="none", help="ours: a FluxConfig.remat policy")
  parser.add_argument("--rank", type=int, default=params.DEFAULT_LORA_RANK)
  parser.add_argument("--repeats", type=int, default=10)
  parser.add_argument("--json", help="append the result as one JSON line to this file")
  args = parser.parse_args()
  warn_if_busy()

  device = "cuda" if torch.cuda.is_available() else "cpu"
  torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
  config = FluxConfig.flux1_dev(**SIZES[args.size])
  torch.manual_seed(0)
  reference = FluxTransformer2DModel(**config.to_hf_config()).to(torch_dtype).eval()
  reference.requires_grad_(False)

  with tempfile.TemporaryDirectory() as folder:
    reference.save_pretrained(folder)
    ours = params.from_pretrained(
      folder, dtype=args.dtype, attention_impl=args.attention, remat=args.remat
    )
  lora.apply_lora(
    ours,
    rank=args.rank,
    alpha=2.0 * args.rank,
    targets=params.DEFAULT_LORA_TARGETS,
    rngs=nnx.Rngs(0),
  )
  for layer in lora.lora_layers(ours).values():  # Non-zero B, so the adapter does something.
    layer.lora_b[...] = jnp.full(layer.lora_b.shape, 1e-3, layer.lora_b.dtype)
  with tempfile.TemporaryDirectory() as adapter:
    params.export_lora(ours, adapter)
    pipe = FluxPipeline(None, None, None, None, None, None, transformer=reference)
    pipe.load_lora_weights(adapter)
  reference = reference.to(device)
  lora_params = [p for n, p in reference.named_parameters() if "lora_" in n]
  for p in lora_params:
    p.requires_grad_(True)

  batch = _inputs(config, args.batch, tuple(args.grid), args.text)
  states = ("hidden_states", "encoder_hidden_states", "pooled_projections")
  t_batch = {
    k: torch.from_numpy(v).to(device, torch_dtype if k in states else torch.float32)
    for k, v in batch.items()
  }
  j_batch = {k: jnp.asarray(v) for k, v in batch.items()}

  def sync():
    if device == "cuda":
      torch.cuda.synchronize()

  def torch_forward():
    with torch.no_grad():
      out = reference(**t_batch, return_dict=False)[0]
    sync()
    return out

  def torch_backward():
    for p in lora_params:
      p.grad = None
    out = reference(**t_batch, return_dict=False)[0]
    out.float().square().mean().backward()
    sync()

  graphdef, trainable, frozen = nnx.split(ours, nnx.LoRAParam, ...)
  forward = jax.jit(lambda t, f, b: nnx.merge(graphdef, t, f)(**b))

  @jax.jit
  def grads(t, f, b):
    loss = lambda t: jnp.mean(jnp.square(nnx.merge(graphdef, t, f)(**b).astype(jnp.float32)))  # noqa: E731
    return jax.grad(loss)(t)

  def ours_forward():
    return jax.block_until_ready(forward(trainable, frozen, j_batch))

  def ours_backward():
    return jax.block_until_ready(grads(trainable, frozen, j_batch))

  expected = torch_forward().float().cpu().numpy()
  diff = float(np.abs(np.asarray(ours_forward(), np.float32) - expected).max())
  forward_times = compare(ours_forward, torch_forward, args.repeats)
  backward_times = compare(ours_backward, torch_backward, args.repeats)
  result = dict(
    size=args.size,
    batch=args.batch,
    image_tokens=args.grid[0] * args.grid[1],
    text_tokens=args.text,
    dtype=args.dtype,
    lora_rank=args.rank,
    remat=args.remat,
    attention=args.attention or "xla",
    repeats=args.repeats,
    jax_device=str(jax.devices()[0].device_kind),
    torch_device=torch.cuda.get_device_name()
    if device == "cuda"
    else platform.processor() or "cpu",
    environment=environment(torch),
    forward=forward_times,
    fwd_bwd=backward_times,
    max_abs_output_diff=diff,
    output_scale=float(np.abs(expected).max()),
    date=time.strftime("%Y-%m-%d"),
    host=f"{platform.node()} ({os.cpu_count()} cpus)",
  )
  print(json.dumps(result, indent=2))
  if args.json:
    with open(args.json, "a") as f:
      f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
  main()
