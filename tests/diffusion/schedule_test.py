"""Flow-match schedule, packing and the Euler sampler against diffusers (scheduler parity 1e-6)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
from diffusers.pipelines.flux.pipeline_flux import calculate_shift as diffusers_shift

from spatial_jax import diffusion
from spatial_jax.diffusion import FlowMatchSchedule

# FLUX.1-dev's scheduler/scheduler_config.json.
FLUX_SCHEDULER = dict(
  _class_name="FlowMatchEulerDiscreteScheduler",
  num_train_timesteps=1000,
  shift=3.0,
  use_dynamic_shifting=True,
  base_shift=0.5,
  max_shift=1.15,
  base_image_seq_len=256,
  max_image_seq_len=4096,
)


def _diffusers_sigmas(config, steps, seq_len):
  scheduler = FlowMatchEulerDiscreteScheduler.from_config(config)
  mu = diffusers_shift(seq_len, 256, 4096, 0.5, 1.15)
  sigmas = np.linspace(1.0, 1 / steps, steps)
  scheduler.set_timesteps(sigmas=sigmas, mu=mu)
  return scheduler, scheduler.sigmas.numpy(), scheduler.timesteps.numpy()


def test_shift_anchors():
  assert diffusion.calculate_shift(256) == pytest.approx(0.5)
  assert diffusion.calculate_shift(4096) == pytest.approx(1.15)
  # 512x512: 1024 tokens (flux.md §11.9: 0.6300, not maxdiffusion's 0.5929).
  assert diffusion.calculate_shift(1024) == pytest.approx(0.63, abs=5e-5)
  for n in (16, 1024, 3000):
    assert diffusion.calculate_shift(n) == pytest.approx(diffusers_shift(n))


@pytest.mark.parametrize("steps,seq_len", [(1, 16), (4, 256), (28, 1024), (50, 4096), (10, 600)])
def test_sigmas_match_diffusers(steps, seq_len):
  schedule = FlowMatchSchedule.from_config(FLUX_SCHEDULER)
  _, sigmas, timesteps = _diffusers_sigmas(FLUX_SCHEDULER, steps, seq_len)
  ours = schedule.sigmas(steps, seq_len)
  assert ours.shape == (steps + 1,) and ours[-1] == 0 and ours[0] == pytest.approx(1.0)
  np.testing.assert_allclose(ours, sigmas, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(schedule.timesteps(ours), timesteps, rtol=1e-6, atol=1e-4)


def test_static_shift_matches_diffusers():
  config = {**FLUX_SCHEDULER, "use_dynamic_shifting": False}
  scheduler = FlowMatchEulerDiscreteScheduler.from_config(config)
  scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / 8, 8))
  ours = FlowMatchSchedule.from_config(config).sigmas(8, 999)
  np.testing.assert_allclose(ours, scheduler.sigmas.numpy(), rtol=1e-6, atol=1e-7)


def test_unsupported_scheduler_options_are_refused():
  with pytest.raises(NotImplementedError, match="use_karras_sigmas"):
    FlowMatchSchedule.from_config({**FLUX_SCHEDULER, "use_karras_sigmas": True})
  with pytest.raises(NotImplementedError, match="only FlowMatchEuler"):
    FlowMatchSchedule.from_config({"_class_name": "DDIMScheduler"})


def test_pack_and_ids_match_diffusers():
  rng = np.random.default_rng(0)
  nchw = rng.standard_normal((2, 3, 6, 10)).astype(np.float32)
  nhwc = jnp.asarray(nchw.transpose(0, 2, 3, 1))
  expected = FluxPipeline._pack_latents(torch.from_numpy(nchw), 2, 3, 6, 10).numpy()
  packed = diffusion.pack(nhwc)
  np.testing.assert_array_equal(np.asarray(packed), expected)
  # Unpack: diffusers takes the image size (latent grid = 2 * (px // 16)).
  back = FluxPipeline._unpack_latents(torch.from_numpy(expected), 48, 80, 8).numpy()
  np.testing.assert_array_equal(
    np.asarray(diffusion.unpack(packed, 6, 10)), back.transpose(0, 2, 3, 1)
  )
  assert diffusion.latent_size(48, 80) == (6, 10)
  ids = FluxPipeline._prepare_latent_image_ids(2, 3, 5, "cpu", torch.float32).numpy()
  np.testing.assert_array_equal(diffusion.image_ids(3, 5), ids)
  with pytest.raises(ValueError, match="even"):
    diffusion.pack(jnp.zeros((1, 3, 4, 2)))


def test_euler_ode_matches_the_scheduler_loop():
  schedule = FlowMatchSchedule.from_config(FLUX_SCHEDULER)
  sigmas = schedule.sigmas(6, 64)
  rng = np.random.default_rng(1)
  x0 = rng.standard_normal((2, 8, 4)).astype(np.float32)
  weight = rng.standard_normal((4, 4)).astype(np.float32) * 0.3

  def velocity(x, sigma):  # Any deterministic field of (x, sigma) tests the integration.
    return jnp.tanh(x @ weight) * (1 + sigma)

  ours = jax.jit(lambda x: diffusion.sample_ode(velocity, x, sigmas))(jnp.asarray(x0))

  scheduler, _, timesteps = _diffusers_sigmas(FLUX_SCHEDULER, 6, 64)
  x = torch.from_numpy(x0)
  for t in scheduler.timesteps:
    sigma = float(t) / 1000
    v = torch.tanh(x @ torch.from_numpy(weight)) * (1 + sigma)
    x = scheduler.step(v, t, x, return_dict=False)[0]
  np.testing.assert_allclose(np.asarray(ours), x.numpy(), rtol=1e-5, atol=1e-5)
