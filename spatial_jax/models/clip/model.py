"""CLIP's text tower (FLUX's `text_encoder`, CLIP-L) in Flax NNX.

transformers 5 has no Flax CLIP any more (flux.md §13), so this is a port of the PyTorch
`CLIPTextModel` of transformers 5.24 (`models/clip/modeling_clip.py`); FLUX uses only its
`pooler_output` (flux.md §6: the prompt padded to 77 tokens, no attention mask).

Numerics follow that file: token + learned position embeddings; a causal mask, optionally
AND-ed with a padding mask over keys; pre-LN encoder layers (`layer_norm1` -> attention with
scale 1/sqrt(head_dim) -> residual, `layer_norm2` -> `fc1` -> act -> `fc2` -> residual);
`final_layer_norm`; the pooled output is the final state at the EOS token (see
`pooled_positions`). LayerNorm statistics and the attention softmax run in fp32 whatever the
compute dtype, as torch's LayerNorm kernel and transformers' eager softmax do.

Module attributes carry the hub checkpoint's names (`text_model.encoder.layers.0.self_attn.
q_proj`, `layer_norm1.weight`, `token_embedding.weight`), so the checkpoint key map in
`params.py` is mechanical.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from spatial_jax.models.clip.config import CLIPTextConfig
from spatial_jax.models.common import activation, linear
from spatial_jax.sharding import shard

_TOKENS = ("act_batch", "act_seq", "act_embed")
_HEADS = ("act_batch", "act_seq", "act_heads", "act_head_dim")


class CLIPTextOutput(NamedTuple):
  """transformers' `BaseModelOutputWithPooling`, the two fields FLUX and tests read."""

  last_hidden_state: jax.Array  # (B, T, H), after final_layer_norm.
  pooler_output: jax.Array  # (B, H), last_hidden_state at the EOS token.


def _param(init, names: tuple[str | None, ...], shape, config: CLIPTextConfig, rngs) -> nnx.Param:
  value = nnx.with_partitioning(init, names)(rngs.params(), shape, jnp.dtype(config.param_dtype))
  return nnx.Param(value)


class Embedding(nnx.Module):
  """`torch.nn.Embedding` with its `weight` name, so the checkpoint key maps as is."""

  def __init__(self, num: int, dim: int, names, config: CLIPTextConfig, *, rngs: nnx.Rngs):
    init = nnx.initializers.normal(0.02)  # transformers' CLIP init; checkpoints overwrite it.
    self.weight = _param(init, names, (num, dim), config, rngs)
    self.dtype = jnp.dtype(config.dtype)

  def __call__(self, ids: jax.Array) -> jax.Array:
    return jnp.take(self.weight[...], ids, axis=0).astype(self.dtype)


class LayerNorm(nnx.Module):
  """`torch.nn.LayerNorm` (biased variance, eps inside the sqrt) with fp32 statistics.

  The affine runs in fp32 too and only the result is cast, as torch's fused kernel does for
  bf16 inputs.
  """

  def __init__(self, dim: int, config: CLIPTextConfig, *, rngs: nnx.Rngs):
    self.eps = config.layer_norm_eps
    self.weight = _param(nnx.initializers.ones_init(), ("norm",), (dim,), config, rngs)
    self.bias = _param(nnx.initializers.zeros_init(), ("norm",), (dim,), config, rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    centered = x32 - mean
    var = jnp.mean(jnp.square(centered), axis=-1, keepdims=True)
    y = centered * jax.lax.rsqrt(var + self.eps)
    y = y * self.weight[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
    return y.astype(x.dtype)


class CLIPTextEmbeddings(nnx.Module):
  def __init__(self, config: CLIPTextConfig, *, rngs: nnx.Rngs):
    dim = config.hidden_size
    self.token_embedding = Embedding(config.vocab_size, dim, ("vocab", "embed"), config, rngs=rngs)
    self.position_embedding = Embedding(
      config.max_position_embeddings, dim, (None, "embed"), config, rngs=rngs
    )

  def __call__(self, input_ids: jax.Array, position_ids: jax.Array) -> jax.Array:
    return self.token_embedding(input_ids) + self.position_embedding(position_ids)


class CLIPAttention(nnx.Module):
  def __init__(self, config: CLIPTextConfig, *, rngs: nnx.Rngs):
    dim = config.hidden_size
    self.num_heads = config.num_attention_heads
    self.head_dim = config.head_dim
    self.q_proj = linear(dim, dim, ("embed", "heads"), config, rngs)
    self.k_proj = linear(dim, dim, ("embed", "heads"), config, rngs)
    self.v_proj = linear(dim, dim, ("embed", "heads"), config, rngs)
    self.out_proj = linear(dim, dim, ("heads", "embed"), config, rngs)

  def _heads(self, x: jax.Array) -> jax.Array:
    return shard(x.reshape(*x.shape[:-1], self.num_heads, self.head_dim), _HEADS)

  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    """x: (B, T, H); mask: (B, 1, T, T) booleans, True where a query may attend a key."""
    q, k, v = self._heads(self.q_proj(x)), self._heads(self.k_proj(x)), self._heads(self.v_proj(x))
    # As transformers' eager path: scale after the q.k matmul, softmax in fp32.
    logits = jnp.einsum("btnh,bsnh->bnts", q, k, preferred_element_type=jnp.float32)
    logits = logits * (self.head_dim**-0.5)
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1)
    # A query that may attend no key (left padding under the causal mask) gets a zero output, as
    # torch's SDPA (transformers' default attention) returns; eager attention would spread it
    # uniformly over every key instead.
    probs = jnp.where(jnp.any(mask, axis=-1, keepdims=True), probs, 0.0).astype(v.dtype)
    out = jnp.einsum("bnts,bsnh->btnh", probs, v)
    return self.out_proj(out.reshape(*x.shape[:-1], -1))


class CLIPMLP(nnx.Module):
  def __init__(self, config: CLIPTextConfig, *, rngs: nnx.Rngs):
    self.fc1 = linear(config.hidden_size, config.intermediate_size, ("embed", "mlp"), config, rngs)
    self.fc2 = linear(config.intermediate_size, config.hidden_size, ("mlp", "embed"), config, rngs)
    self.act = activation(config.hidden_act)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nnx.Module):
  def __init__(self, config: CLIPTextConfig, *, rngs: nnx.Rngs):
    self.self_attn = CLIPAttention(config, rngs=rngs)
    self.layer_norm1 = LayerNorm(config.hidden_size, config, rngs=rngs)
    self.mlp = CLIPMLP(config, rngs=rngs)
    self.layer_norm2 = LayerNorm(config.hidden_size, config, rngs=rngs)

  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    x = x + self.self_attn(self.layer_norm1(x), mask)
    x = x + self.mlp(self.layer_norm2(x))
    return shard(x, _TOKENS)


