"""Parity of `AutoencoderKL` (read by `params.from_pretrained`) with diffusers' PyTorch one at fp32.

Random tiny models (norm weights and biases randomised too) are saved with `save_pretrained` and
loaded through `spatial_jax.hf`; images are NON-square so a swapped H/W would show. Torch is NCHW,
we are NHWC: the test transposes.
"""

import json
import shutil

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
from flax import nnx

from spatial_jax import hf, sharding
from spatial_jax.models import common
from spatial_jax.models.vae import (
  AutoencoderKL,
  DiagonalGaussian,
  VAEConfig,
  scale_latents,
  unscale_latents,
)
from spatial_jax.models.vae import params as vae_params

_LEVELS2 = dict(
  block_out_channels=(8, 16),
  down_block_types=("DownEncoderBlock2D",) * 2,
  up_block_types=("UpDecoderBlock2D",) * 2,
  latent_channels=4,
  norm_num_groups=4,
)
CONFIGS = {
  # diffusers' own FLUX pipeline test VAE (flux.md §14): one level, so no down/upsampling.
  "diffusers_tiny": dict(
    sample_size=32,
    block_out_channels=(4,),
    layers_per_block=1,
    latent_channels=1,
    norm_num_groups=1,
    use_quant_conv=False,
    use_post_quant_conv=False,
    shift_factor=0.0609,
    scaling_factor=1.5035,
  ),
  # FLUX's layout at two levels: no quant convs, 2 resnets per encoder level, mid attention.
  "flux_like": dict(
    **_LEVELS2,
    layers_per_block=2,
    use_quant_conv=False,
    use_post_quant_conv=False,
    shift_factor=0.1159,
    scaling_factor=0.3611,
  ),
  # SD-style: quant convs on; also covers a mid block without attention.
  "quant_convs": dict(
    **_LEVELS2, layers_per_block=1, use_quant_conv=True, mid_block_add_attention=False
  ),
}
BATCH, HEIGHT, WIDTH = 2, 24, 40


def torch_vae(name: str) -> diffusers.AutoencoderKL:
  torch.manual_seed(0)
  model = diffusers.AutoencoderKL(**CONFIGS[name]).eval()
  with torch.no_grad():
    for key, p in model.named_parameters():
      if "norm" in key:  # GroupNorms start at (1, 0): randomise them so a mixup shows.
        p.copy_((1.0 if key.endswith("weight") else 0.0) + 0.2 * torch.randn_like(p))
  return model


def nchw_to_nhwc(x: torch.Tensor) -> np.ndarray:
  return x.permute(0, 2, 3, 1).numpy()


def nhwc_to_nchw(x: np.ndarray) -> torch.Tensor:
  return torch.from_numpy(np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2))))


def images(seed: int = 0) -> np.ndarray:
  """NHWC images in [-1, 1], as diffusers' VAE expects."""
  return np.random.default_rng(seed).uniform(-1, 1, (BATCH, HEIGHT, WIDTH, 3)).astype(np.float32)


