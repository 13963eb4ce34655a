"""Qwen2.5-VL vision tower (ViT with window attention + 2x2 patch merger) in Flax NNX.

Mirrors transformers 5.24 `Qwen2_5_VisionTransformerPretrainedModel` (qwen25vl_reward.md §3.3)
at fp32 parity. Everything that depends on the image sizes (`grid_thw`) is computed on the host
by `vision_metadata` from a concrete grid, so the jitted forward sees static shapes only:

* The patch sequence is permuted into *window order* (merge-unit granularity) before the blocks,
  as transformers does. Window blocks attend within windows and full-attention blocks within one
  image frame; both are contiguous segments of the window-ordered sequence.
* Each segment kind is run as padded batched attention: `gather` (S, L) picks every segment's
  patches out of the flat (N, C) sequence, `mask` (S, L) marks real keys, and `scatter` (N,)
  puts the rows of the flattened (S * L) result back. This is exact (padding keys are masked,
  padding queries are dropped) and costs S * L^2, not the N^2 of a block-diagonal mask.
* Under a mesh that splits the batch, images of one size (a training batch: the loader resizes
  them all) run as (images, patches, C) with the indices of one image: they then act on an
  axis that is not split, and the images axis stays split over the devices. Indexing the flat
  sequence with data-dependent indices makes XLA gather all of it onto every device: for
  SpatialScore-7B at 64 images of 448 px, arrays of all 65,536 patches in every layer of every
  device (docs/results/plan_full_size.md). On one device the flat layout runs, as transformers
  does, with the same numbers to the bit as before this layout existed.

Attribute names follow the HF modules, so an HF `[out, in]` weight is our `[in, out]` kernel:
`patch_embed.proj`, `blocks.{i}.{norm1,norm2,attn.qkv,attn.proj,mlp.*}`, `merger.{ln_q,mlp_0,mlp_2}`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from spatial_jax import sharding
from spatial_jax.models.common import activation, linear
from spatial_jax.models.qwen25vl.config import Qwen25VLConfig, VisionConfig
from spatial_jax.models.qwen25vl.layers import (
  GatedMLP,
  RMSNorm,
  apply_rotary,
  attention,
  dtype_of,
  remat_call,
)
from spatial_jax.sharding import shard

# The flat patch sequence has no batch axis: patches of all images (of all examples) are
# concatenated. Its leading axis is the one to split over data-parallel devices, so it takes
# `act_batch`; in the per-image layout the images axis does. Likewise the segment axis (windows /
# frames) of the batched attention.
_FLAT = ("act_batch", "act_embed")
_PER_IMAGE = ("act_batch", "act_seq", "act_embed")
_GROUPED = ("act_batch", "act_seq", "act_heads", "act_head_dim")


def _tokens_spec(x: jax.Array) -> tuple[str, ...]:
  return _FLAT if x.ndim == 2 else _PER_IMAGE


# -- Host-side metadata ----------------------------------------------------------------------


@struct.dataclass
class Segments:
  """Padded batched-attention layout of contiguous segments of the flat sequence.

  Attributes:
    gather: (S, L) int32 rows of the flat (N, C) sequence; padding slots point at row 0.
    mask: (S, L) bool, True for real tokens (used as the key-padding mask).
    scatter: (N,) int32 position of each flat row in the flattened (S * L) padded layout.
  """

  gather: np.ndarray
  mask: np.ndarray
  scatter: np.ndarray


@struct.dataclass
class VisionMetadata:
  """Everything data-dependent of the vision forward; a pytree of arrays (pass it into jit).

  Attributes:
    position_ids: (N, 2) int32 rotary (h, w) per patch, block-major, in input (raster) order.
    window_index: (N / merge_unit,) int32 window-order permutation of merged tokens.
    reverse_index: (N / merge_unit,) int32 its inverse (argsort), restoring raster order.
    window: `Segments` of the window-attention blocks (one segment per non-empty window).
    full: `Segments` of the full-attention blocks (one segment per image frame).
    image: when the images (more than one) share one grid, the metadata of one of them: the
      per-image layout that a mesh splitting the batch runs; None otherwise.
    images: how many images `image` stands for (static).
  """

  position_ids: np.ndarray
  window_index: np.ndarray
  reverse_index: np.ndarray
  window: Segments
  full: Segments
  image: VisionMetadata | None = None
  images: int = struct.field(pytree_node=False, default=1)

  @property
  def num_patches(self) -> int:
    return self.position_ids.shape[0]


def _check_grid(grid_thw: np.ndarray, cfg: VisionConfig) -> np.ndarray:
  grid = np.asarray(grid_thw)
  if grid.ndim != 2 or grid.shape[1] != 3 or grid.shape[0] == 0:
    raise ValueError(f"grid_thw must have shape (num_images, 3), got {grid.shape}.")
  if not np.issubdtype(grid.dtype, np.integer) or (grid <= 0).any():
    raise ValueError(f"grid_thw must hold positive integers, got {grid.tolist()}.")
  m = cfg.spatial_merge_size
  if (grid[:, 1:] % m).any():
    raise ValueError(
      f"grid_thw h and w must be multiples of spatial_merge_size={m}, got {grid.tolist()}."
    )
  if cfg.window_merged < 1:
    raise ValueError(
      f"window_size={cfg.window_size} is smaller than spatial_merge_size * patch_size = "
      f"{m * cfg.patch_size}."
    )
  return grid.astype(np.int64)


def vision_position_ids(grid_thw: np.ndarray, spatial_merge_size: int) -> np.ndarray:
  """(N, 2) (h, w) per patch in merge-block-major order, repeated per frame.

  Same as transformers' `get_vision_position_ids`: the processor emits patches in this order.
  """
  m = spatial_merge_size
  out = []
  for t, h, w in np.asarray(grid_thw).tolist():
    hpos, wpos = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    block = (h // m, m, w // m, m)
    hpos = hpos.reshape(block).transpose(0, 2, 1, 3).reshape(-1)
    wpos = wpos.reshape(block).transpose(0, 2, 1, 3).reshape(-1)
    out.append(np.tile(np.stack([hpos, wpos], axis=-1), (t, 1)))
  return np.concatenate(out).astype(np.int32)


def vision_window_index(grid_thw: np.ndarray, cfg: VisionConfig) -> tuple[np.ndarray, np.ndarray]:
  """Window permutation of merged tokens and window boundaries in patch units.

  Same as transformers' `get_vision_window_index`, including its quirks: each merged grid side
  is padded by `window - side % window`, i.e. a whole extra (empty) window when the side is
  already divisible, and empty windows are dropped again by the final unique-consecutive.

  Returns:
    window_index: (N / merge_unit,) int32.
    cu_window_seqlens: (num_windows + 1,) int32 cumulative window lengths in patches.
  """
  grid = _check_grid(grid_thw, cfg)
  m, win, unit = cfg.spatial_merge_size, cfg.window_merged, cfg.merge_unit
  index, cu, offset = [], [0], 0
  for t, h, w in grid.tolist():
    gh, gw = h // m, w // m
    grid_index = np.arange(t * gh * gw).reshape(t, gh, gw)
    pad_h, pad_w = win - gh % win, win - gw % win
    nh, nw = (gh + pad_h) // win, (gw + pad_w) // win
    padded = np.pad(grid_index, ((0, 0), (0, pad_h), (0, pad_w)), constant_values=-1)
    padded = padded.reshape(t, nh, win, nw, win).transpose(0, 1, 3, 2, 4).reshape(-1, win * win)
    valid = padded >= 0
    index.append(padded[valid] + offset)
    cu.extend((cu[-1] + np.cumsum(valid.sum(-1)) * unit).tolist())
    offset += t * gh * gw
  cu = np.asarray(cu)
  cu = np.concatenate([cu[:1], cu[1:][np.diff(cu) != 0]])
  return np.concatenate(index).astype(np.int32), cu.astype(np.int32)


def vision_cu_seqlens(grid_thw: np.ndarray) -> np.ndarray:
  """(num_frames + 1,) cumulative h * w per frame: the full-attention segments."""
  grid = np.asarray(grid_thw)
  lengths = np.repeat(grid[:, 1] * grid[:, 2], grid[:, 0])
  return np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)


def segments_from_cu(cu_seqlens: np.ndarray) -> Segments:
  """Padded (S, L) gather/mask and the (N,) inverse scatter for contiguous segments."""
  cu = np.asarray(cu_seqlens, dtype=np.int64)
  lengths = np.diff(cu)
  if (lengths <= 0).any():
    raise ValueError(f"Segments must be non-empty, got cu_seqlens {cu.tolist()}.")
  max_len = int(lengths.max())
  slot = np.arange(max_len)
  mask = slot[None, :] < lengths[:, None]
  # Padding slots read row 0: any real row works, their keys are masked and queries dropped.
  gather = np.where(mask, cu[:-1, None] + slot[None, :], 0)
  positions = np.arange(cu[-1])
  segment = np.searchsorted(cu, positions, side="right") - 1
  scatter = segment * max_len + positions - cu[segment]
  return Segments(gather=gather.astype(np.int32), mask=mask, scatter=scatter.astype(np.int32))


def vision_metadata(grid_thw: np.ndarray, cfg: VisionConfig) -> VisionMetadata:
  """Host-side metadata of one vision forward for a concrete `grid_thw` (num_images, 3).

  Memoised on (grid, cfg): a training run sees the same grid every step (its images share one
  size), and building the indices took ~20 ms of the ~110 ms a reward batch costs the host. The
  arrays are read-only, as they are shared between calls.
  """
  grid = _check_grid(grid_thw, cfg)
  meta = _vision_metadata(tuple(map(tuple, grid.tolist())), cfg)
  if len(grid) > 1 and (grid == grid[:1]).all():
    meta = meta.replace(image=_vision_metadata((tuple(grid[0].tolist()),), cfg), images=len(grid))
  return meta


@functools.lru_cache(maxsize=16)
def _vision_metadata(grid: tuple[tuple[int, int, int], ...], cfg: VisionConfig) -> VisionMetadata:
  grid = np.asarray(grid, np.int64)
  window_index, cu_window_seqlens = vision_window_index(grid, cfg)
  meta = VisionMetadata(
    position_ids=vision_position_ids(grid, cfg.spatial_merge_size),
    window_index=window_index,
    reverse_index=np.argsort(window_index).astype(np.int32),
    window=segments_from_cu(cu_window_seqlens),
    full=segments_from_cu(vision_cu_seqlens(grid)),
  )
  for array in jax.tree.leaves(meta):
    array.setflags(write=False)
  return meta


# -- Modules ---------------------------------------------------------------------------------


def _to_window_order(x: jax.Array, window_index: jax.Array, unit: int) -> jax.Array:
  """Permutes rows of (..., N, C) in groups of `unit` consecutive rows (one merged token)."""
  *lead, n, width = x.shape
  return x.reshape(*lead, n // unit, unit, width)[..., window_index, :, :].reshape(x.shape)


def vision_rotary(position_ids: jax.Array, cfg: VisionConfig) -> tuple[jax.Array, jax.Array]:
  """fp32 (N, head_dim) cos/sin of the axial 2D rope: [f(h), f(w), f(h), f(w)]."""
  dim = cfg.head_dim // 2
  inv_freq = 1.0 / (cfg.rope_theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
  freqs = position_ids.astype(jnp.float32)[..., None] * inv_freq  # (N, 2, dim / 2)
  freqs = freqs.reshape(freqs.shape[0], dim)  # cat(freq_h, freq_w)
  freqs = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(freqs), jnp.sin(freqs)


class PatchEmbed(nnx.Module):
  """Conv3d with stride == kernel == one patch, i.e. a matmul over (C, T, P, P) patch rows."""

  def __init__(self, cfg: Qwen25VLConfig, *, rngs: nnx.Rngs):
    v = cfg.vision
    self.proj = linear(
      v.patch_dim,
      v.hidden_size,
      ("conv_in", "embed"),
      cfg,
      rngs,
      use_bias=False,  # Conv3d(bias=False).
      init_std=v.initializer_range,
    )

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.proj(x)


class VisionAttention(nnx.Module):
  """Fused-qkv attention over padded segments, with the 2D rope applied in fp32."""

  def __init__(self, cfg: Qwen25VLConfig, *, rngs: nnx.Rngs):
    v = cfg.vision
    std = v.initializer_range
    self.qkv = linear(v.hidden_size, 3 * v.hidden_size, ("embed", "heads"), cfg, rngs, init_std=std)
    self.proj = linear(v.hidden_size, v.hidden_size, ("heads", "embed"), cfg, rngs, init_std=std)
    self.num_heads = v.num_heads
    self.implementation = cfg.attention_impl

  def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, seg: Segments) -> jax.Array:
    """x: (N, C) flat, or (images, N, C) per image with `seg` of one image."""
    *lead, n, width = x.shape
    heads, head_dim = self.num_heads, width // self.num_heads
    # HF splits the fused output as (3, heads, head_dim): q, k, v each span all heads.
    qkv = self.qkv(x).reshape(*lead, n, 3, heads, head_dim)
    q, k, v = qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]
    cos, sin = cos[:, None, :], sin[:, None, :]
    # fp32 rotation then cast back, as `apply_rotary_pos_emb_vision` does.
    q = apply_rotary(q.astype(jnp.float32), cos, sin).astype(q.dtype)
    k = apply_rotary(k.astype(jnp.float32), cos, sin).astype(k.dtype)
    segments, length = seg.gather.shape
    # Per image: (images, segments, L, ...) -> one batch of images * segments padded segments.
    q, k, v = (
      shard(t[..., seg.gather, :, :].reshape(-1, length, heads, head_dim), _GROUPED)
      for t in (q, k, v)
    )
    mask = jnp.tile(seg.mask, (*lead, 1)) if lead else seg.mask
    out = attention(q, k, v, mask=mask[:, None, None, :], implementation=self.implementation)
    out = shard(out, _GROUPED)
    out = out.reshape(*lead, segments * length, width)[..., seg.scatter, :]
    return self.proj(out)


class VisionBlock(nnx.Module):
  """Pre-norm residual block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

  def __init__(self, cfg: Qwen25VLConfig, *, rngs: nnx.Rngs):
    v = cfg.vision
    self.norm1 = RMSNorm(v.hidden_size, eps=v.rms_norm_eps, param_dtype=cfg.param_dtype)
    self.norm2 = RMSNorm(v.hidden_size, eps=v.rms_norm_eps, param_dtype=cfg.param_dtype)
    self.attn = VisionAttention(cfg, rngs=rngs)
    self.mlp = GatedMLP(
      v.hidden_size,
      v.intermediate_size,
      act=v.hidden_act,
      use_bias=True,
      config=cfg,
      rngs=rngs,
      init_std=v.initializer_range,
    )

  def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, seg: Segments) -> jax.Array:
    x = x + self.attn(self.norm1(x), cos, sin, seg)
    x = x + self.mlp(self.norm2(x))
    return shard(x, _tokens_spec(x))


