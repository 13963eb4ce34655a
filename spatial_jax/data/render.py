"""Renderer of the synthetic world: a layout solver plus a rasteriser with noisy backgrounds.

Every relation holds with a margin: for "a left of b", a's bounding box ends at least `gap` pixels
before b's begins (likewise for the vertical relations), so the oracle's centroid test passes with
room to spare and a flipped relation fails just as clearly. Sizes, positions, aspect, rotation,
colour and background vary per seed so that a model has to read positions, not memorise pixels.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from spatial_jax.data import scenes

# Object side as a fraction of the image side, before any shrinking to fit long chains.
_SIZE_RANGE = (0.12, 0.24)
_MIN_SIDE_PX = 5.0  # below this shapes stop being shapes and the oracle may miss them
_SHRINK = 0.85
_TRIES_PER_SIZE = 25
_MAX_SHRINKS = 12


def _star(points: int = 5, inner: float = 0.45) -> np.ndarray:
  angles = np.arange(2 * points) * math.pi / points - math.pi / 2
  radii = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
  return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)


def _cross(arm: float = 0.18) -> np.ndarray:
  a = arm
  return np.array(
    [(-a, -1), (a, -1), (a, -a), (1, -a), (1, a), (a, a), (a, 1), (-a, 1), (-a, a), (-1, a)]
    + [(-1, -a), (-a, -a)],
    dtype=float,
  )


_CIRCLE_ANGLES = np.linspace(0, 2 * math.pi, 32, endpoint=False)
# Outlines in [-1, 1]^2 before rotation; each is rescaled to fill its box after rotation.
_OUTLINES: dict[str, np.ndarray] = {
  "circle": np.stack([np.cos(_CIRCLE_ANGLES), np.sin(_CIRCLE_ANGLES)], axis=1),
  "square": np.array([(-1, -1), (1, -1), (1, 1), (-1, 1)], dtype=float),
  "triangle": np.array([(0, -1), (1, 1), (-1, 1)], dtype=float),
  "diamond": np.array([(0, -1), (1, 0), (0, 1), (-1, 0)], dtype=float),
  "star": _star(),
  "cross": _cross(0.36),
}
# Small rotations only: a square turned by 45 degrees would be a diamond.
_MAX_ROTATION_DEG = {"circle": 0.0, "square": 6.0, "triangle": 6.0, "diamond": 6.0}
_DEFAULT_ROTATION_DEG = 10.0


def _random_topological_order(rng: np.random.Generator, n: int, edges) -> list[int]:
  indegree = [0] * n
  for _, b in edges:
    indegree[b] += 1
  ready = [i for i in range(n) if indegree[i] == 0]
  order = []
  while ready:
    node = ready.pop(int(rng.integers(len(ready))))
    order.append(node)
    for a, b in edges:
      if a == node:
        indegree[b] -= 1
        if indegree[b] == 0:
          ready.append(b)
  return order


def _place_axis(rng, extents, edges, length, border, gap) -> np.ndarray | None:
  """Centres along one axis with x_b - x_a >= (e_a + e_b) / 2 + gap for every edge (a, b).

  Objects are placed in a random topological order, each uniformly between the bound its placed
  predecessors impose and the latest position that still leaves room for its successors (longest
  path to the far border). Returns None when the longest chain does not fit.
  """
  n = len(extents)
  order = _random_topological_order(rng, n, edges)
  low = border + extents / 2
  high = length - border - extents / 2
  succ = [[] for _ in range(n)]
  pred = [[] for _ in range(n)]
  for a, b in edges:
    succ[a].append(b)
    pred[b].append(a)

  def need(a, b):
    return (extents[a] + extents[b]) / 2 + gap

  latest = high.copy()
  for node in reversed(order):
    for b in succ[node]:
      latest[node] = min(latest[node], latest[b] - need(node, b))
  centres = np.zeros(n)
  for node in order:
    earliest = max([low[node]] + [centres[a] + need(a, node) for a in pred[node]])
    if earliest > latest[node]:
      return None
    centres[node] = rng.uniform(earliest, latest[node])
  return centres


def _overlaps(centres, sides, related_pairs, gap) -> bool:
  """Whether two objects without a relation between them have overlapping (gap-padded) boxes."""
  n = len(sides)
  for a in range(n):
    for b in range(a + 1, n):
      if (a, b) in related_pairs:
        continue  # already separated along the relation's axis
      apart = np.abs(centres[a] - centres[b]) >= (sides[a] + sides[b]) / 2 + gap
      if not apart.any():
        return True
  return False


def solve_layout(
  scene: scenes.Scene, size: int, rng: np.random.Generator, candidates: int = 1
) -> np.ndarray:
  """Boxes (n, 4) as (centre x, centre y, width, height) in pixels satisfying every relation.

  With `candidates` = k > 1, k layouts are drawn and the one whose related objects stand
  furthest apart (the largest smallest gap between the boxes of a relation, along its axis) is
  kept: layouts that state their relations plainly. k = 1 draws exactly what it always drew.

  Raises:
    ValueError: if the relations contradict each other or the scene cannot fit in `size` pixels.
  """
  if not scenes.is_consistent(scene):
    raise ValueError(
      f"Scene relations are contradictory (a cycle of left/right or above/below): {scene}"
    )
  if candidates < 1:
    raise ValueError(f"candidates={candidates}: draw at least one layout.")
  layouts = [_draw_layout(scene, size, rng) for _ in range(candidates)]
  if candidates == 1:
    return layouts[0]
  return max(layouts, key=lambda boxes: _smallest_relation_gap(scene, boxes))


def _smallest_relation_gap(scene: scenes.Scene, boxes: np.ndarray) -> float:
  """The smallest gap, in pixels, between the boxes of a related pair along its axis."""
  gaps = [np.inf]
  for axis, dim in (("x", 0), ("y", 1)):
    for a, b in scenes.axis_edges(scene, axis):
      extent = (boxes[a, 2 + dim] + boxes[b, 2 + dim]) / 2
      gaps.append(boxes[b, dim] - boxes[a, dim] - extent)
  return float(min(gaps))


def _draw_layout(scene: scenes.Scene, size: int, rng: np.random.Generator) -> np.ndarray:
  n = len(scene.objects)
  edges = {axis: scenes.axis_edges(scene, axis) for axis in "xy"}
  related_pairs = {tuple(sorted((r.subject, r.object))) for r in scene.relations}
  gap = max(1.0, 0.03 * size)
  border = max(1.0, 0.02 * size)
  side = rng.uniform(*_SIZE_RANGE, size=n) * size
  aspect = np.exp(rng.uniform(-0.15, 0.15, size=n))
  for _ in range(_MAX_SHRINKS):
    sides = np.maximum(np.stack([side * aspect, side / aspect], axis=1), _MIN_SIDE_PX)  # [w, h]
    for _ in range(_TRIES_PER_SIZE):
      xs = _place_axis(rng, sides[:, 0], edges["x"], size, border, gap)
      ys = _place_axis(rng, sides[:, 1], edges["y"], size, border, gap)
      if xs is None or ys is None:
        break  # the chain does not fit: shrink
      centres = np.stack([xs, ys], axis=1)
      if not _overlaps(centres, sides, related_pairs, gap):
        return np.concatenate([centres, sides], axis=1)
    side = side * _SHRINK
  raise ValueError(f"Cannot fit the {n} objects of {scene} in a {size}x{size} image.")


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
  """A low-saturation textured background (float, (size, size, 3))."""
  base = rng.uniform(50, 200)
  xx = (np.arange(size, dtype=np.float32) / size)[None, :]
  yy = xx.T
  kind = int(rng.integers(4))
  if kind == 0:  # smooth blobs: a coarse random grid upsampled bilinearly
    cells = int(rng.integers(2, 7))
    grid = rng.normal(0, 1, (cells, cells)).astype(np.float32)
    blobs = np.asarray(Image.fromarray(grid).resize((size, size), Image.BILINEAR))
    luma = base + rng.uniform(10, 30) * blobs
  elif kind == 1:  # linear gradient in a random direction
    angle = rng.uniform(0, 2 * math.pi)
    luma = base + rng.uniform(20, 60) * (
      (xx - 0.5) * math.cos(angle) + (yy - 0.5) * math.sin(angle)
    )
  elif kind == 2:  # soft stripes
    angle = rng.uniform(0, math.pi)
    freq = rng.uniform(2, 8)
    phase = xx * math.cos(angle) + yy * math.sin(angle)
    luma = base + rng.uniform(6, 18) * np.sin(2 * math.pi * freq * phase)
  else:  # flat
    luma = np.full((size, size), base, dtype=np.float32)
  tint = rng.uniform(-12, 12, size=3)
  grain = rng.standard_normal(size=(size, size, 3), dtype=np.float32) * rng.uniform(2, 7)
  return np.clip(luma[..., None] + tint + grain, 20, 235)


def _outline(shape: str, box: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """Polygon (k, 2) of `shape`, slightly rotated, filling `box` = (cx, cy, w, h) exactly."""
  cx, cy, w, h = box
  max_deg = _MAX_ROTATION_DEG.get(shape, _DEFAULT_ROTATION_DEG)
  theta = math.radians(rng.uniform(-max_deg, max_deg))
  c, s = math.cos(theta), math.sin(theta)
  points = _OUTLINES[shape] @ np.array([[c, s], [-s, c]])
  lo, hi = points.min(axis=0), points.max(axis=0)
  # Rescale the rotated outline to fill its box exactly, so the layout's margins hold.
  return (points - (lo + hi) / 2) / (hi - lo) * (w, h) + (cx, cy)


def _fill_polygon(labels: np.ndarray, polygon: np.ndarray, value: int) -> None:
  """Sets the pixels whose centres lie inside `polygon` (even-odd rule) to `value`.

  Done in numpy rather than PIL because PIL's polygon fill adds stray outline pixels at small
  sizes, which would break the margins the layout guarantees.
  """
  size = labels.shape[0]
  x0, y0 = np.clip(np.floor(polygon.min(axis=0)).astype(int), 0, size)
  x1, y1 = np.clip(np.ceil(polygon.max(axis=0)).astype(int), 0, size)
  px = np.arange(x0, x1)[None, None, :] + 0.5  # pixel centres
  py = np.arange(y0, y1)[None, :, None] + 0.5
  a = polygon[:, None, None, :]  # (edges, 1, 1, xy)
  b = np.roll(polygon, -1, axis=0)[:, None, None, :]
  crosses = (a[..., 1] > py) != (b[..., 1] > py)
  dy = np.where(a[..., 1] == b[..., 1], 1.0, b[..., 1] - a[..., 1])  # flat edges never cross
  x_at = a[..., 0] + (py - a[..., 1]) * (b[..., 0] - a[..., 0]) / dy
  inside = np.logical_xor.reduce(crosses & (px < x_at), axis=0)
  labels[y0:y1, x0:x1][inside] = value


def render_scene(
  scene: scenes.Scene, *, size: int = 64, seed: int = 0, layout_candidates: int = 1
) -> np.ndarray:
  """Draws an image in which every relation of `scene` holds; deterministic per `seed`.
  `layout_candidates` > 1 keeps the layout that separates related objects most (`solve_layout`).

  Returns:
    uint8 array (size, size, 3).

  Raises:
    ValueError: if the scene is contradictory or cannot fit at this size.
  """
  if size < 16:
    raise ValueError(f"Image size must be at least 16 pixels, got {size}.")
  rng = np.random.default_rng(seed)
  boxes = solve_layout(scene, size, rng, layout_candidates)
  label_array = np.zeros((size, size), dtype=np.int64)
  for k, (obj, box) in enumerate(zip(scene.objects, boxes, strict=True)):
    _fill_polygon(label_array, _outline(obj.shape, box, rng), k + 1)
  # Per-object colour jitter plus per-pixel noise, both small next to the palette spacing.
  palette = np.array([scenes.COLORS[o.color] for o in scene.objects], dtype=float)
  palette = np.concatenate([np.zeros((1, 3)), palette + rng.uniform(-10, 10, palette.shape)])
  image = _background(rng, size)
  mask = label_array > 0
  image[mask] = palette[label_array[mask]] + rng.uniform(-8, 8, size=(int(mask.sum()), 3))
  return np.clip(np.rint(image), 0, 255).astype(np.uint8)
