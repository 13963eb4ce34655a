"""Parity of our FluxTransformer (`params.from_pretrained`) with diffusers' at fp32."""

import flux_reference as R
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spatial_jax import hf
from spatial_jax.models.flux import FluxConfig, params


def _forward(model, batch):
  return np.asarray(
    jax.jit(lambda m, b: m(**b))(model, {k: jnp.asarray(v) for k, v in batch.items()})
  )


@pytest.fixture(scope="module", params=sorted(R.CONFIGS))
def saved(request, tmp_path_factory):
  name = request.param
  model = R.torch_model(name)
  folder = tmp_path_factory.mktemp(f"flux_{name}")
  model.save_pretrained(folder)
  return name, model, folder


@pytest.mark.parametrize("scan_layers", [True, False])
def test_forward_matches_diffusers(saved, scan_layers):
  name, torch_model, folder = saved
  batch = R.inputs(name)
  ours = params.from_pretrained(folder, scan_layers=scan_layers)
  assert ours.config.guidance_embeds == R.CONFIGS[name]["guidance_embeds"]
  expected = R.torch_forward(torch_model, batch)
  got = _forward(ours, batch)
  assert (
    got.shape == expected.shape == batch["hidden_states"].shape[:2] + (ours.config.out_features,)
  )
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_bfl_single_file_matches_diffusers(saved, tmp_path):
  name, torch_model, _ = saved
  state = {k: v.numpy() for k, v in torch_model.state_dict().items()}
  path = tmp_path / "flux1-test.safetensors"
  hf.save_safetensors(params.to_bfl(state), path)
  config = FluxConfig.from_hf_config(dict(torch_model.config))
  ours = params.from_pretrained(path, config=config)
  batch = R.inputs(name, seed=1)
  expected = R.torch_forward(torch_model, batch)
  np.testing.assert_allclose(
    _forward(ours, batch), expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max()
  )
