"""FLUX's double-stream (`FluxTransformerBlock`) and single-stream blocks (flux.md §4).

Text tokens come first in every joint sequence. The single-stream blocks take and return the
joint sequence [text; image] as one array (BFL's layout), which is diffusers' computation without
its split and re-concatenation around every block.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from spatial_jax.models.common import linear
from spatial_jax.models.flux import layers
from spatial_jax.models.flux.config import FluxConfig
from spatial_jax.sharding import shard

_TOKENS = ("act_batch", "act_seq", "act_embed")
_HEADS = ("act_batch", "act_seq", "act_heads", "act_head_dim")


class FluxAttention(nnx.Module):
  """Q/K/V projections with per-head RMSNorm; `context=True` adds the text-stream projections,
  `pre_only=True` (single blocks) drops the output projection."""

  def __init__(self, config: FluxConfig, *, context: bool, pre_only: bool, rngs: nnx.Rngs):
    dim, head_dim = config.inner_dim, config.attention_head_dim
    self.head_dim = head_dim
    self.implementation = config.attention_impl
    self.norm_q = layers.RMSNorm(head_dim, config)
    self.norm_k = layers.RMSNorm(head_dim, config)
    self.to_q = linear(dim, dim, ("embed", "heads"), config, rngs)
    self.to_k = linear(dim, dim, ("embed", "heads"), config, rngs)
    self.to_v = linear(dim, dim, ("embed", "heads"), config, rngs)
    if not pre_only:
      self.to_out = nnx.List([linear(dim, dim, ("heads", "embed"), config, rngs), layers.Dropout()])
    if context:
      self.norm_added_q = layers.RMSNorm(head_dim, config)
      self.norm_added_k = layers.RMSNorm(head_dim, config)
      self.add_q_proj = linear(dim, dim, ("embed", "heads"), config, rngs)
      self.add_k_proj = linear(dim, dim, ("embed", "heads"), config, rngs)
      self.add_v_proj = linear(dim, dim, ("embed", "heads"), config, rngs)
      self.to_add_out = linear(dim, dim, ("heads", "embed"), config, rngs)

  def _heads(self, x: jax.Array) -> jax.Array:
    return shard(x.reshape(*x.shape[:-1], -1, self.head_dim), _HEADS)

  def qkv(self, x: jax.Array, *, added: bool = False):
    if added:
      q, k, v = self.add_q_proj(x), self.add_k_proj(x), self.add_v_proj(x)
      return self.norm_added_q(self._heads(q)), self.norm_added_k(self._heads(k)), self._heads(v)
    q, k, v = self.to_q(x), self.to_k(x), self.to_v(x)
    return self.norm_q(self._heads(q)), self.norm_k(self._heads(k)), self._heads(v)

  def attend(self, q, k, v, cos, sin) -> jax.Array:
    q, k = layers.apply_rope(q, cos, sin), layers.apply_rope(k, cos, sin)
    out = layers.attention(q, k, v, self.implementation)
    return out.reshape(*out.shape[:2], -1)


class FluxTransformerBlock(nnx.Module):
  """Double-stream block: separate weights per stream, one joint attention."""

  def __init__(self, config: FluxConfig, *, rngs: nnx.Rngs):
    self.norm1 = layers.AdaLayerNormZero(config, rngs=rngs)
    self.norm1_context = layers.AdaLayerNormZero(config, rngs=rngs)
    self.attn = FluxAttention(config, context=True, pre_only=False, rngs=rngs)
    self.ff = layers.FeedForward(config, rngs=rngs)
    self.ff_context = layers.FeedForward(config, rngs=rngs)

  def __call__(self, x, c, temb, cos, sin) -> tuple[jax.Array, jax.Array]:
    """x: image stream (B, N, D); c: text stream (B, T, D) -> updated (x, c)."""
    xn, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1(x, temb)
    cn, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context(c, temb)
    q, k, v = self.attn.qkv(xn)
    cq, ck, cv = self.attn.qkv(cn, added=True)
    joint = self.attn.attend(
      jnp.concatenate([cq, q], axis=1),
      jnp.concatenate([ck, k], axis=1),
      jnp.concatenate([cv, v], axis=1),
      cos,
      sin,
    )
    text_len = c.shape[1]
    c_attn, x_attn = joint[:, :text_len], joint[:, text_len:]

    x = x + gate_msa[:, None] * self.attn.to_out[0](x_attn)
    x = x + gate_mlp[:, None] * self.ff(layers.modulate(x, shift_mlp, scale_mlp))
    c = c + c_gate_msa[:, None] * self.attn.to_add_out(c_attn)
    c = c + c_gate_mlp[:, None] * self.ff_context(layers.modulate(c, c_shift_mlp, c_scale_mlp))
    return shard(x, _TOKENS), shard(c, _TOKENS)


class FluxSingleTransformerBlock(nnx.Module):
  """Single-stream block: attention and MLP in parallel on the joint [text; image] sequence."""

  def __init__(self, config: FluxConfig, *, rngs: nnx.Rngs):
    dim, hidden = config.inner_dim, config.mlp_hidden_dim
    self.norm = layers.AdaLayerNormZeroSingle(config, rngs=rngs)
    self.proj_mlp = linear(dim, hidden, ("embed", "mlp"), config, rngs)
    self.proj_out = linear(dim + hidden, dim, ("mlp", "embed"), config, rngs)
    self.attn = FluxAttention(config, context=False, pre_only=True, rngs=rngs)

  def __call__(self, h, temb, cos, sin) -> jax.Array:
    hn, gate = self.norm(h, temb)
    mlp = layers.gelu_tanh(self.proj_mlp(hn))
    attn = self.attn.attend(*self.attn.qkv(hn), cos, sin)
    h = h + gate[:, None] * self.proj_out(jnp.concatenate([attn, mlp], axis=-1))
    return shard(h, _TOKENS)
