"""Can the tiny generator make a layout follow the relation word, and from which text features?
(docs/results/generator_text_encoder.md)

Trains flux_sft's generator (configs/flux_sft_synthetic.py at its defaults, batch 32) on
two-object, one-relation scenes ("a {colour} {shape} to the left of / to the right of a
{colour} {shape}", rendered at 32 x 32 as data_synthetic does), and every 100 steps runs the
paired probe: 64 object pairs sampled with "left of" and with "right of" from the same noise;
the offset between the two colours' centroids moves by several pixels when the layout follows
the word, by 0 when it ignores it.

  --prompts fixed   4 colour pairs (red/blue, green/yellow, orange/purple, blue/green), always
                    a circle and a square: 8 prompts, 200 layouts each (can it at all?)
  --prompts many    8,000 scenes of random colours and shapes (does it compose?)
  --features t5     the generator's T5 (random, or --t5 PATH: a text_encoder_synthetic final/)
             hand   oracle features instead of T5: at each colour word its colour one-hot and
                    its side (+3 left, -3 right), zeros elsewhere
             hand+t5        the oracle features added to T5's
             colour+t5      only the oracle colour one-hot (features 8-14) added to T5's

  python docs/results/relation_probe_train.py --prompts many --features t5 --t5 T5/final
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from spatial_jax import optim, sharding
from spatial_jax.configs_lib import load_config
from spatial_jax.data import oracle, render, scenes
from spatial_jax.diffusion.build import (
  build_codec,
  build_model,
  build_prompt_encoder,
  make_optimizer,
)
from spatial_jax.diffusion.flow_matching import make_train_step, object_weights
from spatial_jax.diffusion.generator import geometry, make_sampler

COLOURS = list(scenes.COLORS)
RELATIONS = ("left of", "right of")
FIXED_PAIRS = (("red", "blue"), ("green", "yellow"), ("orange", "purple"), ("blue", "green"))


def prompt(ca: str, sa: str, cb: str, sb: str, relation: str) -> str:
  return f"a {ca} {sa} to the {relation.split()[0]} of a {cb} {sb}"


def scene(ca: str, sa: str, cb: str, sb: str, relation: str) -> scenes.Scene:
  objects = (scenes.SceneObject(sa, ca), scenes.SceneObject(sb, cb))
  return scenes.Scene(objects, (scenes.Relation(0, relation, 1),))


def training_set(kind: str, rng: np.random.Generator) -> tuple[list[str], np.ndarray]:
  """`fixed`: 200 layouts of each of the 8 prompts; `many`: 8,000 scenes of random colours and
  shapes, "left of" and "right of" in turn. Image i is rendered with seed i."""
  items = []
  if kind == "fixed":
    for a, b in FIXED_PAIRS:
      items += [(a, "circle", b, "square", relation) for relation in RELATIONS for _ in range(200)]
  else:
    for i in range(8000):
      c, s = rng.choice(len(COLOURS), 2, replace=False), rng.choice(len(scenes.SHAPES), 2)
      pair = (COLOURS[c[0]], scenes.SHAPES[s[0]], COLOURS[c[1]], scenes.SHAPES[s[1]])
      items.append((*pair, RELATIONS[i % 2]))
  images = [render.render_scene(scene(*item), size=32, seed=i) for i, item in enumerate(items)]
  return [prompt(*item) for item in items], np.stack(images)


def probe_pairs(kind: str) -> list[tuple[str, ...]]:
  """The probe's 64 object pairs (each sampled with both relations)."""
  if kind == "fixed":
    return [(*FIXED_PAIRS[i % 4][:1], "circle", FIXED_PAIRS[i % 4][1], "square") for i in range(64)]
  rng, out = np.random.default_rng(1), []
  for _ in range(64):
    c, s = rng.choice(len(COLOURS), 2, replace=False), rng.choice(len(scenes.SHAPES), 2)
    out.append((COLOURS[c[0]], scenes.SHAPES[s[0]], COLOURS[c[1]], scenes.SHAPES[s[1]]))
  return out