def latents(config: VAEConfig, seed: int = 1) -> np.ndarray:
  f = config.downsample_factor
  shape = (BATCH, HEIGHT // f, WIDTH // f, config.latent_channels)
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


@nnx.jit
def roundtrip(model, x, z):
  """encode(x) and decode(z) in one compile (compiles dominate this file's run time)."""
  return model.encode(x), model.decode(z)


def assert_close(got, expected, rtol=1e-4):
  got, expected = np.asarray(got, np.float32), np.asarray(expected, np.float32)
  assert got.shape == expected.shape
  np.testing.assert_allclose(got, expected, rtol=rtol, atol=rtol * np.abs(expected).max())


@pytest.fixture(scope="module")
def store(tmp_path_factory):
  """name -> (torch model, its save_pretrained folder, our model loaded from it), built once."""
  cache = {}

  def get(name):
    if name not in cache:
      model = torch_vae(name)
      folder = tmp_path_factory.mktemp(f"vae_{name}")
      model.save_pretrained(folder)
      cache[name] = model, folder, vae_params.from_pretrained(folder)
    return cache[name]

  return get


@pytest.fixture(params=sorted(CONFIGS))
def saved(request, store):
  return request.param, *store(request.param)


@pytest.fixture
def flux_like(store):
  return store("flux_like")


def test_encode_decode_match_diffusers(saved):
  _, torch_model, _, ours = saved
  x, z = images(), latents(ours.config)
  with torch.no_grad():
    posterior = torch_model.encode(nhwc_to_nchw(x)).latent_dist
    decoded = torch_model.decode(nhwc_to_nchw(z)).sample
  got, got_images = roundtrip(ours, jnp.asarray(x), jnp.asarray(z))
  f = ours.config.downsample_factor
  assert got.mean.shape == (BATCH, HEIGHT // f, WIDTH // f, ours.config.latent_channels)
  assert got_images.shape == (BATCH, HEIGHT, WIDTH, 3)
  assert_close(got.mean, nchw_to_nhwc(posterior.mean))
  assert_close(got.logvar, nchw_to_nhwc(posterior.logvar))
  assert_close(got.kl(), posterior.kl().numpy())
  assert_close(got_images, nchw_to_nhwc(decoded))


def test_config_from_diffusers(saved):
  name, torch_model, _, ours = saved
  assert ours.config == VAEConfig.from_hf_config(dict(torch_model.config))
  assert ours.config.shift_factor == CONFIGS[name].get("shift_factor")
  rebuilt = diffusers.AutoencoderKL(**ours.config.to_hf_config())
  assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {
    k: v.shape for k, v in torch_model.state_dict().items()
  }


def test_flux1_preset_maps_every_diffusers_key():
  # FLUX.1-dev/vae/config.json as published (flux.md §7).
  published = {
    "_class_name": "AutoencoderKL",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "force_upcast": True,
    "in_channels": 3,
    "latent_channels": 16,
    "latents_mean": None,
    "latents_std": None,
    "layers_per_block": 2,
    "mid_block_add_attention": True,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 1024,
    "scaling_factor": 0.3611,
    "shift_factor": 0.1159,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "use_post_quant_conv": False,
    "use_quant_conv": False,
  }
  config = VAEConfig.flux1()
  assert VAEConfig.from_hf_config(published) == config
  assert config.downsample_factor == 8
  with torch.device("meta"):  # Shapes only: no 84M-parameter init.
    reference = diffusers.AutoencoderKL(**published)
  torch_shapes = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
  ours = common.variable_shapes(common.abstract_model(AutoencoderKL, config))
  mapped, unexpected = hf.map_keys(torch_shapes, vae_params.key_rules(ours))
  assert unexpected == [] and set(mapped) == set(ours)
  for path, (key, transform) in mapped.items():
    fake = np.broadcast_to(np.zeros((), np.float32), torch_shapes[key])
    assert (transform or (lambda x: x))(fake).shape == ours[path], path


def _rewrite(folder, tmp_path, edit):
  """A copy of a saved VAE folder with its tensors passed through `edit(dict) -> dict`."""
  tensors = safetensors.numpy.load_file(folder / "diffusion_pytorch_model.safetensors")
  out = tmp_path / "edited"
  out.mkdir()
  shutil.copy(folder / "config.json", out / "config.json")
  hf.save_safetensors(edit(tensors), out / "diffusion_pytorch_model.safetensors")
  return out


def test_missing_and_unexpected_keys_raise(flux_like, tmp_path):
  _, folder, _ = flux_like

  def edit(tensors):
    del tensors["decoder.up_blocks.0.upsamplers.0.conv.weight"]
    tensors["decoder.extra.weight"] = np.zeros(3, np.float32)
    return tensors

  with pytest.raises(hf.LoadError) as error:
    vae_params.from_pretrained(_rewrite(folder, tmp_path, edit))
  assert "decoder.up_blocks.0.upsamplers.0.conv.kernel" in str(error.value)
  assert "decoder.extra.weight" in str(error.value)


def test_pre_0_14_attention_names_load(flux_like, tmp_path):
  _, folder, ours = flux_like
  new_to_old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}

  def edit(tensors):
    renamed = {}
    for key, value in tensors.items():
      for new, old in new_to_old.items():
        key = key.replace(f".attentions.0.{new}.", f".attentions.0.{old}.")
      renamed[key] = value
    assert "encoder.mid_block.attentions.0.proj_attn.weight" in renamed
    return renamed

  old = vae_params.from_pretrained(_rewrite(folder, tmp_path, edit))
  jax.tree.map(np.testing.assert_array_equal, nnx.state(old), nnx.state(ours))


def test_not_a_vae_folder(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps({"_class_name": "FluxTransformer2DModel"}))
  with pytest.raises(hf.LoadError, match="not an AutoencoderKL"):
    vae_params.from_pretrained(tmp_path)


def test_bf16_close_to_fp32(flux_like):
  _, folder, ours = flux_like
  bf16 = vae_params.from_pretrained(folder, dtype="bfloat16")
  assert bf16.decoder.conv_in.kernel[...].dtype == jnp.bfloat16
  x, z = jnp.asarray(images()), jnp.asarray(latents(ours.config))
  (posterior, got), (expected_posterior, expected) = roundtrip(bf16, x, z), roundtrip(ours, x, z)
  assert got.dtype == posterior.mean.dtype == jnp.bfloat16
  # max |bf16 - fp32| / max |fp32| measured here: decode 1.7%, encoder mean 1.1%; diffusers' own
  # bf16 model (torch CPU) is 1.8% / 1.1% off its fp32 on the same inputs.
  for bf16_out, fp32_out in ((got, expected), (posterior.mean, expected_posterior.mean)):
    error = np.abs(np.asarray(bf16_out, np.float32) - np.asarray(fp32_out)).max()
    assert error < 0.04 * np.abs(np.asarray(fp32_out)).max()


def test_sharded_load_and_decode(flux_like):
  torch_model, folder, ours = flux_like
  mesh = sharding.make_mesh([("data", 4), ("tensor", 2)])
  rules = sharding.resolve_rules()
  sharded = vae_params.from_pretrained(folder, mesh=mesh)
  kernel = sharded.decoder.mid_block.resnets[0].conv1.kernel[...]
  assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, None, None, "tensor")
  # The 3-channel image conv does not split in two: replicated.
  assert sharded.decoder.conv_out.kernel[...].sharding.is_fully_replicated
  z = np.concatenate([latents(ours.config), latents(ours.config, seed=2)])  # batch 4 over data
  with sharding.use_mesh(mesh, rules):
    got = nnx.jit(lambda m, z: m.decode(z))(
      sharded, jax.device_put(z, sharding.data_sharding(mesh, rules, 4))
    )
  with torch.no_grad():
    expected = nchw_to_nhwc(torch_model.decode(nhwc_to_nchw(z)).sample)
  assert_close(got, expected)


def test_posterior_and_latent_scaling():
  mean = jnp.linspace(-1, 1, 24).reshape(1, 2, 3, 4)
  moments = jnp.concatenate([mean, jnp.full_like(mean, 40.0)], axis=-1)
  posterior = DiagonalGaussian.from_moments(moments)
  np.testing.assert_array_equal(posterior.mode(), mean)
  np.testing.assert_array_equal(posterior.logvar, 20.0)  # clipped like diffusers
  key = jax.random.key(0)
  expected = mean + jnp.exp(10.0) * jax.random.normal(key, mean.shape)
  np.testing.assert_allclose(posterior.sample(key), expected, rtol=1e-6)

  flux = VAEConfig.flux1()
  np.testing.assert_allclose(scale_latents(mean, flux), (mean - 0.1159) * 0.3611, rtol=1e-6)
  np.testing.assert_allclose(unscale_latents(scale_latents(mean, flux), flux), mean, atol=1e-6)
  no_shift = VAEConfig()  # shift_factor None: scaling only (SD's 0.18215)
  np.testing.assert_allclose(scale_latents(mean, no_shift), mean * 0.18215, rtol=1e-6)
