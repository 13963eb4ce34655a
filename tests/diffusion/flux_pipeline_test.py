"""`spatial_jax.diffusion.FluxPipeline` against `diffusers.FluxPipeline(output_type="np")` at fp32.

A tiny random diffusers pipeline (tiny_flux_pipeline.py, flux.md §14) is saved with
`save_pretrained` and loaded with our `from_pretrained`; both get the same packed latents. The
image is NON-square with a 2-level VAE, so a swapped latent height and width or a wrong unpack
would show. Measured on CPU (3 steps, 79-91% of pixels unclamped): images within 3.1e-5 of
diffusers (pixels in [0, 1]); T5 embeddings within 6e-6 (values up to 4.9), CLIP pooled within
2.2e-6.
"""

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tiny_flux_pipeline as tiny
import torch

from spatial_jax import sharding
from spatial_jax.diffusion import FluxPipeline, pack
from spatial_jax.diffusion import pipeline as pipeline_lib

HEIGHT, WIDTH = 32, 48  # VAE factor 2: a 16 x 24 latent grid, 8 x 12 = 96 packed tokens.
TEXT_LENGTH = 12
# The second prompt is longer than both tokenizers' lengths: truncation is exercised too.
PROMPTS = ["a red cube left of a blue sphere", "two green cats on the red cube left of the sphere"]
STEPS = 3
GUIDANCE = 4.0


@pytest.fixture(scope="module")
def store(tmp_path_factory):
  """(diffusers pipeline, ours, folder) per guidance setting, built once per module."""
  cache = {}

  def get(guided: bool):
    if guided not in cache:
      reference = tiny.diffusers_pipeline(guidance_embeds=guided)
      folder = tmp_path_factory.mktemp("guided" if guided else "plain")
      reference.save_pretrained(folder)
      ours = FluxPipeline.from_pretrained(folder, max_sequence_length=TEXT_LENGTH)
      cache[guided] = (reference, ours, folder)
    return cache[guided]

  return get


