"""Paired probe of a flux_sft generator's layouts (docs/results/generator_text_encoder.md).

For random pairs of objects (a, b) it samples "a {a} to the left of a {b}" and "... to the right
of ..." (and above / below) from the same noise, and measures how far the offset between the two
colours' centroids moves with the relation word: several pixels for a generator that follows
it, 0 for one that ignores it. Weights: the export's (`final/`, the EMA when kept) and the last
checkpoint's raw ones.

  python docs/results/layout_probe.py FLUX_SFT_WORKDIR [NUM_PAIRS]   # from the repository root
"""

from __future__ import annotations

import os
import sys

import jax
import numpy as np
from flax import nnx

from spatial_jax import checkpoint
from spatial_jax.data import oracle, scenes
from spatial_jax.diffusion import generator as generator_lib

COLORS, SHAPES = list(scenes.COLORS), list(scenes.SHAPES)
RELATION_PAIRS = ((("to the left of", "to the right of"), 0), (("above", "below"), 1))


def centroid(labels: np.ndarray, color: str) -> np.ndarray:
  ys, xs = np.nonzero(labels == COLORS.index(color))
  return np.array([np.nan, np.nan]) if len(xs) < 3 else np.array([xs.mean(), ys.mean()])


def main(workdir: str, num_pairs: int) -> None:
  gen = generator_lib.load_generator(os.path.join(workdir, "final"), scan_layers=True)
  geo = gen.geometry()
  graphdef, ema = nnx.split(gen.transformer)
  t5 = gen.prompt_encoder.encoders.t5
  t5_ema = nnx.state(t5)
  s = gen.sampling
  sample = jax.jit(
    generator_lib.make_sampler(
      graphdef, gen.codec, geo, num_steps=s["num_steps"], guidance=s["guidance"]
    )
  )
  rng = np.random.default_rng(0)
  pairs = []
  for _ in range(num_pairs):
    c, sh = rng.choice(len(COLORS), 2, replace=False), rng.choice(len(SHAPES), 2)
    pairs.append((COLORS[c[0]], SHAPES[sh[0]], COLORS[c[1]], SHAPES[sh[1]]))
  shape = (num_pairs, geo.image_seq_len, gen.transformer.config.in_channels)
  noise = jax.random.normal(jax.random.key(1), shape)

  def offsets(params, relation: str, axis: int) -> tuple[np.ndarray, np.ndarray]:
    prompts = [f"a {ca} {sa} {relation} a {cb} {sb}" for ca, sa, cb, sb in pairs]
    images = np.asarray(sample(params, nnx.State({}), *gen.prompt_encoder(prompts), noise))
    images = (images * 255).round().astype(np.uint8)
    found, moved = [], []
    for image, (ca, _, cb, _) in zip(images, pairs, strict=True):
      labels = oracle.color_labels(image)
      a, b = centroid(labels, ca), centroid(labels, cb)
      found.append(np.isfinite(a[0]) and np.isfinite(b[0]))
      moved.append((a - b)[axis])
    return np.array(moved), np.array(found)

  def report(name: str, params, t5_params) -> None:
    nnx.update(t5, t5_params)
    parts, found = [name], []
    for (first, second), axis in RELATION_PAIRS:
      a, found_a = offsets(params, first, axis)
      b, found_b = offsets(params, second, axis)
      found += [found_a, found_b]
      change = (b - a)[np.isfinite(b - a)]  # > 0: the layout follows the word.
      se = np.std(change) / np.sqrt(len(change))
      parts.append(
        f"{first} / {second}: offset change {change.mean():+.2f} px (se {se:.2f}), "
        f"the right way in {np.mean(change > 0):.2f} of {len(change)}"
      )
    parts.insert(1, f"both colours found {np.mean(found):.2f}")
    print(" | ".join(parts), flush=True)

  report("export (EMA)", ema, t5_ema)
  ckpt = checkpoint.Checkpointer(workdir)
  try:
    raw = ckpt.restore(params=dict(transformer=ema, t5=t5_ema)).params  # text.t5_trainable
  except checkpoint.CheckpointMismatchError:
    raw = dict(transformer=ckpt.restore(params=ema).params, t5=t5_ema)
  report(f"raw, step {ckpt.latest_step()}", raw["transformer"], raw["t5"])
  ckpt.close()


if __name__ == "__main__":
  main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 128)
