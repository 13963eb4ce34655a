"""The synthetic generator's components: the exact pixel codec and the frozen text encoders."""

import jax
import numpy as np
import pytest
from flax import nnx

from spatial_jax.data import tokenizer as tokenizer_lib
from spatial_jax.diffusion import synthetic
from spatial_jax.diffusion.latents import latent_size, pack

PROMPTS = [
  "a red circle to the left of a blue star",
  "a blue star to the left of a red circle",
  "a green square above a yellow triangle",
]
PAD, BOS, EOS = (tokenizer_lib.vocabulary().index(t) for t in ("<pad>", "<bos>", "<eos>"))


# Eager calls dispatch op by op (seconds); the tests call the encoders jitted.
_call = nnx.jit(lambda module, ids: module(ids))


# One layer each: the properties tested hold at any depth, and each build compiles less.
SIZES = dict(t5=dict(num_layers=1), clip=dict(num_hidden_layers=1))


@pytest.fixture(scope="module")
def encoder():
  return synthetic.build_prompt_encoder(seed=7, max_length=24, **SIZES)


def test_codec_is_an_exact_space_to_depth():
  codec = synthetic.PixelCodec()
  images = np.asarray(jax.random.uniform(jax.random.key(0), (2, 32, 32, 3), minval=-1, maxval=1))
  posterior = codec.encode(images)
  latents = np.asarray(posterior.mode())
  assert codec.vae_scale_factor == 2 and codec.latent_channels == 12
  assert latents.shape == (2, 16, 16, 12) == (2, *latent_size(32, 32, 2), 12)
  assert pack(latents).shape == (2, 64, 48)
  # Feature (dy * f + dx) * C + c of latent pixel (i, j) is image pixel (f i + dy, f j + dx, c).
  assert latents[1, 3, 5, (1 * 2 + 0) * 3 + 2] == images[1, 7, 10, 2]
  assert latents[0, 15, 0, (0 * 2 + 1) * 3 + 0] == images[0, 30, 1, 0]
  np.testing.assert_array_equal(posterior.sample(jax.random.key(1)), latents)
  np.testing.assert_array_equal(posterior.mean, latents)
  np.testing.assert_array_equal(codec.decode(latents), images)  # Exact: no arithmetic at all.


def test_codec_scaling_round_trips_and_other_factors():
  codec = synthetic.PixelCodec(
    synthetic.PixelCodecConfig(downsample_factor=4, scaling_factor=0.5, shift_factor=0.25)
  )
  images = np.asarray(jax.random.uniform(jax.random.key(2), (1, 16, 8, 3), minval=-1, maxval=1))
  z = codec.scale_latents(codec.encode(images).mode())
  assert z.shape == (1, 4, 2, 48)
  np.testing.assert_allclose(z, (codec.encode(images).mode() - 0.25) * 0.5)
  np.testing.assert_allclose(codec.decode(codec.unscale_latents(z)), images, atol=1e-6)
  with pytest.raises(ValueError, match="divisible by downsample_factor=4"):
    codec.encode(np.zeros((1, 18, 16, 3), np.float32))
  with pytest.raises(ValueError, match="48 channels"):
    codec.decode(np.zeros((1, 4, 4, 12), np.float32))


def test_tokenizers_lay_out_bos_words_eos_and_padding():
  vocab = tokenizer_lib.vocabulary()
  words = [vocab.index(w) for w in "a red circle".split()]
  clip_ids = synthetic.SyntheticTokenizer(8, bos=True)(["A red circle"])["input_ids"]
  t5 = synthetic.SyntheticTokenizer(8, bos=False)(["a red circle"], max_length=6)
  np.testing.assert_array_equal(clip_ids[0], [BOS, *words, EOS, PAD, PAD, PAD])
  np.testing.assert_array_equal(t5["input_ids"][0], [*words, EOS, PAD, PAD])
  np.testing.assert_array_equal(t5["attention_mask"][0], [1, 1, 1, 1, 0, 0])
  # Too long: the words are cut and the end token is kept, as HF truncation does.
  cut = synthetic.tokenize(["a red circle above a blue star"], 4, bos=True)
  np.testing.assert_array_equal(cut[0], [BOS, *words[:2], EOS])


def test_text_encoders_are_deterministic_and_read_words_in_order(encoder):
  embeds, pooled = encoder(PROMPTS)
  assert embeds.shape == (3, 24, 64) and pooled.shape == (3, 64)
  assert (encoder.joint_attention_dim, encoder.pooled_projection_dim) == (64, 64)
  again = synthetic.build_prompt_encoder(seed=7, max_length=24, **SIZES)(PROMPTS)
  np.testing.assert_array_equal(again[0], embeds)
  np.testing.assert_array_equal(again[1], pooled)
  other = synthetic.build_prompt_encoder(seed=8, max_length=24, **SIZES)(PROMPTS)
  assert np.abs(np.asarray(other[1]) - np.asarray(pooled)).max() > 0.1
  # The same words in another order give other states (position reaches the generator only here).
  assert np.abs(np.asarray(pooled[0] - pooled[1])).max() > 1e-2
  assert np.abs(np.asarray(embeds[0] - embeds[1])).max() > 1e-2


def test_pooled_output_is_clips_state_at_eos(encoder):
  ids = encoder.tokenize(PROMPTS)
  _, pooled = encoder.encode_ids(ids["t5_ids"], ids["clip_ids"])
  states = np.asarray(_call(encoder.encoders.clip, ids["clip_ids"]).last_hidden_state)
  eos = np.argmax(ids["clip_ids"] == EOS, axis=1)
  np.testing.assert_allclose(pooled, states[np.arange(3), eos], rtol=1e-5, atol=1e-6)
  # CLIP is causal, so what follows <eos> cannot change the pooled vector.
  short = _call(encoder.encoders.clip, ids["clip_ids"][:1, : eos[0] + 1]).pooler_output
  np.testing.assert_allclose(short, pooled[:1], rtol=1e-5, atol=1e-6)
  # T5 runs without a mask, as FLUX calls it: the padding is attended, so a longer pad changes
  # the states (unlike a masked encoder).
  t5 = encoder.encoders.t5
  full = np.asarray(_call(t5, ids["t5_ids"][:1]))
  cut = np.asarray(_call(t5, ids["t5_ids"][:1, :12]))
  assert np.abs(full[0, :5] - cut[0, :5]).max() > 1e-4


def test_saved_encoders_reload_from_the_file(encoder, tmp_path):
  synthetic.save_text_encoders(encoder, tmp_path / "enc")
  loaded = synthetic.load_text_encoders(tmp_path / "enc")
  assert loaded.max_length == 24 and loaded.seed == 7
  for a, b in zip(loaded(PROMPTS), encoder(PROMPTS), strict=True):
    np.testing.assert_array_equal(a, b)
  with pytest.raises(FileNotFoundError, match="text_encoders.json"):
    synthetic.load_text_encoders(tmp_path)