class CLIPEncoder(nnx.Module):
  def __init__(self, config: CLIPTextConfig, *, rngs: nnx.Rngs):
    self.layers = nnx.List(
      [CLIPEncoderLayer(config, rngs=rngs) for _ in range(config.num_hidden_layers)]
    )

  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    for layer in self.layers:
      x = layer(x, mask)
    return x


def causal_mask(input_ids: jax.Array, padding_mask: jax.Array | None = None) -> jax.Array:
  """The (B, 1, T, T) boolean mask of `create_causal_mask`: causal, AND-ed with a padding mask
  over keys when one is given (1 = attend, 0 = padding, as the tokenizer returns it)."""
  b, t = input_ids.shape
  mask = jnp.tril(jnp.ones((t, t), dtype=bool))[None, None]
  if padding_mask is not None:
    mask = jnp.logical_and(mask, padding_mask.astype(bool)[:, None, None, :])
  return jnp.broadcast_to(mask, (b, 1, t, t))


def pooled_positions(input_ids: jax.Array, eos_token_id: int) -> jax.Array:
  """The (B,) token index whose final state is the pooled output, as transformers picks it.

  With the legacy `eos_token_id == 2` (configs from before transformers PR #24773, FLUX's
  `text_encoder` among them) it is `argmax(input_ids)`: CLIP's end-of-text token 49407 is the
  largest id, and argmax returns its first occurrence when the prompt is padded with it.
  Otherwise it is the first position holding `eos_token_id` (0 if a row has none).
  """
  ids = input_ids.astype(jnp.int32)
  if eos_token_id == 2:
    return jnp.argmax(ids, axis=-1)
  return jnp.argmax((ids == eos_token_id).astype(jnp.int32), axis=-1)


class CLIPTextTransformer(nnx.Module):
  """The modules under `text_model.` in the hub checkpoint."""

  def __init__(self, config: CLIPTextConfig, *, rngs: nnx.Rngs):
    self.embeddings = CLIPTextEmbeddings(config, rngs=rngs)
    self.encoder = CLIPEncoder(config, rngs=rngs)
    self.final_layer_norm = LayerNorm(config.hidden_size, config, rngs=rngs)


class CLIPTextModel(nnx.Module):
  """transformers' `CLIPTextModel`: `model(input_ids, attention_mask=None)` -> CLIPTextOutput."""

  def __init__(self, config: CLIPTextConfig, *, rngs: nnx.Rngs):
    self.config = config
    self.text_model = CLIPTextTransformer(config, rngs=rngs)

  def __call__(
    self,
    input_ids: jax.Array,
    attention_mask: jax.Array | None = None,
    position_ids: jax.Array | None = None,
  ) -> CLIPTextOutput:
    """Encodes token ids.

    Args:
      input_ids: (B, T) int token ids, T <= max_position_embeddings (FLUX pads to 77).
      attention_mask: optional (B, T), 1 for tokens and 0 for padding; FLUX passes none.
      position_ids: optional (B, T) or (T,) positions (default 0..T-1).

    Returns:
      `last_hidden_state` (B, T, H) and `pooler_output` (B, H), in the compute dtype.
    """
    config = self.config
    if input_ids.ndim != 2:
      raise ValueError(f"input_ids must be (batch, seq), got shape {input_ids.shape}")
    t = input_ids.shape[-1]
    if t > config.max_position_embeddings:
      raise ValueError(
        f"Sequence length {t} exceeds max_position_embeddings {config.max_position_embeddings}"
      )
    if position_ids is None:
      position_ids = jnp.arange(t)[None]
    text = self.text_model
    x = shard(text.embeddings(input_ids, position_ids), _TOKENS)
    x = text.encoder(x, causal_mask(input_ids, attention_mask))
    x = text.final_layer_norm(x)
    pooled = jnp.take_along_axis(
      x, pooled_positions(input_ids, config.eos_token_id)[:, None, None], axis=1
    )[:, 0]
    return CLIPTextOutput(last_hidden_state=x, pooler_output=pooled)