def _latents(seed: int = 0) -> np.ndarray:
  tokens = (HEIGHT // 4) * (WIDTH // 4)
  return np.random.default_rng(seed).standard_normal((len(PROMPTS), tokens, 4), np.float32)


def test_loads_components(store):
  reference, ours, _ = store(False)
  assert ours.vae_scale_factor == reference.vae_scale_factor == 2
  assert ours.tokenizer_max_length == reference.tokenizer_max_length == tiny.CLIP_LENGTH
  assert ours.max_sequence_length == TEXT_LENGTH
  assert not ours.guidance_embeds and store(True)[1].guidance_embeds
  assert ours.schedule.use_dynamic_shifting and ours.schedule.shift == 3.0


def test_encode_prompt_matches_diffusers(store):
  reference, ours, _ = store(False)
  # The tokenizers reloaded from disk give diffusers' in-memory tokenizers' ids.
  clip_ids, t5_ids = ours.tokenize(PROMPTS)
  np.testing.assert_array_equal(
    clip_ids,
    reference.tokenizer(
      PROMPTS, padding="max_length", max_length=tiny.CLIP_LENGTH, truncation=True
    ).input_ids,
  )
  np.testing.assert_array_equal(
    t5_ids,
    reference.tokenizer_2(
      PROMPTS, padding="max_length", max_length=TEXT_LENGTH, truncation=True
    ).input_ids,
  )
  assert t5_ids.shape == (2, TEXT_LENGTH) and (t5_ids[1] != 0).all()  # Truncated, no padding.

  with torch.no_grad():
    embeds, pooled, _ = reference.encode_prompt(
      PROMPTS, prompt_2=None, num_images_per_prompt=2, max_sequence_length=TEXT_LENGTH
    )
  got_embeds, got_pooled = ours.encode_prompt(PROMPTS, num_images_per_prompt=2)
  assert got_embeds.shape == (4, TEXT_LENGTH, 32) and got_pooled.shape == (4, 32)
  for got, expected in ((got_embeds, embeds.numpy()), (got_pooled, pooled.numpy())):
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("guided", [False, True], ids=["plain", "guided"])
def test_images_match_diffusers(store, guided):
  reference, ours, _ = store(guided)
  latents = _latents()
  with torch.no_grad():
    expected = reference(
      PROMPTS,
      height=HEIGHT,
      width=WIDTH,
      num_inference_steps=STEPS,
      guidance_scale=GUIDANCE,
      latents=torch.from_numpy(latents),
      output_type="np",
      max_sequence_length=TEXT_LENGTH,
    ).images
  got = ours(
    PROMPTS,
    height=HEIGHT,
    width=WIDTH,
    num_inference_steps=STEPS,
    guidance_scale=GUIDANCE,
    latents=latents,
  )
  assert got.shape == expected.shape == (2, HEIGHT, WIDTH, 3) and got.dtype == jnp.float32
  # Most pixels are not clamped, so the comparison sees the decoder's values.
  assert np.mean((expected > 0) & (expected < 1)) > 0.7
  np.testing.assert_allclose(np.asarray(got), expected, rtol=0, atol=1e-4)


def test_rng_latents_are_deterministic(store):
  _, ours, _ = store(False)
  kwargs = dict(height=HEIGHT, width=WIDTH, num_inference_steps=STEPS, num_images_per_prompt=2)
  key = jax.random.key(7)
  images = np.asarray(ours(PROMPTS[:1], rng=key, **kwargs))
  assert images.shape == (2, HEIGHT, WIDTH, 3)
  assert images.min() >= 0 and images.max() <= 1 and np.isfinite(images).all()
  # Encoders, denoising loop and decoder compile once per shape: new calls add no compiles.
  compiled = pipeline_lib._jit_apply._cache_size()
  np.testing.assert_array_equal(np.asarray(ours(PROMPTS[:1], rng=key, **kwargs)), images)
  assert pipeline_lib._jit_apply._cache_size() == compiled
  assert not np.allclose(np.asarray(ours(PROMPTS[:1], rng=jax.random.key(8), **kwargs)), images)
  # The key's noise is drawn NHWC on the latent grid and packed.
  noise = pack(jax.random.normal(key, (2, HEIGHT // 2, WIDTH // 2, 1)))
  np.testing.assert_array_equal(np.asarray(ours(PROMPTS[:1], latents=noise, **kwargs)), images)
  # Two copies of one prompt from different noise differ.
  assert not np.allclose(images[0], images[1])


@pytest.mark.slow
@pytest.mark.skipif(jax.device_count() % 2, reason="needs an even number of devices")
def test_sharded_pipeline_matches_unsharded(store):
  _, ours, folder = store(True)
  mesh = sharding.make_mesh([("data", 2), ("fsdp", -1)])
  sharded = FluxPipeline.from_pretrained(folder, mesh=mesh, max_sequence_length=TEXT_LENGTH)
  kwargs = dict(height=HEIGHT, width=WIDTH, num_inference_steps=STEPS, latents=_latents(1))
  np.testing.assert_allclose(
    np.asarray(sharded(PROMPTS, **kwargs)), np.asarray(ours(PROMPTS, **kwargs)), atol=1e-5
  )


def test_latent_arguments_are_checked(store):
  _, ours, _ = store(False)
  with pytest.raises(ValueError, match="rng"):
    ours(PROMPTS, height=HEIGHT, width=WIDTH, num_inference_steps=1)
  with pytest.raises(ValueError, match=r"\(2, 96, 4\)"):
    ours(PROMPTS, height=HEIGHT, width=HEIGHT, num_inference_steps=1, latents=_latents())


def test_missing_component_is_named(store, tmp_path):
  _, _, folder = store(False)
  broken = tmp_path / "pipe"
  shutil.copytree(folder, broken)
  shutil.rmtree(broken / "text_encoder_2")
  with pytest.raises(FileNotFoundError, match=r"no text_encoder_2/ sub-folder \(the T5 encoder\)"):
    FluxPipeline.from_pretrained(broken)
  (broken / "model_index.json").unlink()
  with pytest.raises(FileNotFoundError, match="model_index.json"):
    FluxPipeline.from_pretrained(broken)
