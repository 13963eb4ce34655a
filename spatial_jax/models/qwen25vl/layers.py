"""Building blocks shared by the Qwen2.5-VL vision tower and language model.

Module attribute names follow the Hugging Face module names (`gate_proj`, `weight`,
...), so the checkpoint key map in `params.py` is mechanical: an HF `[out, in]`
weight is our `[in, out]` kernel.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from spatial_jax.models import attention as shared_attention
from spatial_jax.models.common import HasDtypes, activation, linear


def dtype_of(name: str) -> jnp.dtype:
  return jnp.dtype(name)


class RMSNorm(nnx.Module):
  """Qwen2 RMSNorm: normalise in fp32, cast back to the input dtype, THEN scale.

  The order matters for bf16 parity: transformers multiplies by `weight` after the
  cast (qwen25vl_reward.md §3.1).
  """

  def __init__(self, dim: int, *, eps: float, param_dtype: str):
    self.eps = eps
    self.weight = nnx.Param(
      nnx.with_partitioning(nnx.initializers.ones_init(), ("norm",))(
        jax.random.key(0), (dim,), dtype_of(param_dtype)
      )
    )

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    variance = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
    normed = (x32 * jax.lax.rsqrt(variance + self.eps)).astype(x.dtype)
    return self.weight[...].astype(x.dtype) * normed


class GatedMLP(nnx.Module):
  """SwiGLU feed-forward: down(act(gate(x)) * up(x))."""

  def __init__(
    self,
    dim: int,
    hidden: int,
    *,
    act: str,
    use_bias: bool,
    config: HasDtypes,
    rngs: nnx.Rngs,
    init_std: float,
  ):
    kw = dict(use_bias=use_bias, init_std=init_std)
    self.gate_proj = linear(dim, hidden, ("embed", "mlp"), config, rngs, **kw)
    self.up_proj = linear(dim, hidden, ("embed", "mlp"), config, rngs, **kw)
    self.down_proj = linear(hidden, dim, ("mlp", "embed"), config, rngs, **kw)
    self.act = activation(act)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


def rotate_half(x: jax.Array) -> jax.Array:
  """GPT-NeoX rotation: (x1, x2) -> (-x2, x1) over the two halves of the last dim."""
  x1, x2 = jnp.split(x, 2, axis=-1)
  return jnp.concatenate([-x2, x1], axis=-1)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """x * cos + rotate_half(x) * sin, with cos/sin broadcast over the heads axis."""
  return x * cos + rotate_half(x) * sin


def attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  *,
  mask: jax.Array | None = None,
  is_causal: bool = False,
  implementation: str | None = None,
) -> jax.Array:
  """Scaled dot-product attention on (B, T, N, H) arrays; GQA when k/v have fewer heads.

  With no `implementation` the softmax runs in fp32 whatever the input dtype, as transformers'
  eager path does; the others ("xla", "einsum", "cudnn", "blockwise", "tpu_flash") are
  `models/attention.py`'s ("einsum" is this computation on a layout XLA's CPU backend runs
  faster).
  """
  scale = q.shape[-1] ** -0.5
  if implementation is not None:
    return shared_attention.attention(
      q, k, v, mask=mask, is_causal=is_causal, scale=scale, implementation=implementation
    )
  groups = q.shape[2] // k.shape[2]
  if groups > 1:
    k = jnp.repeat(k, groups, axis=2)
    v = jnp.repeat(v, groups, axis=2)
  logits = jnp.einsum("btnh,bsnh->bnts", q, k).astype(jnp.float32) * scale
  if is_causal:
    t, s = logits.shape[-2:]
    causal = jnp.tril(jnp.ones((t, s), dtype=bool))
    mask = causal if mask is None else jnp.logical_and(mask, causal)
  if mask is not None:
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum("bnts,bsnh->btnh", probs, v)


def heads_split(x: jax.Array, num_heads: int) -> jax.Array:
  """(..., N*H) -> (..., N, H)."""
  return x.reshape(*x.shape[:-1], num_heads, x.shape[-1] // num_heads)


def heads_merge(x: jax.Array) -> jax.Array:
  """(..., N, H) -> (..., N*H)."""
  return x.reshape(*x.shape[:-2], x.shape[-2] * x.shape[-1])


def remat_call(module: nnx.Module, *args: Any) -> Any:
  """`module(*args)` under `jax.checkpoint`: only the inputs are kept for the backward pass.

  A pure split/merge around `jax.checkpoint` (the layers hold no mutable state) rather than
  `nnx.remat`, which writes Variables back and fails with a TraceContextError when the module's
  params (e.g. LoRA adapters merged inside `jax.grad`) are traced at another level.
  """
  graphdef, state = nnx.split(module)

  def run(state, *args):
    return nnx.merge(graphdef, state)(*args)

  return jax.checkpoint(run)(state, *args)