def oracle_features(prompts: list[str], length: int, width: int, features: str) -> np.ndarray:
  """At each colour word: its colour one-hot (features 8 + colour) and, unless `colour+t5`,
  its side in feature 20 (+3: left of the other object, -3: right); zeros elsewhere."""
  out = np.zeros((len(prompts), length, width), np.float32)
  for row, text in enumerate(prompts):
    words = text.split()  # T5's ids are `words <eos>`: word j is token j.
    left = "left" in words
    for n, j in enumerate(j for j, w in enumerate(words) if w in scenes.COLORS):
      out[row, j, 8 + COLOURS.index(words[j])] = 3.0
      if features != "colour+t5":
        out[row, j, 20] = 3.0 if (n == 0) == left else -3.0
  return out


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--prompts", choices=("fixed", "many"), default="many")
  parser.add_argument("--features", choices=("t5", "hand", "hand+t5", "colour+t5"), default="t5")
  parser.add_argument("--t5", default="", help="a text_encoder_synthetic final/ folder")
  parser.add_argument("--steps", type=int, default=900)
  args = parser.parse_args()

  config = load_config("configs/flux_sft_synthetic.py")
  config.train.update(steps=args.steps, warmup_steps=50)
  config.text.t5_pretrained = args.t5
  rng = np.random.default_rng(0)  # The training set's, then the batches' indices.
  texts, images = training_set(args.prompts, rng)
  prompts = np.array(texts)

  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.resolve_rules(config.sharding_rules)
  codec, encoder = build_codec(config), build_prompt_encoder(config)
  geo = geometry(32, codec, config.text.max_length)
  model = build_model(config, codec, encoder, mesh, rules)
  graphdef, trainable, frozen = nnx.split(model, nnx.Param, ...)
  tx = make_optimizer(config)
  opt_state = tx.init(trainable)
  step_fn = jax.jit(
    make_train_step(graphdef, tx, config, codec, geo, encoder([""])), donate_argnums=(0, 1)
  )
  sample = jax.jit(make_sampler(graphdef, codec, geo, num_steps=20, guidance=1.0))

  def embed(texts: list[str]) -> tuple[jax.Array, jax.Array]:
    t5, pooled = encoder(texts)
    if args.features == "t5":
      return t5, pooled
    hand = oracle_features(texts, t5.shape[1], t5.shape[2], args.features)
    return (jnp.asarray(hand) if args.features == "hand" else t5 + hand), pooled

  pairs = probe_pairs(args.prompts)
  noise = jax.random.normal(jax.random.key(5), (64, geo.image_seq_len, model.config.in_channels))

  def centroid_x(labels: np.ndarray, colour: str) -> float:
    xs = np.nonzero(labels == COLOURS.index(colour))[1]
    return float(xs.mean()) if len(xs) >= 3 else np.nan

  def probe(params) -> str:
    offsets = {}
    for relation in RELATIONS:
      texts = [prompt(*pair, relation) for pair in pairs]
      out = np.asarray(sample(params, frozen, *embed(texts), noise))
      labels = oracle.color_labels((out * 255).round().astype(np.uint8))
      offsets[relation] = np.array(
        [
          centroid_x(lab, p[0]) - centroid_x(lab, p[2])
          for lab, p in zip(labels, pairs, strict=True)
        ]
      )
    change = offsets["right of"] - offsets["left of"]
    change = change[np.isfinite(change)]
    return (
      f"offset change {change.mean():+.2f} px (se {change.std() / np.sqrt(len(change)):.2f}), "
      f"the right way in {np.mean(change > 0):.2f} of {len(change)}"
    )

  start = time.time()
  with sharding.use_mesh(mesh, rules):
    for step in range(1, args.steps + 1):
      idx = rng.integers(0, len(images), 32)
      text_embeds, pooled = embed(list(prompts[idx]))
      batch = dict(
        images=jnp.asarray(images[idx]),
        prompt_embeds=text_embeds,
        pooled=pooled,
        weights=jnp.asarray(object_weights(images[idx], config.train.object_weight)),
      )
      trainable, opt_state, aux = step_fn(trainable, opt_state, frozen, batch, jax.random.key(step))
      if step % 100 == 0:
        print(
          f"step {step} ({time.time() - start:.0f} s) loss {float(aux['loss']):.4f} | raw: "
          f"{probe(trainable)} | EMA: {probe(optim.ema_params(opt_state))}",
          flush=True,
        )


if __name__ == "__main__":
  main()
