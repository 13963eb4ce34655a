"""FLUX LoRA interop: our adapters in diffusers, diffusers/peft adapters here, same outputs."""

import flux_reference as R
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from diffusers import FluxPipeline
from flax import nnx
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

from spatial_jax import lora
from spatial_jax.models.flux import params

NAME = "guided"
# diffusers' train_dreambooth_lora_flux / Flow-GRPO target list (PEFT suffix matching).
DIFFUSERS_TARGETS = [
  "attn.to_k",
  "attn.to_q",
  "attn.to_v",
  "attn.to_out.0",
  "attn.add_k_proj",
  "attn.add_q_proj",
  "attn.add_v_proj",
  "attn.to_add_out",
  "ff.net.0.proj",
  "ff.net.2",
  "ff_context.net.0.proj",
  "ff_context.net.2",
]


def _forward(model, batch):
  return np.asarray(model(**{k: jnp.asarray(v) for k, v in batch.items()}))


def _close(got, expected):
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  folder = tmp_path_factory.mktemp("flux_lora_base")
  R.torch_model(NAME).save_pretrained(folder)
  return folder


def _randomize_adapters(model, seed=0):
  key = jax.random.key(seed)
  for layer in lora.lora_layers(model).values():
    key, ka, kb = jax.random.split(key, 3)
    layer.lora_a[...] = jax.random.normal(ka, layer.lora_a.shape) * 0.3
    layer.lora_b[...] = jax.random.normal(kb, layer.lora_b.shape) * 0.3


def _diffusers_with(folder, adapter_dir):
  model = R.torch_model(NAME)  # The same weights as the saved base.
  pipe = FluxPipeline(
    scheduler=None,
    vae=None,
    text_encoder=None,
    tokenizer=None,
    text_encoder_2=None,
    tokenizer_2=None,
    transformer=model,
  )
  pipe.load_lora_weights(adapter_dir)
  return model


@pytest.mark.slow
@pytest.mark.parametrize("scan_layers", [True, False])
def test_our_adapter_loads_in_diffusers(saved, tmp_path, scan_layers):
  ours = params.from_pretrained(saved, scan_layers=scan_layers)
  batch = R.inputs(NAME)
  base_out = _forward(ours, batch)
  matched = lora.apply_lora(
    ours, rank=4, alpha=8, targets=params.lora_targets(single_mlp=True), rngs=nnx.Rngs(0)
  )
  # Double blocks: 8 attention + 4 feed-forward layers; single: q, k, v, proj_mlp, proj_out.
  assert len(matched) == (12 + 5 if scan_layers else 2 * 12 + 3 * 5)
  _randomize_adapters(ours)
  params.export_lora(ours, tmp_path)
  got = _forward(ours, batch)
  assert np.abs(got - base_out).max() > 0.1 * np.abs(base_out).max()  # The adapter matters.
  expected = R.torch_forward(_diffusers_with(saved, tmp_path), batch)
  _close(got, expected)


@pytest.mark.slow
@pytest.mark.parametrize("scan_layers", [True, False])
def test_diffusers_adapter_loads_here(saved, tmp_path, scan_layers):
  model = R.torch_model(NAME)
  model.add_adapter(
    LoraConfig(r=4, lora_alpha=6, target_modules=DIFFUSERS_TARGETS, init_lora_weights=False)
  )
  FluxPipeline.save_lora_weights(
    tmp_path,
    transformer_lora_layers=get_peft_model_state_dict(model),
    transformer_lora_adapter_metadata=model.peft_config["default"].to_dict(),
  )
  batch = R.inputs(NAME, seed=3)
  expected = R.torch_forward(model, batch)

  ours = params.from_pretrained(saved, scan_layers=scan_layers)
  adapted = params.load_lora(ours, tmp_path)
  assert all(layer.rank == 4 and layer.alpha == 6 for layer in lora.lora_layers(ours).values())
  assert len(adapted) == (12 + 3 if scan_layers else 2 * 12 + 3 * 3)
  _close(_forward(ours, batch), expected)


@pytest.mark.slow
def test_round_trip_and_merge(saved, tmp_path):
  ours = params.from_pretrained(saved)
  lora.apply_lora(ours, rank=4, alpha=8, targets=params.DEFAULT_LORA_TARGETS, rngs=nnx.Rngs(0))
  _randomize_adapters(ours, seed=1)
  params.export_lora(ours, tmp_path)
  again = params.from_pretrained(saved)
  params.load_lora(again, tmp_path)
  for path, layer in lora.lora_layers(ours).items():
    other = lora.lora_layers(again)[path]
    np.testing.assert_array_equal(np.asarray(other.lora_a[...]), np.asarray(layer.lora_a[...]))
    np.testing.assert_array_equal(np.asarray(other.lora_b[...]), np.asarray(layer.lora_b[...]))
  batch = R.inputs(NAME, seed=4)
  with_lora = _forward(again, batch)
  with lora.disabled(again):
    assert np.abs(_forward(again, batch) - with_lora).max() > 1e-3
  _close(_forward(lora.merge(again), batch), with_lora)
