"""The T5 encoder (transformers `T5EncoderModel`, FLUX's `text_encoder_2`) in Flax NNX.

transformers 5 has no Flax T5 any more (flux.md §13: `FlaxT5EncoderModel` went with the
library-wide Flax removal), so this is our own port of `modeling_t5.py` (transformers 5.24),
encoder side only. Numerics follow it exactly:

- Relative position bias: bidirectional log buckets, an embedding of (num_buckets, num_heads)
  that only layer 0 holds; its (1, N, T, T) bias is computed once and shared by every layer.
- No 1/sqrt(d_kv) scaling of the attention scores (T5 folds it into the q initialisation).
- T5LayerNorm is an RMSNorm without mean subtraction or bias: the variance in fp32, and the
  weight multiply after casting back to the weight's dtype when that is half precision.
- v1.1 feed-forward `wo(gelu_new(wi_0(x)) * wi_1(x))`; the original T5's `wo(relu(wi(x)))`.
- No embedding scaling, no bias in any linear, pre-norm residual blocks, `final_layer_norm` at
  the end.

Attribute names are transformers' module names (`block`/`layer` are `nnx.List`s), so the
checkpoint key map in `params.py` is mechanical.

Compute runs in `config.dtype`; the attention logits, the bias and the softmax are fp32 (where
transformers' eager path adds and normalises in the activation dtype), which only matters for
bf16 and makes ours the more accurate side there. transformers' `_keep_in_fp32_modules = ["wo"]`
upcasts `wo` only for fp16 loads; at bf16 (FLUX's dtype) it keeps every weight in bf16, as we do.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from spatial_jax.models.common import activation, linear
from spatial_jax.models.t5.config import T5Config
from spatial_jax.sharding import shard

ACT_NAMES = ("act_batch", "act_seq", "act_embed")
HEAD_NAMES = ("act_batch", "act_seq", "act_heads", "act_head_dim")


def relative_position_bucket(
  relative_position: np.ndarray, num_buckets: int, max_distance: int
) -> np.ndarray:
  """`T5Attention._relative_position_bucket(bidirectional=True)`, in numpy.

  Half the buckets are for keys after the query, half for keys before; in each half, distances
  below `num_buckets // 4` get their own bucket and larger ones log-spaced buckets up to
  `max_distance`, beyond which all share the last. Shapes are static, so this runs on the host
  at trace time; the log is fp32 like torch's, so boundary distances (e.g. 16, 32, 64 for the
  default 32 buckets / 128) fall into the same bucket as in transformers.
  """
  num_buckets //= 2
  buckets = (relative_position > 0).astype(np.int64) * num_buckets
  distance = np.abs(relative_position)
  max_exact = num_buckets // 2
  is_small = distance < max_exact
  # Small distances are masked out below; keep them off log(0).
  safe = np.maximum(distance, max_exact).astype(np.float32)
  scaled = (
    np.log(safe / np.float32(max_exact))
    / np.float32(math.log(max_distance / max_exact))
    * np.float32(num_buckets - max_exact)
  )
  if_large = np.minimum(max_exact + scaled.astype(np.int64), num_buckets - 1)
  return buckets + np.where(is_small, distance, if_large)


class T5LayerNorm(nnx.Module):
  """T5's RMSNorm: x / rms(x) * weight, no mean subtraction, no bias, statistics in fp32."""

  def __init__(self, dim: int, config: T5Config):
    self.eps = config.layer_norm_epsilon
    self.dtype = jnp.dtype(config.dtype)
    self.weight = nnx.Param(
      nnx.with_partitioning(nnx.initializers.ones_init(), ("norm",))(
        jax.random.key(0), (dim,), jnp.dtype(config.param_dtype)
      )
    )

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    variance = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
    normed = x32 * jax.lax.rsqrt(variance + self.eps)
    weight = self.weight[...]
    # transformers casts to a half-precision weight's dtype BEFORE the multiply.
    if weight.dtype in (jnp.float16, jnp.bfloat16):
      normed = normed.astype(weight.dtype)
    return (weight * normed).astype(self.dtype)