class PatchMerger(nnx.Module):
  """RMSNorm, then each merge unit's `merge_unit` consecutive rows -> Linear, GELU, Linear."""

  def __init__(self, cfg: Qwen25VLConfig, *, rngs: nnx.Rngs):
    v = cfg.vision
    width = v.hidden_size * v.merge_unit
    std = v.initializer_range
    self.ln_q = RMSNorm(v.hidden_size, eps=v.rms_norm_eps, param_dtype=cfg.param_dtype)
    self.mlp_0 = linear(width, width, ("embed", "mlp"), cfg, rngs, init_std=std)
    self.mlp_2 = linear(width, v.out_hidden_size, ("mlp", "embed"), cfg, rngs, init_std=std)
    self.width = width

  def __call__(self, x: jax.Array) -> jax.Array:
    """(..., N, hidden) -> (..., N / merge_unit, out_hidden_size)."""
    x = self.ln_q(x).reshape(*x.shape[:-2], -1, self.width)
    # nn.GELU() in torch is the exact erf form.
    return self.mlp_2(activation("gelu")(self.mlp_0(x)))


class VisionTransformer(nnx.Module):
  """The Qwen2.5-VL vision tower: patches (N, patch_dim) -> merged tokens (N / unit, out)."""

  def __init__(self, cfg: Qwen25VLConfig, *, rngs: nnx.Rngs):
    self.vision = cfg.vision
    self.dtype = cfg.dtype
    self.remat = cfg.remat
    self.patch_embed = PatchEmbed(cfg, rngs=rngs)
    self.blocks = nnx.List([VisionBlock(cfg, rngs=rngs) for _ in range(cfg.vision.depth)])
    self.merger = PatchMerger(cfg, rngs=rngs)

  def __call__(
    self,
    pixel_values: jax.Array,
    meta: VisionMetadata,
    *,
    return_hidden_states: bool = False,
  ) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Runs the tower.

    Args:
      pixel_values: (N, patch_dim) patch rows as the processor emits them (block-major).
      meta: `vision_metadata(grid_thw, cfg.vision)` for the same images.
      return_hidden_states: also return the pre-merger hidden states.

    Returns:
      The merged tokens (N / merge_unit, out_hidden_size) in raster (LLM placeholder) order,
      i.e. HF's `pooler_output`; with `return_hidden_states`, also the (N, hidden) last hidden
      states in *window order*, exactly HF's `last_hidden_state`.
    """
    v = self.vision
    n = meta.num_patches
    if pixel_values.ndim != 2 or pixel_values.shape != (n, v.patch_dim):
      raise ValueError(
        f"pixel_values must have shape (num_patches={n}, patch_dim={v.patch_dim}) to match "
        f"the metadata's grid_thw, got {pixel_values.shape}."
      )
    x = self.patch_embed(pixel_values.astype(dtype_of(self.dtype)))
    layout = meta
    if meta.image is not None and sharding.active_batch_split() > 1:
      layout = meta.image  # Per image (module docstring); the same values as the flat layout.
      x = x.reshape(meta.images, layout.num_patches, -1)
    x = shard(_to_window_order(x, layout.window_index, v.merge_unit), _tokens_spec(x))
    cos, sin = vision_rotary(layout.position_ids, v)
    cos = _to_window_order(cos, layout.window_index, v.merge_unit)
    sin = _to_window_order(sin, layout.window_index, v.merge_unit)

    for i, block in enumerate(self.blocks):
      seg = layout.full if i in v.fullatt_block_indexes else layout.window
      if self.remat:
        x = remat_call(block, x, cos, sin, seg)
      else:
        x = block(x, cos, sin, seg)
    merged = self.merger(x)[..., layout.reverse_index, :]
    merged = shard(merged, _tokens_spec(merged)).reshape(-1, merged.shape[-1])
    if return_hidden_states:
      return merged, x.reshape(-1, x.shape[-1])
    return merged
