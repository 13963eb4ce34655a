"""rope_index against transformers 5.24 `Qwen2_5_VLModel.get_rope_index` (exact integers)."""

import numpy as np
import pytest
import torch
from transformers import Qwen2_5_VLConfig
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLModel

from spatial_jax.models.qwen25vl.config import Qwen25VLConfig
from spatial_jax.models.qwen25vl.rope_index import rope_index

CFG = Qwen25VLConfig.tiny()
IMAGE, START, END, PAD = CFG.image_token_id, CFG.vision_start_token_id, CFG.vision_end_token_id, 0
MERGE = CFG.vision.spatial_merge_size


@pytest.fixture(scope="module")
def hf_model():
  """A one-layer tiny Qwen2_5_VLModel: only its config and position code are used."""
  hf_cfg = Qwen2_5_VLConfig(
    text_config=dict(
      vocab_size=128,
      hidden_size=16,
      intermediate_size=16,
      num_hidden_layers=1,
      num_attention_heads=2,
      num_key_value_heads=1,
      rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[1, 1, 2]),
      bos_token_id=1,
      eos_token_id=2,
    ),
    vision_config=dict(
      depth=1,
      hidden_size=16,
      intermediate_size=16,
      num_heads=2,
      out_hidden_size=16,
      patch_size=4,
      spatial_merge_size=MERGE,
      tokens_per_second=2,
    ),
    image_token_id=IMAGE,
    video_token_id=CFG.video_token_id,
    vision_start_token_id=START,
  )
  return Qwen2_5_VLModel(hf_cfg).eval()