class T5Attention(nnx.Module):
  """Encoder self-attention: unscaled dot products plus the shared relative position bias."""

  def __init__(self, config: T5Config, *, has_relative_attention_bias: bool, rngs: nnx.Rngs):
    self.num_heads = config.num_heads
    self.d_kv = config.d_kv
    self.num_buckets = config.relative_attention_num_buckets
    self.max_distance = config.relative_attention_max_distance
    d, inner = config.d_model, config.inner_dim
    self.q = linear(d, inner, ("embed", "heads"), config, rngs, use_bias=False)
    self.k = linear(d, inner, ("embed", "heads"), config, rngs, use_bias=False)
    self.v = linear(d, inner, ("embed", "heads"), config, rngs, use_bias=False)
    self.o = linear(inner, d, ("heads", "embed"), config, rngs, use_bias=False)
    if has_relative_attention_bias:
      self.relative_attention_bias = nnx.Embed(
        self.num_buckets,
        self.num_heads,
        dtype=jnp.float32,  # The bias joins the fp32 logits.
        param_dtype=jnp.dtype(config.param_dtype),
        embedding_init=nnx.with_partitioning(
          nnx.initializers.normal(config.d_model**-0.5), (None, "heads")
        ),
        rngs=rngs,
      )

  def compute_bias(self, length: int) -> jax.Array:
    """The (1, num_heads, length, length) fp32 position bias (query rows, key columns)."""
    positions = np.arange(length)
    relative = positions[None, :] - positions[:, None]  # key - query
    buckets = relative_position_bucket(relative, self.num_buckets, self.max_distance)
    values = self.relative_attention_bias(jnp.asarray(buckets, dtype=jnp.int32))  # (T, T, N)
    return jnp.transpose(values, (2, 0, 1))[None]

  def __call__(
    self, x: jax.Array, position_bias: jax.Array, mask: jax.Array | None = None
  ) -> jax.Array:
    batch, length, _ = x.shape

    def heads(y: jax.Array) -> jax.Array:
      return shard(y.reshape(batch, length, self.num_heads, self.d_kv), HEAD_NAMES)

    q, k, v = heads(self.q(x)), heads(self.k(x)), heads(self.v(x))
    # No 1/sqrt(d_kv): T5 scales q's initialisation instead (mesh-tensorflow convention).
    logits = jnp.einsum("btnh,bsnh->bnts", q, k, preferred_element_type=jnp.float32)
    logits = logits + position_bias
    if mask is not None:
      logits = jnp.where(mask[:, None, None, :], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = shard(jnp.einsum("bnts,bsnh->btnh", probs, v), HEAD_NAMES)
    return self.o(out.reshape(batch, length, self.num_heads * self.d_kv))


class T5LayerSelfAttention(nnx.Module):
  """`block.i.layer.0`: x + SelfAttention(layer_norm(x))."""

  def __init__(self, config: T5Config, *, has_relative_attention_bias: bool, rngs: nnx.Rngs):
    self.SelfAttention = T5Attention(
      config, has_relative_attention_bias=has_relative_attention_bias, rngs=rngs
    )
    self.layer_norm = T5LayerNorm(config.d_model, config)

  def __call__(self, x: jax.Array, position_bias: jax.Array, mask: jax.Array | None):
    return x + self.SelfAttention(self.layer_norm(x), position_bias, mask)


class T5DenseGatedActDense(nnx.Module):
  """T5 v1.1 feed-forward: wo(act(wi_0(x)) * wi_1(x)), act = gelu_new for "gated-gelu"."""

  def __init__(self, config: T5Config, *, rngs: nnx.Rngs):
    self.wi_0 = linear(config.d_model, config.d_ff, ("embed", "mlp"), config, rngs, use_bias=False)
    self.wi_1 = linear(config.d_model, config.d_ff, ("embed", "mlp"), config, rngs, use_bias=False)
    self.wo = linear(config.d_ff, config.d_model, ("mlp", "embed"), config, rngs, use_bias=False)
    self.act = activation(config.dense_act_fn)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.wo(self.act(self.wi_0(x)) * self.wi_1(x))


class T5DenseActDense(nnx.Module):
  """Original T5 feed-forward: wo(act(wi(x))), act = relu for "relu"."""

  def __init__(self, config: T5Config, *, rngs: nnx.Rngs):
    self.wi = linear(config.d_model, config.d_ff, ("embed", "mlp"), config, rngs, use_bias=False)
    self.wo = linear(config.d_ff, config.d_model, ("mlp", "embed"), config, rngs, use_bias=False)
    self.act = activation(config.dense_act_fn)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.wo(self.act(self.wi(x)))


class T5LayerFF(nnx.Module):
  """`block.i.layer.1`: x + DenseReluDense(layer_norm(x)) (the name is HF's, whatever the act)."""

  def __init__(self, config: T5Config, *, rngs: nnx.Rngs):
    dense = T5DenseGatedActDense if config.is_gated_act else T5DenseActDense
    self.DenseReluDense = dense(config, rngs=rngs)
    self.layer_norm = T5LayerNorm(config.d_model, config)

  def __call__(self, x: jax.Array) -> jax.Array:
    return x + self.DenseReluDense(self.layer_norm(x))


class T5Block(nnx.Module):
  """One encoder layer: `layer = [T5LayerSelfAttention, T5LayerFF]`, as transformers lists them."""

  def __init__(self, config: T5Config, *, has_relative_attention_bias: bool, rngs: nnx.Rngs):
    self.layer = nnx.List(
      [
        T5LayerSelfAttention(
          config, has_relative_attention_bias=has_relative_attention_bias, rngs=rngs
        ),
        T5LayerFF(config, rngs=rngs),
      ]
    )

  def __call__(self, x: jax.Array, position_bias: jax.Array, mask: jax.Array | None):
    x = self.layer[0](x, position_bias, mask)
    return shard(self.layer[1](x), ACT_NAMES)


class T5Stack(nnx.Module):
  """`encoder`: the blocks and `final_layer_norm` (the token embedding lives in `shared`)."""

  def __init__(self, config: T5Config, *, rngs: nnx.Rngs):
    self.block = nnx.List(
      [
        T5Block(config, has_relative_attention_bias=i == 0, rngs=rngs)
        for i in range(config.num_layers)
      ]
    )
    self.final_layer_norm = T5LayerNorm(config.d_model, config)

  def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    # Computed by layer 0's table and shared by all layers (transformers passes it down).
    position_bias = self.block[0].layer[0].SelfAttention.compute_bias(x.shape[1])
    for block in self.block:
      x = block(x, position_bias, mask)
    return self.final_layer_norm(x)


class T5EncoderModel(nnx.Module):
  """transformers' `T5EncoderModel`: `shared` token embedding + the `encoder` stack."""

  def __init__(self, config: T5Config, *, rngs: nnx.Rngs):
    self.config = config
    self.shared = nnx.Embed(
      config.vocab_size,
      config.d_model,
      dtype=jnp.dtype(config.dtype),
      param_dtype=jnp.dtype(config.param_dtype),
      embedding_init=nnx.with_partitioning(nnx.initializers.normal(1.0), ("vocab", "embed")),
      rngs=rngs,
    )
    self.encoder = T5Stack(config, rngs=rngs)

  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
    """Encodes token ids.

    Args:
      input_ids: (B, T) token ids.
      attention_mask: (B, T), 1 for tokens and 0 for padding (anywhere: relative positions do
        not care which side is padded); None attends to every position, as FLUX calls T5.

    Returns:
      (B, T, d_model) `last_hidden_state` in the compute dtype. Rows at padded positions are
      finite but meaningless.
    """
    if input_ids.ndim != 2:
      raise ValueError(f"T5EncoderModel: input_ids must be (B, T), got shape {input_ids.shape}.")
    mask = None
    if attention_mask is not None:
      if attention_mask.shape != input_ids.shape:
        raise ValueError(
          f"T5EncoderModel: attention_mask shape {attention_mask.shape} != input_ids shape "
          f"{input_ids.shape}."
        )
      mask = attention_mask.astype(bool)
    x = shard(self.shared(input_ids), ACT_NAMES)
    return self.encoder(x, mask)
