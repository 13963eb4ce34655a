"""The T5 pretraining's pieces: layout targets, batches, corruption, the probe, the step."""

import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx

from spatial_jax.data import tokenizer as tokenizer_lib
from spatial_jax.data.scenes import Relation, Scene, SceneObject
from spatial_jax.diffusion import synthetic, text_pretrain
from spatial_jax.models.t5 import T5EncoderModel

DATA = ml_collections.ConfigDict(dict(max_length=80, min_objects=2, max_objects=4, max_relations=4))


def _scene():
  # x: red < green (left of) and green < blue (blue right of green), so red < blue by closure;
  # yellow has no x relation. y: yellow above red.
  objects = tuple(
    SceneObject(shape, colour)
    for shape, colour in (
      ("circle", "red"),
      ("square", "green"),
      ("star", "blue"),
      ("cross", "yellow"),
    )
  )
  relations = (Relation(0, "left of", 1), Relation(2, "right of", 1), Relation(3, "above", 0))
  return Scene(objects, relations)


def test_layout_targets_count_the_transitive_closure():
  targets = text_pretrain.layout_targets(_scene())
  expected = np.array(
    [
      [-2 / 3, 1 / 3],  # red: green and blue after it in x; below yellow in y.
      [0.0, 0.0],  # green: red before, blue after.
      [2 / 3, 0.0],  # blue: red (by closure) and green before it.
      [0.0, -1 / 3],  # yellow: unconstrained in x; red after it in y.
    ],
    np.float32,
  )
  np.testing.assert_allclose(targets, expected, rtol=1e-6)
  two = Scene(objects=_scene().objects[:2], relations=(Relation(1, "below", 0),))
  np.testing.assert_allclose(text_pretrain.layout_targets(two), [[0, -1], [0, 1]])


def test_encode_batch_puts_each_objects_targets_on_its_colour_words():
  prompt = "The red circle is left of the green square. The blue star is right of the green square."
  batch = text_pretrain.encode_batch([_scene()], [prompt], 80)
  np.testing.assert_array_equal(
    batch["ids"], synthetic.tokenize([prompt], 80, bos=False)
  )  # Exactly what PromptEncoder feeds T5.
  vocabulary = tokenizer_lib.vocabulary()
  words = [vocabulary[i] for i in batch["ids"][0]]
  colours = [i for i, w in enumerate(words) if w in ("red", "green", "blue", "yellow")]
  assert [words[i] for i in colours] == ["red", "green", "blue", "green"]
  np.testing.assert_array_equal(np.flatnonzero(batch["target_mask"][0]), colours)
  expected = {"red": [-2 / 3, 1 / 3], "green": [0, 0], "blue": [2 / 3, 0]}
  for i in colours:
    np.testing.assert_allclose(batch["targets"][0, i], expected[words[i]], rtol=1e-6)
  others = np.ones(80, bool)
  others[colours] = False
  assert not batch["targets"][0, others].any()


def test_batches_are_a_function_of_seed_and_step():
  a = text_pretrain.make_batch(0, 5, 8, DATA, mlm_rate=0.15)
  b = text_pretrain.make_batch(0, 5, 8, DATA, mlm_rate=0.15)
  c = text_pretrain.make_batch(0, 6, 8, DATA, mlm_rate=0.15)
  for key in a:
    np.testing.assert_array_equal(a[key], b[key])
  assert not np.array_equal(a["ids"], c["ids"])
  # The masking draws from its own stream: the prompts do not depend on the rate.
  np.testing.assert_array_equal(
    text_pretrain.make_batch(0, 5, 8, DATA, mlm_rate=0)["ids"], a["ids"]
  )
  assert "mlm_ids" not in text_pretrain.make_batch(0, 5, 8, DATA, mlm_rate=0)


def test_corrupt_replaces_only_grammar_tokens_at_about_the_rate():
  ids = text_pretrain.make_batch(0, 1, 256, DATA, mlm_rate=0)["ids"]
  vocab_size = len(tokenizer_lib.vocabulary())
  corrupted, mask = text_pretrain.corrupt(ids, np.random.default_rng(0), 0.15, vocab_size)
  words = ids >= text_pretrain.NUM_SPECIAL
  assert not mask[~words].any() and np.array_equal(corrupted[~words], ids[~words])
  assert abs(mask[words].mean() - 0.15) < 0.01
  changed = corrupted != ids
  assert not changed[mask == 0].any()  # Only chosen tokens change ...
  assert changed[mask == 1].mean() > 0.9  # ... to a random token (rarely the same one).
  assert corrupted[mask == 1].min() >= text_pretrain.NUM_SPECIAL
  assert corrupted.max() < vocab_size


