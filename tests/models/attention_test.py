"""Blockwise attention (models/attention.py): values and gradients against XLA's attention at
fp32, masks, padding, grouped heads, and the memory it exists to save."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spatial_jax.models import attention as A
from spatial_jax.models.qwen25vl import layers as qwen_layers


def _qkv(rng, b, t, s, n, nk, h, dtype=jnp.float32):
  def draw(*shape):
    return jnp.asarray(rng.standard_normal(shape), dtype)

  return draw(b, t, n, h), draw(b, s, nk, h), draw(b, s, nk, h)


def _values_and_grads(fn, q, k, v, weights):
  out, vjp = jax.vjp(fn, q, k, v)
  return out, vjp(weights.astype(out.dtype))


# (batch, queries, keys, heads, kv heads, head dim, block_q, block_k, causal, mask)
CASES = {
  "one tile": (2, 16, 16, 2, 2, 8, 64, 64, False, None),
  "tiles, padded": (2, 37, 37, 4, 2, 8, 8, 16, True, "keys"),
  "cross, uneven": (1, 50, 23, 4, 4, 8, 16, 8, False, "keys"),
  "grouped, causal": (2, 64, 64, 4, 1, 16, 16, 32, True, None),
  "full mask": (2, 24, 40, 2, 2, 8, 8, 16, False, "full"),
  "grouped, full mask": (1, 20, 20, 4, 2, 8, 8, 8, True, "full"),
}


@pytest.mark.parametrize("case", CASES)
def test_values_and_gradients_match_xla(case):
  b, t, s, n, nk, h, bq, bk, causal, mask_kind = CASES[case]
  rng = np.random.default_rng(len(case))
  q, k, v = _qkv(rng, b, t, s, n, nk, h)
  mask = None
  if mask_kind == "keys":
    keep = rng.random((b, 1, 1, s)) > 0.3
    keep[..., 0] = True  # every query keeps a key: XLA's path is undefined otherwise
    mask = jnp.asarray(keep)
  elif mask_kind == "full":
    keep = rng.random((b, n, t, s)) > 0.5
    keep[..., 0] = True
    mask = jnp.asarray(keep)
  weights = jnp.asarray(rng.standard_normal((b, t, n, h)), jnp.float32)

  def ours(q, k, v):
    return A.blockwise_attention(q, k, v, mask=mask, is_causal=causal, block_q=bq, block_k=bk)

  def xla(q, k, v):
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal)

  out, grads = _values_and_grads(jax.jit(ours), q, k, v, weights)
  ref, ref_grads = _values_and_grads(xla, q, k, v, weights)
  assert out.shape == (b, t, n, h) and out.dtype == jnp.float32
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
  for name, got, want in zip("qkv", grads, ref_grads, strict=True):
    assert got.shape == want.shape, name
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-5, err_msg=f"d{name}")


@pytest.mark.parametrize("case", CASES)
def test_the_einsum_path_matches_xla(case):
  b, t, s, n, nk, h, _, _, causal, mask_kind = CASES[case]
  rng = np.random.default_rng(len(case) + 7)
  q, k, v = _qkv(rng, b, t, s, n, nk, h)
  mask = None
  if mask_kind:
    keep = rng.random((b, n if mask_kind == "full" else 1, t if mask_kind == "full" else 1, s))
    keep = keep > 0.4
    keep[..., 0] = True
    mask = jnp.asarray(keep)
  weights = jnp.asarray(rng.standard_normal((b, t, n, h)), jnp.float32)

  def ours(q, k, v):
    return A.attention(q, k, v, mask=mask, is_causal=causal, implementation="einsum")

  def xla(q, k, v):
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal)

  out, grads = _values_and_grads(jax.jit(ours), q, k, v, weights)
  ref, ref_grads = _values_and_grads(xla, q, k, v, weights)
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
  for name, got, want in zip("qkv", grads, ref_grads, strict=True):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-5, err_msg=f"d{name}")


def test_a_fully_masked_row_averages_as_the_eager_path():
  # transformers' eager path (and qwen's) fills masked logits with the float minimum, so a query
  # whose every key is masked averages all values; the blockwise path does the same, and the
  # keys it adds as padding never take part.
  rng = np.random.default_rng(3)
  q, k, v = _qkv(rng, 1, 5, 11, 2, 2, 4)
  keep = np.ones((1, 1, 5, 11), bool)
  keep[0, 0, 2] = False
  ours = A.blockwise_attention(q, k, v, mask=jnp.asarray(keep), block_q=2, block_k=4)
  eager = qwen_layers.attention(q, k, v, mask=jnp.asarray(keep))
  np.testing.assert_allclose(ours, eager, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(ours[0, 2], v[0].mean(axis=0), rtol=1e-5)


def test_bf16_inputs_keep_an_fp32_softmax():
  rng = np.random.default_rng(4)
  q, k, v = _qkv(rng, 2, 40, 40, 2, 2, 16, jnp.bfloat16)
  out = A.blockwise_attention(q, k, v, block_q=16, block_k=16)
  assert out.dtype == jnp.bfloat16
  exact = jax.nn.dot_product_attention(*(x.astype(jnp.float32) for x in (q, k, v)))
  # Only the inputs' and the probabilities' bf16 rounding remain (~3 decimal digits).
  assert float(jnp.abs(out.astype(jnp.float32) - exact).max()) < 2e-2


def _temp_bytes(fn, *args):
  return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes


def test_memory_does_not_grow_with_the_score_matrix():
  # One sample of 4 heads x 2,048 tokens: XLA's attention holds the 4 x 2,048^2 fp32 scores
  # (64 MiB) forward and more backward; the blockwise forward and backward hold tiles.
  q, k, v = (jax.ShapeDtypeStruct((1, 2048, 4, 32), jnp.float32) for _ in range(3))

  def loss(attend):
    return lambda q, k, v: jnp.sum(attend(q, k, v) ** 2)

  def blockwise(q, k, v):
    return A.blockwise_attention(q, k, v, block_q=256, block_k=256)

  scores = 4 * 2048 * 2048 * 4
  xla_fwd = _temp_bytes(jax.nn.dot_product_attention, q, k, v)
  xla_bwd = _temp_bytes(jax.grad(loss(jax.nn.dot_product_attention), (0, 1, 2)), q, k, v)
  ours_fwd = _temp_bytes(blockwise, q, k, v)
  ours_bwd = _temp_bytes(jax.grad(loss(blockwise), (0, 1, 2)), q, k, v)
  assert xla_fwd >= scores and xla_bwd >= scores, (xla_fwd, xla_bwd)
  assert ours_fwd < scores / 8 and ours_bwd < scores / 8, (ours_fwd, ours_bwd)


def test_implementations_are_checked():
  with pytest.raises(ValueError, match="'blockwise'"):
    A.check_implementation("flash")
  q = jnp.zeros((1, 4, 2, 8))
  if jax.default_backend() != "tpu":
    with pytest.raises(ValueError, match="TPUs only"):
      A.attention(q, q, q, implementation="tpu_flash")
  with pytest.raises(ValueError, match="not a multiple"):
    A.blockwise_attention(q, jnp.zeros((1, 4, 3, 8)), jnp.zeros((1, 4, 3, 8)))
