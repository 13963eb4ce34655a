"""Rule-based oracle of the synthetic world: which relations of a prompt an image satisfies.

The GenEval-like checker of this world, from pixels alone. Each pixel is given the nearest palette
colour if it lies within `COLOR_TOLERANCE` of it (backgrounds are low-saturation, far from every
palette colour); an object is found when its colour covers at least `min_pixels(size)` pixels, and
is located by the centroid of those pixels. "a left of b" holds when b's centroid lies to the right
of a's by more than `RELATION_MARGIN` times the sum of their sizes (sqrt of pixel area, robust to
stray pixels) — the same kind of size-relative dead zone as GenEval's position threshold. A missing
object fails all its relations.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from spatial_jax.data import scenes

COLOR_TOLERANCE = 60.0  # RGB distance; palette colours are >= 80 apart, backgrounds >= ~100 away
RELATION_MARGIN = 0.25
_PALETTE_NAMES = tuple(scenes.COLORS)
_PALETTE = np.array([scenes.COLORS[c] for c in _PALETTE_NAMES], dtype=np.float32)


def min_pixels(height: int, width: int) -> int:
  """Smallest pixel count that counts as an object (a few stray pixels are not an object)."""
  return max(3, round(0.0005 * height * width))


@dataclasses.dataclass(frozen=True)
class OracleResult:
  """The oracle's verdict on one image.

  Attributes:
    satisfied: per relation of the scene (in order), whether the image satisfies it.
    fraction: mean of `satisfied` (the score; 1.0 = every relation holds).
    found: per object, whether its colour covers enough pixels.
    centroids: per object, (x, y) pixel centroid, or None when not found.
    sizes: per object, sqrt of its pixel area (0 when not found).
  """

  satisfied: tuple[bool, ...]
  fraction: float
  found: tuple[bool, ...]
  centroids: tuple[tuple[float, float] | None, ...]
  sizes: tuple[float, ...]


def _check_rgb_shape(image: np.ndarray, batched: bool) -> None:
  if image.ndim != 3 + batched or image.shape[-1] != 3:
    raise ValueError(
      f"Expected an RGB image of shape {'(N, H, W, 3)' if batched else '(H, W, 3)'}, got shape "
      f"{image.shape}."
    )


def _as_rgb255(image: np.ndarray, *, batched: bool = False) -> np.ndarray:
  image = np.asarray(image)
  _check_rgb_shape(image, batched)
  if np.issubdtype(image.dtype, np.floating):
    # Floats are taken as [0, 1] (what image models emit after denormalisation).
    return np.clip(image, 0.0, 1.0).astype(np.float32) * 255.0
  return image.astype(np.float32)


def color_labels(image: np.ndarray) -> np.ndarray:
  """Per pixel, the index into `scenes.COLORS` of its palette colour, or -1 (background).

  `image` is (H, W, 3) or a batch (N, H, W, 3); the labels have its shape without channels.
  """
  image = np.asarray(image)
  batched = image.ndim == 4
  if image.dtype != np.uint8 or image.size < 4096:
    return _nearest_palette(_as_rgb255(image, batched=batched))
  _check_rgb_shape(image, batched)
  # Rendered images hold few distinct colours: each is labelled once, with the same arithmetic
  # (so the same labels), ~3x faster on a batch of 32 px images.
  packed = (image[..., 0].astype(np.int32) << 16) | (image[..., 1].astype(np.int32) << 8)
  packed |= image[..., 2]
  colours, inverse = np.unique(packed.reshape(-1), return_inverse=True)
  rgb = np.stack([colours >> 16, (colours >> 8) & 255, colours & 255], axis=-1)
  return _nearest_palette(rgb.astype(np.float32))[inverse.reshape(-1)].reshape(packed.shape)


def _nearest_palette(rgb: np.ndarray) -> np.ndarray:
  """Labels of float32 RGB values in [0, 255] (..., 3)."""
  squared = ((rgb[..., None, :] - _PALETTE) ** 2).sum(axis=-1)  # (..., colours)
  nearest = squared.argmin(axis=-1)
  close = squared.min(axis=-1) < COLOR_TOLERANCE**2
  return np.where(close, nearest, -1)


def _holds(relation: str, subject, obj, margin: float) -> bool:
  (sx, sy), (ox, oy) = subject, obj
  offset = {"left of": ox - sx, "right of": sx - ox, "above": oy - sy, "below": sy - oy}[relation]
  return offset > margin


def check_scene(image: np.ndarray, scene: scenes.Scene) -> OracleResult:
  """Checks every relation of `scene` on `image` (uint8 RGB, or float RGB in [0, 1])."""
  labels = color_labels(image)
  height, width = labels.shape
  threshold = min_pixels(height, width)
  found, centroids, sizes = [], [], []
  for obj in scene.objects:
    ys, xs = np.nonzero(labels == _PALETTE_NAMES.index(obj.color))
    present = len(xs) >= threshold
    found.append(present)
    # +0.5: pixel centres, in the same coordinates as the renderer's layout.
    centroids.append((float(xs.mean()) + 0.5, float(ys.mean()) + 0.5) if present else None)
    sizes.append(float(np.sqrt(len(xs))) if present else 0.0)
  satisfied = []
  for r in scene.relations:
    if not (found[r.subject] and found[r.object]):
      satisfied.append(False)
      continue
    margin = RELATION_MARGIN * (sizes[r.subject] + sizes[r.object])
    satisfied.append(_holds(r.relation, centroids[r.subject], centroids[r.object], margin))
  fraction = float(np.mean(satisfied)) if satisfied else 1.0
  return OracleResult(tuple(satisfied), fraction, tuple(found), tuple(centroids), tuple(sizes))


def soft_fraction(result: OracleResult, scene: scenes.Scene, sharpness: float = 4.0) -> float:
  """A graded version of `result.fraction`: per relation, sigmoid(sharpness * z) where z is how
  far the centroids are past the relation's margin, in units of the two objects' sizes (0 for a
  missing object); the mean over relations. A dense reward for RL, where the 0/1 verdict of a
  few relations gives most groups of samples the same score."""
  values = []
  for r in scene.relations:
    if not (result.found[r.subject] and result.found[r.object]):
      values.append(0.0)
      continue
    scale = result.sizes[r.subject] + result.sizes[r.object]
    (sx, sy), (ox, oy) = result.centroids[r.subject], result.centroids[r.object]
    offset = {"left of": ox - sx, "right of": sx - ox, "above": oy - sy, "below": sy - oy}[
      r.relation
    ]
    z = (offset - RELATION_MARGIN * scale) / scale
    values.append(float(1.0 / (1.0 + np.exp(-sharpness * z))))
  return float(np.mean(values)) if values else 1.0


def score_prompt(image: np.ndarray, prompt: str) -> OracleResult:
  """Parses `prompt` (scene grammar) and checks it on `image`; ValueError for foreign prompts."""
  return check_scene(image, scenes.parse_prompt(prompt))
