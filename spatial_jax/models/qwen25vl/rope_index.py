"""3D (temporal, height, width) M-RoPE position ids for Qwen2.5-VL, computed on the host.

A port of transformers 5.24 `Qwen2_5_VLModel.get_rope_index` for images, with
`mm_token_type_ids = (input_ids == image_token_id)` (qwen25vl_reward.md §3.4). Per batch row,
with padding removed by `attention_mask`, the valid tokens are split into runs of text and
image tokens:

- a text run of length n gets `cur + arange(n)` on all three rows, then `cur += n`;
- an image run with grid (t, h, w) gets, over the (t, h/m, w/m) merged-token grid in raster
  order, T = cur + t-index, H = cur + h-index, W = cur + w-index, then `cur += max(h, w) // m`.

Padded positions are 0 (transformers starts from zeros and scatters only the valid ones), and
`deltas = max(position) + 1 - num_valid` per row, the offset later decode steps add.

Text-only rows (and `image_grid_thw=None`) get `cumsum(mask) - 1`, 0 at padding, on all three
rows: what `get_rope_index` gives a text row and what `generate` builds for text-only input.
Note `Qwen2_5_VLModel.forward` called WITHOUT grids (or without `mm_token_type_ids`) instead uses
`arange(L)` regardless of the mask, so under left padding its valid tokens start at the pad
count; with right padding (or none) the two agree.

This runs in numpy because the grouping is data dependent; the result is a small int array fed
to the jitted model next to `input_ids`.
"""

from __future__ import annotations

import functools

import numpy as np


def _runs(is_image: np.ndarray) -> list[tuple[bool, int, int]]:
  """Maximal runs of equal values as (value, start, end) -- itertools.groupby in transformers."""
  if is_image.size == 0:
    return []
  edges = np.flatnonzero(is_image[1:] != is_image[:-1]) + 1
  starts = np.concatenate([[0], edges])
  ends = np.concatenate([edges, [is_image.size]])
  return [(bool(is_image[s]), int(s), int(e)) for s, e in zip(starts, ends, strict=True)]


@functools.lru_cache(maxsize=64)
def _raster(grid_t: int, grid_h: int, grid_w: int) -> np.ndarray:
  """(3, t*h*w) (t, h, w) indices in raster order over (t, h, w), as the merged vision tokens
  are spliced in; cached (read-only) since a batch's images usually share one grid."""
  tt, hh, ww = np.meshgrid(np.arange(grid_t), np.arange(grid_h), np.arange(grid_w), indexing="ij")
  raster = np.stack([tt.ravel(), hh.ravel(), ww.ravel()])
  raster.setflags(write=False)
  return raster


def rope_index(
  input_ids: np.ndarray,
  image_grid_thw: np.ndarray | None,
  attention_mask: np.ndarray | None = None,
  *,
  image_token_id: int,
  spatial_merge_size: int,
) -> tuple[np.ndarray, np.ndarray]:
  """M-RoPE position ids for a batch of token rows holding zero or more images each.

  Args:
    input_ids: (B, L) token ids; each image is a contiguous run of `image_token_id` whose
      length is `t * (h // m) * (w // m)` for its grid (the processor's expansion). Two images
      must be separated by at least one other token (in practice <|vision_end|><|vision_start|>),
      otherwise their runs merge, as they would in transformers.
    image_grid_thw: (num_images, 3) patch grids (t, h, w) of all images in the batch, in
      row-major order of their runs (row 0's images first); None when there are no images.
    attention_mask: (B, L) 1 for real tokens, 0 for padding (left or right); None means all
      tokens are real.
    image_token_id: the <|image_pad|> id (`Qwen25VLConfig.image_token_id`).
    spatial_merge_size: m, the vision merger's side (`VisionConfig.spatial_merge_size`).

  Returns:
    position_ids: (3, B, L) int32; rows are (temporal, height, width); 0 at padded positions.
    deltas: (B, 1) int32, `max(position) + 1 - num_valid_tokens` per row (0 for text-only rows).

  Raises:
    ValueError: on shape mismatches, an image run whose length does not match its grid, more
      image runs than grids, or grids left unused (each names the row / image at fault).
  """
  input_ids = np.asarray(input_ids)
  if input_ids.ndim != 2:
    raise ValueError(f"rope_index: input_ids must be (B, L), got shape {input_ids.shape}.")
  batch, length = input_ids.shape
  if attention_mask is None:
    valid_mask = np.ones((batch, length), dtype=bool)
  else:
    valid_mask = np.asarray(attention_mask).astype(bool)
    if valid_mask.shape != input_ids.shape:
      raise ValueError(
        f"rope_index: attention_mask shape {valid_mask.shape} != input_ids shape {input_ids.shape}."
      )
  if image_grid_thw is None:
    grids = np.zeros((0, 3), dtype=np.int64)
  else:
    grids = np.asarray(image_grid_thw, dtype=np.int64)
    if grids.ndim != 2 or grids.shape[1] != 3:
      raise ValueError(f"rope_index: image_grid_thw must be (num_images, 3), got {grids.shape}.")
  merge = int(spatial_merge_size)

  position_ids = np.zeros((3, batch, length), dtype=np.int32)
  deltas = np.zeros((batch, 1), dtype=np.int32)
  next_image = 0
  for b in range(batch):
    valid = np.flatnonzero(valid_mask[b])
    if valid.size == 0:
      # transformers fails here (torch.cat of an empty list); an all-padding row gets zeros.
      continue
    is_image = input_ids[b, valid] == image_token_id
    row = np.empty((3, valid.size), dtype=np.int64)
    cur = 0
    for image_run, start, end in _runs(is_image):
      n = end - start
      if not image_run:
        row[:, start:end] = cur + np.arange(n)
        cur += n
        continue
      if next_image >= len(grids):
        raise ValueError(
          f"rope_index: row {b} has an image-token run at valid token {start} but all "
          f"{len(grids)} image_grid_thw rows are used up."
        )
      t, h, w = (int(v) for v in grids[next_image])
      grid_t, grid_h, grid_w = t, h // merge, w // merge
      if grid_t * grid_h * grid_w != n:
        raise ValueError(
          f"rope_index: image {next_image} (grid_thw {(t, h, w)}, merge {merge}) needs "
          f"{grid_t * grid_h * grid_w} image tokens but row {b} has a run of {n} at valid token "
          f"{start}."
        )
      row[:, start:end] = cur + _raster(grid_t, grid_h, grid_w)
      cur += max(h, w) // merge
      next_image += 1
    position_ids[:, b, valid] = row
    deltas[b, 0] = row.max() + 1 - valid.size
  if next_image != len(grids):
    # transformers ignores surplus grids; here they mean the ids and the images disagree.
    raise ValueError(
      f"rope_index: image_grid_thw has {len(grids)} rows but input_ids hold {next_image} "
      "image-token runs."
    )
  return position_ids, deltas
