"""Memory-efficient attention that compiles on every backend: blockwise with an online softmax.

`blockwise_attention` computes softmax(q k^T * scale) v one (query block, key block) tile at a
time, keeping a running max and sum per query row (FlashAttention's online softmax), so the
forward holds B * N * block_q * block_k scores at a time instead of B * N * T * S. Its backward
is a custom VJP (FlashAttention-2's): it keeps only the output and the per-row log-sum-exp and
recomputes each tile's probabilities, so training memory does not grow with T * S either.
Plain `jax.grad` through the forward's scans would store every tile's probabilities, which is
the full score matrix again.

At 1024 px FLUX's joint sequence is 512 + 4,096 tokens: XLA's attention materialises 24 heads x
4,608^2 fp32 scores per sample and layer (2 GB), the blocks 24 x 512^2 per tile.

`attention(q, k, v, implementation=...)` is the one entry point of the models:
  None / "xla"   `jax.nn.dot_product_attention` (XLA; the default);
  "einsum"       `einsum_attention`: the same on a heads-major layout, which XLA's CPU backend
                 runs 2.4x faster forward + backward (the synthetic world's published runs were
                 made with the default, so the default stays until they are re-measured);
  "cudnn"        cuDNN's fused flash attention (NVIDIA GPUs, through jax.nn.dot_product_attention);
  "blockwise"    this module's pure-JAX blockwise attention (any backend, any mask);
  "tpu_flash"    the Pallas TPU flash-attention kernel (TPUs; key-padding masks only).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = (None, "xla", "einsum", "cudnn", "blockwise", "tpu_flash")
# The models' tile for "blockwise": 512 x 512 keeps a tile's fp32 scores at 1 MB per head and the
# 1024 px FLUX sequence (4,608 tokens) at 9 x 9 tiles. Read at call time (tests shrink it).
BLOCK_Q = BLOCK_K = 512
_MASKED = float(jnp.finfo(jnp.float32).min)  # What the eager paths put in masked logits.


def _pad_to(x: jax.Array, axis: int, multiple: int) -> jax.Array:
  pad = (-x.shape[axis]) % multiple
  if not pad:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, pad)
  return jnp.pad(x, widths)


def _tile_logits(q_blk, k_blk, mask, i, j, block_q, block_k, num_keys, scale, is_causal):
  """Masked fp32 logits of tile (i, j), (B, K, G, bq, bk).

  A key masked by the caller gets `_MASKED` (as the eager path, so a row with every key masked
  averages them as it does); a padding key gets -inf, so it never counts.
  """
  s = jnp.einsum("btkgh,bskh->bkgts", q_blk, k_blk, preferred_element_type=jnp.float32) * scale
  q_pos = i * block_q + jnp.arange(block_q)
  k_pos = j * block_k + jnp.arange(block_k)
  allowed = _mask_tile(mask, i, j, block_q, block_k)
  if is_causal:
    causal = q_pos[:, None] >= k_pos[None, :]
    allowed = causal if allowed is None else jnp.logical_and(allowed, causal)
  if allowed is not None:
    s = jnp.where(allowed, s, _MASKED)
  return jnp.where(k_pos < num_keys, s, -jnp.inf)


def _mask_tile(mask, i, j, block_q, block_k):
  """The (B|1, K|1, G|1, bq|1, bk) slice of a (B|1, K|1, G|1, T|1, S) padded mask."""
  if mask is None:
    return None
  if mask.shape[-2] != 1:
    mask = jax.lax.dynamic_slice_in_dim(mask, i * block_q, block_q, axis=-2)
  return jax.lax.dynamic_slice_in_dim(mask, j * block_k, block_k, axis=-1)


def _forward(q, k, v, mask, scale, is_causal, block_q, block_k, num_keys):
  """Padded, grouped inputs q (B, Tp, K, G, H), k / v (B, Sp, K, H) -> (out, lse)."""
  b, tp, nk, g, h = q.shape
  nq_blocks, nk_blocks = tp // block_q, k.shape[1] // block_k

  def query_block(i):
    q_blk = jax.lax.dynamic_slice_in_dim(q, i * block_q, block_q, axis=1)

    def key_block(carry, j):
      m, row_sum, acc = carry
      k_blk = jax.lax.dynamic_slice_in_dim(k, j * block_k, block_k, axis=1)
      v_blk = jax.lax.dynamic_slice_in_dim(v, j * block_k, block_k, axis=1)
      s = _tile_logits(q_blk, k_blk, mask, i, j, block_q, block_k, num_keys, scale, is_causal)
      m_new = jnp.maximum(m, s.max(axis=-1))
      # Rows that have seen only padding keep m = -inf; exponents are taken from 0 there.
      m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
      p = jnp.exp(s - m_safe[..., None])
      alpha = jnp.exp(m - m_safe)
      row_sum = alpha * row_sum + p.sum(axis=-1)
      pv = jnp.einsum(
        "bkgts,bskh->bkgth", p.astype(v.dtype), v_blk, preferred_element_type=jnp.float32
      )
      acc = alpha[..., None] * acc + pv
      return (m_new, row_sum, acc), None

    init = (
      jnp.full((b, nk, g, block_q), -jnp.inf, jnp.float32),
      jnp.zeros((b, nk, g, block_q), jnp.float32),
      jnp.zeros((b, nk, g, block_q, h), jnp.float32),
    )
    (m, row_sum, acc), _ = jax.lax.scan(key_block, init, jnp.arange(nk_blocks))
    l_safe = jnp.where(row_sum > 0, row_sum, 1.0)
    out = acc / l_safe[..., None]
    lse = jnp.where(row_sum > 0, m + jnp.log(l_safe), 0.0)
    return out, lse

  out, lse = jax.lax.map(query_block, jnp.arange(nq_blocks))
  # (nq, B, K, G, bq, H) -> (B, Tp, K, G, H); (nq, B, K, G, bq) -> (B, K, G, Tp).
  out = jnp.moveaxis(out, 0, 3).reshape(b, nk, g, tp, h).transpose(0, 3, 1, 2, 4)
  lse = jnp.moveaxis(lse, 0, 3).reshape(b, nk, g, tp)
  return out.astype(q.dtype), lse


def _backward(q, k, v, mask, out, lse, d_out, scale, is_causal, block_q, block_k, num_keys):
  """FlashAttention-2's backward on the padded, grouped arrays: recomputes each tile's
  probabilities from the saved log-sum-exp; returns (dq, dk, dv) in fp32."""
  b, tp, nk, g, h = q.shape
  nq_blocks, nk_blocks = tp // block_q, k.shape[1] // block_k
  # D_i = sum_h dO_ih O_ih, the softmax backward's row term, (B, K, G, Tp).
  delta = jnp.einsum("btkgh,btkgh->bkgt", d_out.astype(jnp.float32), out.astype(jnp.float32))

  def key_block(dq, j):
    k_blk = jax.lax.dynamic_slice_in_dim(k, j * block_k, block_k, axis=1)
    v_blk = jax.lax.dynamic_slice_in_dim(v, j * block_k, block_k, axis=1)

    def query_block(carry, i):
      dk_blk, dv_blk, dq = carry
      q_blk = jax.lax.dynamic_slice_in_dim(q, i * block_q, block_q, axis=1)
      do_blk = jax.lax.dynamic_slice_in_dim(d_out, i * block_q, block_q, axis=1)
      lse_blk = jax.lax.dynamic_slice_in_dim(lse, i * block_q, block_q, axis=-1)
      delta_blk = jax.lax.dynamic_slice_in_dim(delta, i * block_q, block_q, axis=-1)
      s = _tile_logits(q_blk, k_blk, mask, i, j, block_q, block_k, num_keys, scale, is_causal)
      p = jnp.exp(s - lse_blk[..., None])  # (B, K, G, bq, bk)
      dv_blk = dv_blk + jnp.einsum("bkgts,btkgh->bskh", p, do_blk.astype(jnp.float32))
      dp = jnp.einsum("btkgh,bskh->bkgts", do_blk.astype(jnp.float32), v_blk.astype(jnp.float32))
      ds = p * (dp - delta_blk[..., None]) * scale
      dk_blk = dk_blk + jnp.einsum("bkgts,btkgh->bskh", ds, q_blk.astype(jnp.float32))
      dq_blk = jnp.einsum("bkgts,bskh->btkgh", ds, k_blk.astype(jnp.float32))
      dq = jax.lax.dynamic_update_slice_in_dim(
        dq,
        jax.lax.dynamic_slice_in_dim(dq, i * block_q, block_q, axis=1) + dq_blk,
        i * block_q,
        axis=1,
      )
      return (dk_blk, dv_blk, dq), None

    zeros = jnp.zeros((b, block_k, nk, h), jnp.float32)
    (dk_blk, dv_blk, dq), _ = jax.lax.scan(query_block, (zeros, zeros, dq), jnp.arange(nq_blocks))
    return dq, (dk_blk, dv_blk)

  dq, (dk, dv) = jax.lax.scan(key_block, jnp.zeros(q.shape, jnp.float32), jnp.arange(nk_blocks))
  # (nk_blocks, B, bk, K, H) -> (B, Sp, K, H).
  dk = jnp.moveaxis(dk, 0, 1).reshape(b, -1, nk, h)
  dv = jnp.moveaxis(dv, 0, 1).reshape(b, -1, nk, h)
  return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7, 8))
def _blockwise(q, k, v, mask, scale, is_causal, block_q, block_k, num_keys):
  return _forward(q, k, v, mask, scale, is_causal, block_q, block_k, num_keys)[0]


def _blockwise_fwd(q, k, v, mask, scale, is_causal, block_q, block_k, num_keys):
  out, lse = _forward(q, k, v, mask, scale, is_causal, block_q, block_k, num_keys)
  return out, (q, k, v, mask, out, lse)


def _blockwise_bwd(scale, is_causal, block_q, block_k, num_keys, residuals, d_out):
  q, k, v, mask, out, lse = residuals
  dq, dk, dv = _backward(
    q, k, v, mask, out, lse, d_out, scale, is_causal, block_q, block_k, num_keys
  )
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


_blockwise.defvjp(_blockwise_fwd, _blockwise_bwd)


def blockwise_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  *,
  mask: jax.Array | None = None,
  is_causal: bool = False,
  scale: float | None = None,
  block_q: int = 512,
  block_k: int = 512,
) -> jax.Array:
  """softmax(q k^T * scale) v, tile by tile, on (B, T, N, H) queries and (B, S, K, H) keys and
  values (grouped-query attention when K < N, N % K == 0).

  mask: bool, broadcastable to (B, N, T, S), True where a query may attend (e.g. a key-padding
  mask (B, 1, 1, S)). is_causal: query t attends to keys s <= t. scale: default 1/sqrt(H).
  Blocks larger than the sequence shrink to it; sequences that are not a multiple of the block
  are padded (padding keys never count, padding queries are dropped). Logits, the softmax and
  the accumulators are fp32 whatever the input dtype; the output has q's dtype.
  """
  b, t, n, h = q.shape
  s, nk = k.shape[1], k.shape[2]
  if n % nk:
    raise ValueError(f"blockwise_attention: {n} query heads are not a multiple of {nk} key heads")
  scale = h**-0.5 if scale is None else float(scale)
  block_q, block_k = min(block_q, t), min(block_k, s)
  qg = _pad_to(q.reshape(b, t, nk, n // nk, h), 1, block_q)
  kp, vp = _pad_to(k, 1, block_k), _pad_to(v, 1, block_k)
  if mask is not None:
    # (B|1, K|1, G|1, T|1, S), padded along T and S like q and k.
    mask = _grouped_mask(mask, n, nk)
    if mask.shape[-2] != 1:
      mask = _pad_to(mask, 3, block_q)
    mask = _pad_to(mask, 4, block_k)
  out = _blockwise(qg, kp, vp, mask, scale, bool(is_causal), block_q, block_k, s)
  return out[:, :t].reshape(b, t, n, h)


def _grouped_mask(mask, n, nk):
  """A mask broadcastable to (B, N, T, S) as (B|1, K|1, G|1, T|1, S) for N = K * G heads."""
  mask = jnp.asarray(mask, bool)
  mask = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
  grouped = mask.shape[1] == n
  return mask.reshape(
    mask.shape[0], nk if grouped else 1, n // nk if grouped else 1, *mask.shape[2:]
  )


def einsum_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  *,
  mask: jax.Array | None = None,
  is_causal: bool = False,
  scale: float | None = None,
) -> jax.Array:
  """softmax(q k^T * scale) v with the whole score matrix, on (B, T, N, H) / (B, S, K, H) arrays
  (grouped-query when K < N).

  The einsums run on a heads-major layout, (B, K, G * T, H), so that each is a plain batched
  matmul: with the heads in the middle (`jax.nn.dot_product_attention`'s layout), or a separate
  group axis, XLA's CPU backend transposes around the dots, and the forward + backward of FLUX's
  attention takes 2.4x as long (benchmarks/attention.py). Logits and softmax are fp32, the
  probabilities are cast to v's dtype for the second einsum (transformers' eager path). A masked
  key gets the fp32 minimum, so a row with every key masked averages them, as the eager path does.
  """
  b, t, n, h = q.shape
  nk = k.shape[2]
  if n % nk:
    raise ValueError(f"einsum_attention: {n} query heads are not a multiple of {nk} key heads")
  g = n // nk
  scale = h**-0.5 if scale is None else float(scale)
  # Query head i reads key head i // G: the G heads of a key head stack along the rows.
  qt = q.reshape(b, t, nk, g, h).transpose(0, 2, 3, 1, 4).reshape(b, nk, g * t, h)
  kt, vt = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
  logits = jnp.einsum("bkth,bksh->bkts", qt, kt, preferred_element_type=jnp.float32) * scale
  allowed = None
  if mask is not None:
    allowed = _grouped_mask(mask, n, nk)  # (B|1, K|1, G|1, T|1, S)
    if allowed.shape[2] != 1 or allowed.shape[3] != 1:
      allowed = jnp.broadcast_to(allowed, (*allowed.shape[:2], g, t, allowed.shape[-1]))
    allowed = allowed.reshape(*allowed.shape[:2], -1, allowed.shape[-1])
  if is_causal:
    causal = jnp.tile(jnp.tril(jnp.ones((t, k.shape[1]), bool)), (g, 1))
    allowed = causal if allowed is None else jnp.logical_and(allowed, causal)
  if allowed is not None:
    logits = jnp.where(allowed, logits, _MASKED)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  out = jnp.einsum("bkts,bksh->bkth", probs, vt).reshape(b, nk, g, t, h)
  return out.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)


def _tpu_flash(q, k, v, mask, is_causal, scale):
  """The Pallas TPU flash-attention kernel, whose layout is (B, N, T, H) and whose only masks are
  causal and segment ids (a key-padding mask becomes segment 0 for real and 1 for padding)."""
  if jax.default_backend() != "tpu":
    raise ValueError(
      f"attention_impl='tpu_flash' runs on TPUs only (this backend: {jax.default_backend()}); "
      "use 'blockwise' elsewhere"
    )
  from jax.experimental.pallas.ops.tpu import flash_attention as pallas_flash  # noqa: PLC0415

  n, nk = q.shape[2], k.shape[2]
  if nk != n:
    k, v = jnp.repeat(k, n // nk, axis=2), jnp.repeat(v, n // nk, axis=2)
  segment_ids = None
  if mask is not None:
    mask = jnp.asarray(mask, bool)
    if mask.ndim != 4 or mask.shape[1] != 1 or mask.shape[2] != 1:
      raise ValueError(
        f"attention_impl='tpu_flash' takes key-padding masks (B, 1, 1, S) only, got {mask.shape}"
      )
    kv_ids = jnp.broadcast_to(jnp.where(mask[:, 0, 0], 0, 1), (q.shape[0], k.shape[1]))
    q_ids = jnp.zeros(q.shape[:2], jnp.int32)
    segment_ids = pallas_flash.SegmentIds(q=q_ids, kv=kv_ids.astype(jnp.int32))
  out = pallas_flash.flash_attention(
    *(x.transpose(0, 2, 1, 3) for x in (q, k, v)),
    segment_ids=segment_ids,
    causal=is_causal,
    sm_scale=scale,
  )
  return out.transpose(0, 2, 1, 3)


def check_implementation(implementation: str | None) -> None:
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(
      f"attention_impl={implementation!r} is not one of "
      f"{', '.join(repr(i) for i in IMPLEMENTATIONS[1:])} (empty: XLA)"
    )


def attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  *,
  mask: jax.Array | None = None,
  is_causal: bool = False,
  scale: float | None = None,
  implementation: str | None = None,
) -> jax.Array:
  """Scaled dot-product attention on (B, T, N, H) arrays through the chosen implementation
  (module docstring); grouped-query when k / v have fewer heads."""
  check_implementation(implementation)
  if implementation == "blockwise":
    return blockwise_attention(
      q, k, v, mask=mask, is_causal=is_causal, scale=scale, block_q=BLOCK_Q, block_k=BLOCK_K
    )
  if implementation == "tpu_flash":
    return _tpu_flash(q, k, v, mask, is_causal, q.shape[-1] ** -0.5 if scale is None else scale)
  if implementation == "einsum":
    return einsum_attention(q, k, v, mask=mask, is_causal=is_causal, scale=scale)
  # scale None: jax's own default (1 / sqrt(H)), so the default path computes what it always did.
  return jax.nn.dot_product_attention(
    q,
    k,
    v,
    mask=mask,
    is_causal=is_causal,
    scale=scale,
    implementation=None if implementation == "xla" else implementation,
  )
