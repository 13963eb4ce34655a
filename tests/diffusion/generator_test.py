"""Classifier-free guidance of the synthetic generator, and prompt dropout in flux_sft."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from spatial_jax import sharding
from spatial_jax.configs_lib import load_config
from spatial_jax.diffusion import build, flow_matching
from spatial_jax.diffusion import generator as generator_lib

PROMPTS = ["a red circle left of a blue square", "a green star above a yellow triangle"]


@pytest.fixture(scope="module")
def parts():
  config = load_config("configs/flux_sft_synthetic.py", "smoke")
  config.model.zero_init = False  # A velocity that depends on its inputs from the start.
  mesh = sharding.make_mesh([("data", 1)], devices=jax.devices()[:1])
  rules = sharding.resolve_rules(None)
  codec = build.build_codec(config)
  encoder = build.build_prompt_encoder(config)
  model = build.build_model(config, codec, encoder, mesh, rules)
  geo = generator_lib.geometry(32, codec, config.text.max_length)
  return config, model, codec, encoder, geo


@pytest.mark.slow
def test_cfg_velocity_is_the_guided_combination(parts):
  _, model, _, encoder, geo = parts
  embeds, pooled = encoder(PROMPTS)
  negative = encoder([""])
  x = jax.random.normal(jax.random.key(0), (2, geo.image_seq_len, model.config.in_channels))
  t = jnp.array([0.7, 0.3])
  ids = (geo.img_ids, geo.txt_ids, 1.0)
  v_pos = generator_lib.velocity_fn(model, embeds, pooled, *ids)(x, t)
  neg = tuple(jnp.repeat(a, 2, axis=0) for a in negative)
  v_neg = generator_lib.velocity_fn(model, *neg, *ids)(x, t)
  guided = generator_lib.velocity_fn(model, embeds, pooled, *ids, cfg_scale=3.0, negative=negative)
  np.testing.assert_allclose(guided(x, t), v_neg + 3.0 * (v_pos - v_neg), rtol=1e-4, atol=1e-5)
  assert float(jnp.abs(v_pos - v_neg).max()) > 1e-3  # The prompt matters, so the test can fail.
  with pytest.raises(ValueError, match="negative"):
    generator_lib.velocity_fn(model, embeds, pooled, *ids, cfg_scale=3.0)


@pytest.mark.slow
def test_prompt_dropout_one_trains_on_the_empty_prompt(parts):
  config, model, codec, encoder, geo = parts
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  images = jax.random.randint(jax.random.key(1), (2, 32, 32, 3), 0, 256).astype(jnp.uint8)
  negative = encoder([""])
  tx = optax.sgd(0.0)
  losses = {}
  for name, dropout, embeds in (
    ("dropped", 1.0, encoder(PROMPTS)),
    ("empty", 0.0, tuple(jnp.repeat(a, 2, axis=0) for a in negative)),
    ("kept", 0.0, encoder(PROMPTS)),
  ):
    config.train.prompt_dropout = dropout
    step = jax.jit(flow_matching.make_train_step(graphdef, tx, config, codec, geo, negative))
    batch = dict(images=images, prompt_embeds=embeds[0], pooled=embeds[1])
    _, _, aux = step(params, tx.init(params), rest, batch, jax.random.key(2))
    losses[name] = float(aux["loss"])
  # Same key: the same timesteps and noise; only the prompts differ.
  assert losses["dropped"] == pytest.approx(losses["empty"], rel=1e-6)
  assert losses["kept"] != pytest.approx(losses["empty"], rel=1e-4)
  config.train.prompt_dropout = 0.5
  with pytest.raises(ValueError, match="prompt_dropout"):
    flow_matching.make_train_step(graphdef, tx, config, codec, geo, None)


def test_object_weights_mark_palette_pixels_and_weight_the_loss():
  from spatial_jax.data import render, scenes

  scene = scenes.parse_prompt("a red circle left of a blue square")
  image = render.render_scene(scene, size=32, seed=0)
  weights = flow_matching.object_weights(image[None], 8.0)
  assert weights.shape == (1, 32, 32, 1) and set(np.unique(weights)) == {1.0, 8.0}
  share = float((weights == 8.0).mean())
  assert 0.005 < share < 0.2  # Two small objects on a large background.

  rng = np.random.default_rng(0)
  x0, noise = rng.normal(size=(2, 2, 4, 3)).astype(np.float32)
  w = rng.uniform(1, 8, size=(2, 4, 3)).astype(np.float32)
  t = np.array([0.3, 0.6], np.float32)

  def velocity(x, s):
    return 0.5 * x

  x_t = (1 - t[:, None, None]) * x0 + t[:, None, None] * noise
  err = (0.5 * x_t - (noise - x0)) ** 2
  loss = flow_matching.flow_matching_loss(velocity, x0, noise, t, jnp.asarray(w))
  np.testing.assert_allclose(loss, (w * err).sum() / w.sum(), rtol=1e-5)


def test_non_finite_pixels_stop_naming_the_generator():
  images = np.zeros((3, 4, 4, 3), np.float32)
  assert generator_lib.unit_to_uint8(images, "workdirs/g/final").dtype == np.uint8
  images[2, 1, 1, 0] = np.nan
  with pytest.raises(FloatingPointError, match="generator workdirs/g/final .* in 1 of 3 images"):
    generator_lib.unit_to_uint8(images, "workdirs/g/final")


def test_damaged_generator_record_is_named(tmp_path):
  record = tmp_path / generator_lib.GENERATOR_FILE
  record.write_text('{"codec": {"scale_fac')  # generator.json cut short
  with pytest.raises(ValueError, match="generator.json is not valid JSON.*damaged"):
    generator_lib.load_generator(tmp_path)
  assert record.read_text() == '{"codec": {"scale_fac'
