"""Attention alone: forward, and backward timed on its own, ours vs PyTorch's SDPA, same run.

Ours: `spatial_jax.models.attention.attention` with the default implementation
(`jax.nn.dot_product_attention`, XLA), "einsum" (heads-major einsums) and "blockwise", jitted. PyTorch: `torch.nn.functional.scaled_dot_product_attention`
(eager; its CPU kernel is a fused flash-style one). The default shape is the FLUX transformer
benchmark's joint attention (batch 2, 3 heads x 128, 64 text + 512 image tokens), the part of
that benchmark's backward that no other benchmark isolates.

- forward: the attention output;
- backward: the gradients w.r.t. q, k and v from a saved forward (ours: the jitted VJP of a
  forward computed before the timer starts; PyTorch: `out.backward(grad)` after an untimed
  forward with autograd on).

Each ratio is the median of >= 10 alternating repeats with its 25th-75th percentile range
(`timing.compare`).

  python benchmarks/attention.py --repeats 20
  python benchmarks/attention.py --seq 4608 --heads 24 --batch 1   # FLUX.1-dev at 1024 px
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np
import torch
from timing import compare, environment, warn_if_busy

from spatial_jax.models import attention


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--batch", type=int, default=2)
  parser.add_argument("--heads", type=int, default=3)
  parser.add_argument("--head-dim", type=int, default=128)
  parser.add_argument("--seq", type=int, default=576)
  parser.add_argument("--repeats", type=int, default=20)
  parser.add_argument(
    "--impls", nargs="+", default=["default", "einsum", "blockwise"], help="default: None"
  )
  args = parser.parse_args()
  warn_if_busy()

  rng = np.random.default_rng(0)
  shape = (args.batch, args.seq, args.heads, args.head_dim)  # (B, T, N, H): ours' layout
  q, k, v, grad = (rng.standard_normal(shape).astype(np.float32) for _ in range(4))
  tq, tk, tv, tgrad = (torch.from_numpy(x.transpose(0, 2, 1, 3).copy()) for x in (q, k, v, grad))

  def torch_forward():
    with torch.no_grad():
      return torch.nn.functional.scaled_dot_product_attention(tq, tk, tv)

  def torch_saved_forward():
    leaves = [x.clone().requires_grad_(True) for x in (tq, tk, tv)]
    return torch.nn.functional.scaled_dot_product_attention(*leaves)

  def torch_backward(out):
    out.backward(tgrad)

  results = dict(
    shape=dict(batch=args.batch, heads=args.heads, head_dim=args.head_dim, seq=args.seq),
    repeats=args.repeats,
    environment=environment(torch),
  )
  reference = torch_forward().numpy().transpose(0, 2, 1, 3)
  jq, jk, jv, jgrad = (jnp.asarray(x) for x in (q, k, v, grad))
  # A saved forward's VJP closure, applied under jit: the backward alone.
  backward = jax.jit(lambda vjp_fn, g: vjp_fn(g))
  for impl in args.impls:

    def attend(q, k, v, impl=None if impl == "default" else impl):
      return attention.attention(q, k, v, implementation=impl)

    forward = jax.jit(attend)
    out = forward(jq, jk, jv)
    _, vjp_fn = jax.vjp(attend, jq, jk, jv)

    def ours_forward(forward=forward):
      jax.block_until_ready(forward(jq, jk, jv))

    def ours_backward(_, vjp_fn=vjp_fn):
      jax.block_until_ready(backward(vjp_fn, jgrad))

    results[impl] = dict(
      max_abs_diff=float(np.abs(np.asarray(out) - reference).max()),
      forward=compare(ours_forward, torch_forward, args.repeats),
      backward=compare(
        ours_backward,
        torch_backward,
        args.repeats,
        setup_ours=lambda: None,
        setup_reference=torch_saved_forward,
      ),
    )
  print(json.dumps(results, indent=2))


if __name__ == "__main__":
  main()