def _row(segments, rng):
  """Token ids for segments: an int n is n text tokens, a (t, h, w) tuple is one image."""
  ids, grids = [], []
  for seg in segments:
    if isinstance(seg, int):
      ids += list(rng.integers(8, 128, size=seg))
    else:
      t, h, w = seg
      ids += [START] + [IMAGE] * (t * (h // MERGE) * (w // MERGE)) + [END]
      grids.append(seg)
  return ids, grids


def _batch(rows, pad_side, rng):
  """Pads rows of segments to one length; returns ids, mask, grids (row-major image order)."""
  built = [_row(segments, rng) for segments in rows]
  length = max(len(ids) for ids, _ in built)
  input_ids = np.full((len(rows), length), PAD, dtype=np.int64)
  mask = np.zeros((len(rows), length), dtype=np.int64)
  grids = []
  for b, (ids, row_grids) in enumerate(built):
    sl = slice(length - len(ids), length) if pad_side == "left" else slice(0, len(ids))
    input_ids[b, sl], mask[b, sl] = ids, 1
    grids += row_grids
  return input_ids, mask, (np.asarray(grids, dtype=np.int64) if grids else None)


def _hf_rope_index(model, input_ids, mask, grids):
  ids = torch.from_numpy(input_ids)
  with torch.no_grad():
    pos, deltas = model.get_rope_index(
      ids,
      mm_token_type_ids=(ids == IMAGE).int(),
      image_grid_thw=None if grids is None else torch.from_numpy(grids),
      attention_mask=None if mask is None else torch.from_numpy(mask),
    )
  return pos.numpy(), deltas.numpy()


def _check(hf_model, input_ids, mask, grids):
  ours, ours_deltas = rope_index(
    input_ids, grids, mask, image_token_id=IMAGE, spatial_merge_size=MERGE
  )
  ref, ref_deltas = _hf_rope_index(hf_model, input_ids, mask, grids)
  assert ours.shape == ref.shape == (3, *input_ids.shape)
  # Exact everywhere, padded positions included (transformers leaves them 0).
  np.testing.assert_array_equal(ours, ref)
  np.testing.assert_array_equal(ours_deltas, ref_deltas)
  return ours, ours_deltas


@pytest.mark.parametrize("pad_side", ["left", "right"])
def test_matches_transformers_mixed_batch(hf_model, pad_side):
  rng = np.random.default_rng(0)
  rows = [
    # Two images of different (non-square) sizes in one row.
    [3, (1, 4, 6), 2, (1, 6, 4), 4],
    # One image in another row, shorter: padded.
    [2, (1, 8, 4), 1],
    # Text only, shortest.
    [5],
    # An image at the very start and end of the row; t = 2 (a two-frame grid).
    [(2, 4, 4), 3, (1, 2, 2)],
  ]
  input_ids, mask, grids = _batch(rows, pad_side, rng)
  pos, deltas = _check(hf_model, input_ids, mask, grids)
  # Spot-check the layout of row 0, first image: <start> is at 3 and its grid is 2x3 merged.
  valid0 = np.flatnonzero(mask[0])
  image0 = valid0[4:10]
  np.testing.assert_array_equal(pos[:, 0, image0], [[4] * 6, [4, 4, 4, 5, 5, 5], [4, 5, 6] * 2])
  # After it: cur = 4 + max(4, 6) // 2 = 7 for <end>.
  assert pos[:, 0, valid0[10]].tolist() == [7, 7, 7]
  assert deltas[2, 0] == 0  # text-only row


def test_matches_transformers_without_mask(hf_model):
  input_ids, _, grids = _batch(
    [[2, (1, 4, 4), 3], [1, (1, 6, 2), 1]], "right", np.random.default_rng(1)
  )
  _check(hf_model, input_ids, None, grids)


@pytest.mark.parametrize("pad_side", ["left", "right"])
def test_text_only_batch_is_cumsum_of_mask(hf_model, pad_side):
  input_ids, mask, grids = _batch([[6], [3], [1]], pad_side, np.random.default_rng(2))
  assert grids is None
  pos, deltas = _check(hf_model, input_ids, mask, grids)
  # Same as `generate`'s text positions: cumsum(mask) - 1, 0 at padding, on all three rows.
  expected = np.where(mask == 1, np.cumsum(mask, axis=-1) - 1, 0)
  for row in pos:
    np.testing.assert_array_equal(row, expected)
  np.testing.assert_array_equal(deltas, 0)


def test_random_batches_match_transformers(hf_model):
  rng = np.random.default_rng(3)
  sizes = [(1, 2, 2), (1, 4, 2), (1, 2, 6), (1, 6, 6), (1, 8, 4)]
  for trial in range(6):
    rows = []
    for _ in range(3):
      segments = [int(rng.integers(1, 4))]
      for _ in range(int(rng.integers(0, 3))):
        segments += [sizes[rng.integers(len(sizes))], int(rng.integers(1, 4))]
      rows.append(segments)
    input_ids, mask, grids = _batch(rows, ["left", "right"][trial % 2], rng)
    _check(hf_model, input_ids, mask, grids)


def test_errors_name_the_fault():
  input_ids, mask, grids = _batch([[2, (1, 4, 4), 2]], "right", np.random.default_rng(4))
  kw = dict(image_token_id=IMAGE, spatial_merge_size=MERGE)
  with pytest.raises(
    ValueError, match=r"image 0 \(grid_thw \(1, 4, 6\).*needs 6 image tokens.*run of 4"
  ):
    rope_index(input_ids, np.array([[1, 4, 6]]), mask, **kw)
  with pytest.raises(ValueError, match="row 0 has an image-token run.*0 image_grid_thw rows"):
    rope_index(input_ids, None, mask, **kw)
  with pytest.raises(ValueError, match="has 2 rows but input_ids hold 1"):
    rope_index(input_ids, np.array([[1, 4, 4], [1, 2, 2]]), mask, **kw)
  with pytest.raises(ValueError, match="attention_mask shape"):
    rope_index(input_ids, grids, mask[:, :-1], **kw)
  with pytest.raises(ValueError, match=r"must be \(num_images, 3\)"):
    rope_index(input_ids, np.array([1, 4, 4]), mask, **kw)


def test_all_padding_row_gets_zeros():
  input_ids = np.array([[9, 10, 11], [0, 0, 0]])
  mask = np.array([[1, 1, 1], [0, 0, 0]])
  pos, deltas = rope_index(input_ids, None, mask, image_token_id=IMAGE, spatial_merge_size=MERGE)
  np.testing.assert_array_equal(pos[:, 0], [[0, 1, 2]] * 3)
  np.testing.assert_array_equal(pos[:, 1], 0)
  np.testing.assert_array_equal(deltas, [[0], [0]])
  assert pos.dtype == np.int32 and deltas.dtype == np.int32