def test_probe_reads_a_linear_code_and_not_noise():
  rng = np.random.default_rng(0)
  n, length, dim = 200, 6, 8
  targets = rng.choice([-1.0, 0.0, 1.0], (n, length, 2)).astype(np.float32)
  mask = rng.random((n, length)) < 0.5
  noise = rng.normal(size=(n, length, dim))
  coded = noise.copy()
  coded[..., :2] += 3 * targets  # Each axis' sign along its own feature.
  probe = text_pretrain.probe_accuracy(coded, targets, mask)
  assert probe["x"] > 0.97 and probe["y"] > 0.97
  chance = text_pretrain.probe_accuracy(noise, targets, mask)
  assert 0.4 < chance["x"] < 0.6 and 0.4 < chance["y"] < 0.6
  # Only test tokens with a nonzero target on the axis count.
  second = slice(n // 2, None)
  assert probe["count_x"] == int((mask[second] & (targets[second][..., 0] != 0)).sum())


def test_t5_init_scales_queries_like_transformers_and_widens_the_position_bias():
  config = synthetic.t5_config(d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4)
  with nnx.use_eager_sharding(False):
    model = text_pretrain.Pretrainer(config, position_bias_std=2.0, rngs=nnx.Rngs(0))
    plain = T5EncoderModel(config, rngs=nnx.Rngs(0))
  attention = model.encoder.encoder.block[0].layer[0].SelfAttention
  before = plain.encoder.block[0].layer[0].SelfAttention
  # transformers: q ~ N(0, (d_model * d_kv)^-0.5); our port's init is lecun (d_model^-0.5).
  np.testing.assert_allclose(attention.q.kernel[...], before.q.kernel[...] / np.sqrt(8), rtol=1e-6)
  np.testing.assert_array_equal(attention.k.kernel[...], before.k.kernel[...])
  table = attention.relative_attention_bias.embedding[...]
  np.testing.assert_allclose(
    table, before.relative_attention_bias.embedding[...] * 2 * np.sqrt(32), rtol=1e-6
  )
  assert abs(float(np.std(table)) - 2.0) < 0.4


def _train_on_one_batch(steps: int, mlm_weight: float, **pretrainer_kwargs):
  """Trains a tiny Pretrainer on one fixed batch; returns (model, batch, first aux, last aux)."""
  config = synthetic.t5_config(d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4)
  with nnx.use_eager_sharding(False):
    model = text_pretrain.Pretrainer(config, rngs=nnx.Rngs(0), **pretrainer_kwargs)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  train = ml_collections.ConfigDict(
    dict(lr=3e-3, warmup_steps=1, steps=steps, end_lr_fraction=1.0, weight_decay=0.0, grad_clip=1.0)
  )
  tx = text_pretrain.make_optimizer(train)
  opt_state = tx.init(params)
  step = jax.jit(text_pretrain.make_train_step(graphdef, tx, mlm_weight))
  batch = text_pretrain.make_batch(0, 1, 8, DATA, mlm_rate=0.15 if mlm_weight > 0 else 0.0)
  first = None
  for _ in range(steps):
    params, opt_state, aux = step(params, opt_state, rest, batch)
    first = first or {k: float(v) for k, v in aux.items()}
  return nnx.merge(graphdef, params, rest), batch, first, aux


def test_train_step_learns_a_fixed_batch():
  _, _, first, aux = _train_on_one_batch(60, 0.5)
  assert bool(aux["finite"]) and set(aux) >= {"parse_loss", "mlm_loss", "mlm_accuracy"}
  assert float(aux["parse_loss"]) < 0.2 * first["parse_loss"]
  assert float(aux["mlm_loss"]) < 0.5 * first["mlm_loss"]


@pytest.mark.parametrize("bad", [dict(mlm_weight=-1.0), dict(mlm_rate=0.0)])
def test_bad_train_config_is_named(bad, tmp_path):
  from spatial_jax.configs_lib import load_config
  from spatial_jax.jobs import text_encoder_synthetic

  config = load_config("configs/text_encoder_synthetic.py", "smoke")
  config.train.update(bad)
  with pytest.raises(ValueError, match=f"config.train.{next(iter(bad))}"):
    text_encoder_synthetic.run(config, str(tmp_path))


def test_colour_probe_reads_a_colour_code_and_not_noise():
  rng = np.random.default_rng(0)
  n, length, dim = 200, 6, 8
  colour = rng.integers(0, 7, (n, length)).astype(np.int32)
  mask = rng.random((n, length)) < 0.5
  noise = rng.normal(size=(n, length, dim))
  coded = noise + 3 * np.eye(dim)[colour]
  assert text_pretrain.colour_probe_accuracy(coded, colour, mask) > 0.9
  assert text_pretrain.colour_probe_accuracy(noise, colour, mask) < 0.3


def test_fixed_readout_learns_layout_and_colour_in_their_own_features():
  model, batch, first, aux = _train_on_one_batch(80, 0.0, parse_readout="fixed", parse_scale=2.0)
  assert float(aux["parse_loss"]) < 0.3 * first["parse_loss"]
  assert float(aux["colour_loss"]) < 0.3 * first["colour_loss"]
  assert float(aux["colour_accuracy"]) == 1.0
  # The readout is the features themselves: the first two at 2x the layout targets.
  features = model.encoder(batch["ids"])
  at = batch["target_mask"] > 0
  error = np.asarray(features)[..., :2][at] / 2.0 - batch["targets"][at]
  assert float(np.mean(error**2)) == pytest.approx(float(aux["parse_loss"]), rel=0.2, abs=0.01)


def test_unknown_parse_readout_is_named():
  config = synthetic.t5_config(d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4)
  with pytest.raises(ValueError, match="parse_readout='probe'"):
    text_pretrain.Pretrainer(config, parse_readout="probe", rngs=nnx.Rngs(0))
