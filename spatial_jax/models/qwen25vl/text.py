"""The Qwen2.5-VL language model (Qwen2 decoder with M-RoPE) in Flax NNX.

Mirrors transformers 5.24 `Qwen2_5_VLTextModel` (qwen25vl_reward.md §3.1, §3.4). Attribute names
follow the Hugging Face module names, so `params.py` maps
`model.language_model.layers.{i}.self_attn.q_proj.weight` to `layers.{i}.self_attn.q_proj.kernel`
(transposed), `embed_tokens.weight` to `embed_tokens.embedding` and norm `.weight` to `.weight`.

The lm_head, the image splice and checkpoint loading live elsewhere (model.py / params.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from spatial_jax.models.common import linear
from spatial_jax.models.qwen25vl.config import Qwen25VLConfig
from spatial_jax.models.qwen25vl.layers import (
  GatedMLP,
  RMSNorm,
  apply_rotary,
  attention,
  dtype_of,
  heads_merge,
  heads_split,
  remat_call,
)
from spatial_jax.sharding import shard

ACT_NAMES = ("act_batch", "act_seq", "act_embed")


def mrope_cos_sin(
  position_ids: jax.Array,
  *,
  head_dim: int,
  theta: float,
  mrope_section: Sequence[int],
  dtype: jnp.dtype,
) -> tuple[jax.Array, jax.Array]:
  """Multimodal rotary tables: (3, B, L) positions -> cos, sin of shape (B, L, head_dim).

  Frequency j of the head_dim/2 takes its position from row `i % 3` of the `mrope_section`
  chunk i it falls in (T for the first chunk, H for the second, W for the third), then the
  table is doubled for the GPT-NeoX half split. Selecting the position per frequency before
  multiplying is elementwise identical to transformers' multiply-then-select.

  Angles and cos/sin are fp32 (positions reach ~10^4 and bf16 angles would be off by whole
  radians); the result is cast to the activation dtype as transformers does.
  """
  # The same fp32 expression as transformers' `compute_default_rope_parameters`.
  inv_freq = 1.0 / (np.float32(theta) ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
  row_of_freq = np.repeat(np.arange(len(mrope_section)) % 3, mrope_section)
  if row_of_freq.size != head_dim // 2:
    raise ValueError(
      f"mrope_section {tuple(mrope_section)} must sum to head_dim/2 = {head_dim // 2}"
    )
  positions = jnp.moveaxis(position_ids[row_of_freq].astype(jnp.float32), 0, -1)  # (B, L, hd/2)
  freqs = positions * jnp.asarray(inv_freq)
  angles = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(angles).astype(dtype), jnp.sin(angles).astype(dtype)


class Attention(nnx.Module):
  """Causal GQA self-attention; q/k/v carry a bias, o_proj does not (as in Qwen2)."""

  def __init__(self, cfg: Qwen25VLConfig, *, rngs: nnx.Rngs):
    text = cfg.text
    self.num_heads = text.num_attention_heads
    self.num_kv_heads = text.num_key_value_heads
    head_dim = text.head_dim
    dim, std = text.hidden_size, text.initializer_range
    q_width, kv_width = self.num_heads * head_dim, self.num_kv_heads * head_dim
    self.q_proj = linear(dim, q_width, ("embed", "heads"), cfg, rngs, init_std=std)
    self.k_proj = linear(dim, kv_width, ("embed", "kv_heads"), cfg, rngs, init_std=std)
    self.v_proj = linear(dim, kv_width, ("embed", "kv_heads"), cfg, rngs, init_std=std)
    self.o_proj = linear(q_width, dim, ("heads", "embed"), cfg, rngs, use_bias=False, init_std=std)
    self.implementation = cfg.attention_impl

  def __call__(
    self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array | None
  ) -> jax.Array:
    heads = ("act_batch", "act_seq", "act_heads", "act_head_dim")
    kv_heads = ("act_batch", "act_seq", "act_kv_heads", "act_head_dim")
    q = shard(heads_split(self.q_proj(x), self.num_heads), heads)
    k = shard(heads_split(self.k_proj(x), self.num_kv_heads), kv_heads)
    v = shard(heads_split(self.v_proj(x), self.num_kv_heads), kv_heads)
    # cos/sin are (B, L, H): broadcast over the heads axis of (B, L, N, H).
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    out = attention(q, k, v, mask=mask, is_causal=True, implementation=self.implementation)
    return self.o_proj(heads_merge(shard(out, heads)))


class DecoderLayer(nnx.Module):
  """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x))."""

  def __init__(self, cfg: Qwen25VLConfig, *, rngs: nnx.Rngs):
    text = cfg.text
    self.input_layernorm = RMSNorm(
      text.hidden_size, eps=text.rms_norm_eps, param_dtype=cfg.param_dtype
    )
    self.self_attn = Attention(cfg, rngs=rngs)
    self.post_attention_layernorm = RMSNorm(
      text.hidden_size, eps=text.rms_norm_eps, param_dtype=cfg.param_dtype
    )
    self.mlp = GatedMLP(
      text.hidden_size,
      text.intermediate_size,
      act=text.hidden_act,
      use_bias=False,
      config=cfg,
      rngs=rngs,
      init_std=text.initializer_range,
    )

  def __call__(
    self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array | None
  ) -> jax.Array:
    x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
    x = x + self.mlp(self.post_attention_layernorm(x))
    return shard(x, ACT_NAMES)


def _run_layer(
  layer: DecoderLayer, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array | None
) -> jax.Array:
  return layer(x, cos, sin, mask)


def _run_layer_remat(
  layer: DecoderLayer, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array | None
) -> jax.Array:
  """Rematerialised `_run_layer`: the backward pass recomputes the layer's activations.

  Memory O(layers * B * L * D) instead of the attention/MLP intermediates.
  """
  return remat_call(layer, x, cos, sin, mask)


class TextModel(nnx.Module):
  """Embeddings, decoder layers and the final norm (no lm_head).

  `__call__` takes spliced `inputs_embeds` (text embeddings with image features in place of the
  image tokens), M-RoPE `position_ids` from `rope_index` and the padding mask.
  """

  def __init__(self, cfg: Qwen25VLConfig, *, rngs: nnx.Rngs):
    text = cfg.text
    self.config = cfg
    self.embed_tokens = nnx.Embed(
      text.vocab_size,
      text.hidden_size,
      dtype=dtype_of(cfg.dtype),
      param_dtype=dtype_of(cfg.param_dtype),
      embedding_init=nnx.with_partitioning(
        nnx.initializers.normal(text.initializer_range), ("vocab", "embed")
      ),
      rngs=rngs,
    )
    self.layers = nnx.List([DecoderLayer(cfg, rngs=rngs) for _ in range(text.num_hidden_layers)])
    self.norm = RMSNorm(text.hidden_size, eps=text.rms_norm_eps, param_dtype=cfg.param_dtype)

  def embed(self, input_ids: jax.Array) -> jax.Array:
    """(B, L) token ids -> (B, L, D) embeddings in the compute dtype."""
    return shard(self.embed_tokens(input_ids), ACT_NAMES)

  def __call__(
    self,
    inputs_embeds: jax.Array,
    position_ids: jax.Array,
    attention_mask: jax.Array | None = None,
  ) -> jax.Array:
    """Runs the decoder.

    Args:
      inputs_embeds: (B, L, D) input embeddings.
      position_ids: (3, B, L) M-RoPE positions (temporal, height, width), e.g. from
        `rope_index`; a (B, L) array is broadcast to the three rows (plain 1D RoPE).
      attention_mask: (B, L) 1 for real tokens and 0 for padding (left or right); None for
        no padding. A query attends to keys that are at or before it AND not padding. Outputs
        at padded positions are finite but meaningless.

    Returns:
      (B, L, D) last hidden state, after the final norm.
    """
    text = self.config.text
    batch, length, dim = inputs_embeds.shape
    if dim != text.hidden_size:
      raise ValueError(f"TextModel: inputs_embeds width {dim} != hidden_size {text.hidden_size}.")
    if position_ids.ndim == 2:
      position_ids = jnp.broadcast_to(position_ids[None], (3, *position_ids.shape))
    if position_ids.shape != (3, batch, length):
      raise ValueError(
        f"TextModel: position_ids shape {position_ids.shape} != (3, {batch}, {length}) "
        "(packed (4, B, L) positions are not supported)."
      )
    dtype = dtype_of(self.config.dtype)
    x = shard(inputs_embeds.astype(dtype), ACT_NAMES)
    cos, sin = mrope_cos_sin(
      position_ids,
      head_dim=text.head_dim,
      theta=text.rope_theta,
      mrope_section=text.mrope_section,
      dtype=dtype,
    )
    mask = None
    if attention_mask is not None:
      if attention_mask.shape != (batch, length):
        raise ValueError(
          f"TextModel: attention_mask shape {attention_mask.shape} != ({batch}, {length})."
        )
      # Key padding as a full (B, 1, L, L) mask; `attention` ANDs in the causal part.
      # A pad query under left padding sees no key; the XLA path gives it a uniform softmax
      # (finite), so its garbage never turns into NaN in later layers' masked-out values.
      mask = jnp.broadcast_to(
        attention_mask.astype(bool)[:, None, None, :], (batch, 1, length, length)
      )
    run = _run_layer_remat if self.config.remat else _run_layer
    for layer in self.layers:
      x = run(layer, x, cos, sin, mask)
    return self.norm(x)
