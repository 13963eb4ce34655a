"""Qwen2.5-VL vision tower: metadata and fp32 parity against transformers' implementation."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import Qwen2_5_VLVisionConfig
from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as hf_qwen
from transformers.vision_utils import (
  get_vision_cu_seqlens,
  get_vision_position_ids,
  get_vision_window_index,
)

from spatial_jax import sharding
from spatial_jax.models.qwen25vl import vision
from spatial_jax.models.qwen25vl.config import Qwen25VLConfig, VisionConfig

TINY = Qwen25VLConfig.tiny()
# merge 1 (no 2x2 grouping), temporal patch 1, 3-merged-token windows, full attention first.
ALT = TINY.replace(
  vision=VisionConfig(
    depth=3,
    hidden_size=16,
    intermediate_size=24,
    num_heads=2,
    out_hidden_size=20,
    in_channels=3,
    patch_size=2,
    temporal_patch_size=1,
    spatial_merge_size=1,
    window_size=6,
    fullatt_block_indexes=(0,),
    hidden_act="silu",
  )
)


def _hf_config(v: VisionConfig) -> Qwen2_5_VLVisionConfig:
  hf = Qwen2_5_VLVisionConfig(
    depth=v.depth,
    hidden_size=v.hidden_size,
    intermediate_size=v.intermediate_size,
    num_heads=v.num_heads,
    out_hidden_size=v.out_hidden_size,
    in_channels=v.in_channels,
    patch_size=v.patch_size,
    temporal_patch_size=v.temporal_patch_size,
    spatial_merge_size=v.spatial_merge_size,
    window_size=v.window_size,
    fullatt_block_indexes=list(v.fullatt_block_indexes),
    hidden_act=v.hidden_act,
  )
  hf._attn_implementation = "eager"
  return hf


@functools.cache
def _hf_model(cfg: Qwen25VLConfig) -> hf_qwen.Qwen2_5_VisionTransformerPretrainedModel:
  """Random fp32 HF tower; norms and biases randomised too, so no parameter is a no-op."""
  torch.manual_seed(0)
  model = hf_qwen.Qwen2_5_VisionTransformerPretrainedModel(_hf_config(cfg.vision)).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("norm1.weight") or name.endswith("norm2.weight") or "ln_q" in name:
        p.copy_(1.0 + 0.2 * torch.randn_like(p))
      elif p.ndim == 1:
        p.copy_(0.1 * torch.randn_like(p))
      else:
        fan_in = p[0].numel()
        p.copy_(torch.randn_like(p) / fan_in**0.5)
  return model


def _load_from_torch(model: vision.VisionTransformer, state_dict) -> None:
  """HF keys -> our attributes; the same map params.py implements for `visual.*`."""
  for key, tensor in state_dict.items():
    value = tensor.detach().numpy()
    path = key.replace("merger.mlp.0", "merger.mlp_0").replace("merger.mlp.2", "merger.mlp_2")
    if path.endswith(".weight") and value.ndim > 1:
      path = path[: -len(".weight")] + ".kernel"
      value = value.reshape(value.shape[0], -1).T  # Conv3d (out, C, T, P, P) -> (C*T*P*P, out)
    *parents, leaf = path.split(".")
    node = model
    for part in parents:
      node = node[int(part)] if part.isdigit() else getattr(node, part)
    variable = getattr(node, leaf)
    assert variable.shape == value.shape, (key, variable.shape, value.shape)
    variable.set_value(jnp.asarray(value))


@functools.cache
def _models(cfg: Qwen25VLConfig):
  hf = _hf_model(cfg)
  # Abstract construction (no per-op eager init): the loader overwrites every parameter.
  with nnx.use_eager_sharding(False):
    ours = nnx.eval_shape(lambda: vision.VisionTransformer(cfg, rngs=nnx.Rngs(0)))
  _load_from_torch(ours, hf.state_dict())
  leaves = jax.tree.leaves(nnx.state(ours))
  assert all(isinstance(leaf, jax.Array) for leaf in leaves), "a parameter was not loaded"
  return hf, ours


def _jitted(model: vision.VisionTransformer, pixels, meta, **kwargs):
  graphdef, state = nnx.split(model)
  return _jit_forward(graphdef, state, pixels, meta, **kwargs)


@functools.partial(jax.jit, static_argnums=0, static_argnames="return_hidden_states")
def _jit_forward(graphdef, state, pixels, meta, return_hidden_states=False):
  return nnx.merge(graphdef, state)(pixels, meta, return_hidden_states=return_hidden_states)


def _pixels(cfg: Qwen25VLConfig, grid: np.ndarray, seed: int = 0) -> np.ndarray:
  n = int(np.prod(grid, axis=-1).sum())
  return np.random.default_rng(seed).normal(size=(n, cfg.vision.patch_dim)).astype(np.float32)


def _hf_forward(cfg, grid, pixels):
  hf, _ = _models(cfg)
  with torch.no_grad():
    out = hf(torch.from_numpy(pixels), grid_thw=torch.from_numpy(grid))
  return out.pooler_output.numpy(), out.last_hidden_state.numpy()


# (a) two images, ragged windows (4x5 and 3x3 merged tokens, 2x2 windows); (b) divisible grid;
# (c) merge 1, a two-frame video (t=2) next to a ragged image.
PARITY_CASES = [
  ("ragged_two_images", TINY, [[1, 8, 10], [1, 6, 6]]),
  ("divisible", TINY, [[1, 8, 8]]),
  ("merge1_video", ALT, [[2, 7, 5], [1, 3, 8]]),
  # Images of one size: the tower runs them as groups (images, patches, C).
  ("same_size_images", TINY, [[1, 8, 10]] * 3),
]


@pytest.mark.parametrize("name,cfg,grid", PARITY_CASES, ids=[c[0] for c in PARITY_CASES])
def test_parity_with_transformers(name, cfg, grid):
  del name
  grid = np.asarray(grid, dtype=np.int64)
  pixels = _pixels(cfg, grid)
  want_merged, want_hidden = _hf_forward(cfg, grid, pixels)
  _, ours = _models(cfg)
  meta = vision.vision_metadata(grid, cfg.vision)
  same_size = len(grid) > 1 and (grid == grid[:1]).all()
  assert (meta.image is not None) == same_size and meta.images == (len(grid) if same_size else 1)
  # Both attention kinds really run, and windows are not just whole frames.
  assert 0 < len(cfg.vision.fullatt_block_indexes) < cfg.vision.depth
  assert meta.window.gather.shape[0] > meta.full.gather.shape[0]
  merged, hidden = _jitted(ours, jnp.asarray(pixels), meta, return_hidden_states=True)
  assert (
    merged.shape
    == want_merged.shape
    == (len(pixels) // cfg.vision.merge_unit, cfg.vision.out_hidden_size)
  )
  np.testing.assert_allclose(np.asarray(hidden), want_hidden, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(merged), want_merged, rtol=1e-5, atol=1e-5)


METADATA_GRIDS = [
  (TINY, [[1, 8, 10], [1, 6, 6]]),
  (TINY, [[1, 8, 8], [3, 2, 4]]),
  (TINY, [[2, 12, 6]]),
  (ALT, [[2, 7, 5], [1, 3, 8], [1, 1, 1]]),
  (Qwen25VLConfig.qwen25vl_7b(), [[1, 70, 70], [1, 32, 32], [1, 4, 36]]),
]


@pytest.mark.parametrize("cfg,grid", METADATA_GRIDS)
def test_metadata_matches_transformers_helpers(cfg, grid):
  v = cfg.vision
  grid = np.asarray(grid, dtype=np.int64)
  grid_t = torch.from_numpy(grid)
  meta = vision.vision_metadata(grid, v)
  # Memoised: the same grid again gives the same (read-only) arrays.
  again = vision.vision_metadata(grid.copy(), v)
  for a, b in zip(jax.tree.leaves(meta), jax.tree.leaves(again), strict=True):
    assert a is b and not a.flags.writeable
  want_index, want_cu_window = get_vision_window_index(
    grid_t, v.spatial_merge_size, v.window_size, v.patch_size
  )
  index, cu_window = vision.vision_window_index(grid, v)
  np.testing.assert_array_equal(index, want_index.numpy())
  np.testing.assert_array_equal(cu_window, want_cu_window.numpy())
  np.testing.assert_array_equal(meta.window_index, want_index.numpy())
  np.testing.assert_array_equal(meta.reverse_index, np.argsort(want_index.numpy()))
  np.testing.assert_array_equal(
    meta.position_ids, get_vision_position_ids(grid_t, v.spatial_merge_size).numpy()
  )
  cu_full = get_vision_cu_seqlens(grid_t).numpy()
  np.testing.assert_array_equal(vision.vision_cu_seqlens(grid), cu_full)

  n = meta.num_patches
  for seg, cu in ((meta.window, want_cu_window.numpy()), (meta.full, cu_full)):
    lengths = np.diff(cu)
    assert seg.gather.shape == seg.mask.shape == (len(lengths), lengths.max())
    np.testing.assert_array_equal(seg.mask.sum(-1), lengths)
    # Each padded row holds exactly its segment's contiguous patches, in order.
    for row, start, length in zip(seg.gather, cu[:-1], lengths, strict=True):
      np.testing.assert_array_equal(row[:length], np.arange(start, start + length))
    # scatter inverts gather: flat -> padded -> flat is the identity.
    np.testing.assert_array_equal(seg.gather.reshape(-1)[seg.scatter], np.arange(n))


def test_metadata_rejects_bad_grids():
  v = TINY.vision
  with pytest.raises(ValueError, match="spatial_merge_size"):
    vision.vision_metadata(np.array([[1, 7, 8]]), v)
  with pytest.raises(ValueError, match=r"\(num_images, 3\)"):
    vision.vision_metadata(np.array([1, 8, 8]), v)
  _, ours = _models(TINY)
  meta = vision.vision_metadata(np.array([[1, 8, 8]]), v)
  with pytest.raises(ValueError, match="num_patches=64"):
    ours(jnp.zeros((60, v.patch_dim)), meta)


@pytest.mark.slow
def test_jit_with_metadata_argument_matches_eager():
  grid = np.array([[1, 8, 10], [1, 6, 6]])
  _, ours = _models(TINY)
  pixels = jnp.asarray(_pixels(TINY, grid, seed=1))
  meta = vision.vision_metadata(grid, TINY.vision)
  graphdef, state = nnx.split(ours)

  @jax.jit
  def forward(state, pixels, meta):
    return nnx.merge(graphdef, state)(pixels, meta)

  eager = ours(pixels, meta)
  np.testing.assert_allclose(np.asarray(forward(state, pixels, meta)), eager, rtol=1e-6, atol=1e-6)
  # Another grid with the same metadata shapes reuses the compiled program (no retrace).
  other = vision.vision_metadata(np.array([[1, 10, 8], [1, 6, 6]]), TINY.vision)
  assert jax.tree.map(np.shape, other) == jax.tree.map(np.shape, meta)
  np.testing.assert_allclose(
    np.asarray(forward(state, pixels, other)), ours(pixels, other), rtol=1e-6, atol=1e-6
  )
  assert forward._cache_size() == 1


def test_remat_gradients_match():
  grid = np.array([[1, 8, 10], [1, 6, 6]])
  _, plain = _models(TINY)
  pixels = jnp.asarray(_pixels(TINY, grid, seed=2))
  meta = vision.vision_metadata(grid, TINY.vision)
  with nnx.use_eager_sharding(False):
    abstract = nnx.eval_shape(
      lambda: vision.VisionTransformer(TINY.replace(remat=True), rngs=nnx.Rngs(0))
    )
  remat = nnx.merge(nnx.graphdef(abstract), nnx.state(plain))

  def loss(model, pixels):
    return jnp.sum(jnp.square(model(pixels, meta)))

  jaxpr = str(jax.make_jaxpr(loss)(remat, pixels))
  assert len(re.findall(r"\b(?:remat2|checkpoint)\[", jaxpr)) == TINY.vision.depth
  want = jax.jit(jax.grad(loss, argnums=1))(plain, pixels)
  got = jax.jit(jax.grad(loss, argnums=1))(remat, pixels)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("grid", [[[1, 8, 10], [1, 6, 6]], [[1, 8, 10], [1, 6, 6], [1, 6, 2]]])
def test_sharded_forward_matches(grid):
  """Params sharded by their names, patches split over 8 data devices (116 patches: uneven)."""
  grid = np.asarray(grid)
  _, plain = _models(TINY)
  pixels = jnp.asarray(_pixels(TINY, grid, seed=3))
  meta = vision.vision_metadata(grid, TINY.vision)
  rules = sharding.resolve_rules()
  mesh = sharding.make_mesh()
  sharded = sharding.create_sharded(
    lambda: vision.VisionTransformer(TINY, rngs=nnx.Rngs(0)), mesh, rules
  )
  graphdef, sharded_state = nnx.split(sharded)
  # The loaded weights, placed as the sharded model's annotations say.
  state = jax.tree.map(lambda s, p: jax.device_put(p, s.sharding), sharded_state, nnx.state(plain))
  with sharding.use_mesh(mesh, rules):
    out = jax.jit(lambda s, p, m: nnx.merge(graphdef, s)(p, m))(state, pixels, meta)
  np.testing.assert_allclose(np.asarray(out), _jitted(plain, pixels, meta), rtol=1e-5, atol=1e-5)
  if out.shape[0] % 8 == 0:  # jit returns an uneven result replicated.
    want = sharding.named_sharding(mesh, ("act_batch", "act_embed"), rules)
    assert out.sharding.is_equivalent_to(want, out.ndim), out.sharding


def test_same_size_images_stay_split_over_devices():
  """Four same-size images on 4 data devices: each device's vision activations hold one image.

  Indexing the concatenated sequence (metadata without `image`) gathers all patches onto every
  device; the per-image layout keeps the images axis split (SpatialScore-7B: 64 x 1,024 patches).
  """
  grid = np.array([[1, 8, 8]] * 4)
  patches = int(grid.prod(-1).sum())
  _, plain = _models(TINY)
  pixels = jnp.asarray(_pixels(TINY, grid, seed=4))
  rules = sharding.resolve_rules()
  mesh = sharding.make_mesh([("fsdp", 4)], jax.devices()[:4])
  graphdef, state = nnx.split(plain)
  state = jax.device_put(state, sharding.named_sharding(mesh, (), rules))
  pixels = jax.device_put(pixels, sharding.named_sharding(mesh, ("act_batch", None), rules))

  def holds_all_patches(meta) -> bool:
    """Whether some f32 array of the partitioned program has an axis of all the patches."""
    with sharding.use_mesh(mesh, rules):
      fn = jax.jit(lambda s, p, m: nnx.merge(graphdef, s)(p, m))
      hlo = fn.lower(state, pixels, meta).compile().as_text()
      out = fn(state, pixels, meta)
    np.testing.assert_allclose(np.asarray(out), _jitted(plain, pixels, meta), rtol=1e-5, atol=1e-5)
    shapes = re.findall(r"f32\[([\d,]+)\]", hlo)
    return any(patches in map(int, shape.split(",")) for shape in shapes)

  grouped = vision.vision_metadata(grid, TINY.vision)
  flat = grouped.replace(image=None)
  assert grouped.images == 4 and grouped.image.num_patches == patches // 4
  assert holds_all_patches(flat)
  assert not holds_all_patches(grouped)
