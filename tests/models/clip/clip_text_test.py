"""Parity of `spatial_jax.models.clip.CLIPTextModel` with transformers' PyTorch CLIPTextModel.

A tiny random CLIP text tower (the shape of diffusers' FLUX test fixture, flux.md §14) is saved
with `save_pretrained` and read back with our `from_pretrained`; both pooling branches are
covered (flux.md §6: FLUX reads `pooler_output` of prompts padded to max_length, no mask).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers

from spatial_jax import hf, sharding
from spatial_jax.models.clip import CLIPTextConfig
from spatial_jax.models.clip import model as model_lib
from spatial_jax.models.clip import params as clip_params

VOCAB, SEQ, PAD = 99, 24, 1
LEGACY_EOS = 2  # Pre-PR-#24773 configs, FLUX's text_encoder among them: pool at argmax(ids).
EOS = 49  # Any other id: pool at its first occurrence. Not the largest id, so argmax differs.
END = VOCAB - 1  # Stands for CLIP's <|endoftext|> (49407), the largest id, under LEGACY_EOS.
HF_CONFIG = dict(
  vocab_size=VOCAB,
  hidden_size=32,
  intermediate_size=37,
  num_hidden_layers=3,
  num_attention_heads=4,
  max_position_embeddings=SEQ,
  bos_token_id=0,
  pad_token_id=PAD,
)
# max |bf16 - fp32| / max |fp32|, measured on the "legacy" checkpoint: 0.010 (hidden states),
# 0.007 (pooled); 0.016-0.019 on the other two. bf16 keeps 8 mantissa bits.
BF16_RTOL = 0.05


def _torch_model(eos_token_id: int, hidden_act: str) -> transformers.CLIPTextModel:
  torch.manual_seed(0)
  config = transformers.CLIPTextConfig(
    **HF_CONFIG, hidden_act=hidden_act, eos_token_id=eos_token_id
  )
  model = transformers.CLIPTextModel(config).eval()
  with torch.no_grad():  # Random everything, layer norms included, so no term can hide.
    for name, param in model.named_parameters():
      if "norm" in name and name.endswith("weight"):
        param.copy_(1 + 0.2 * torch.randn_like(param))
      else:
        param.normal_(0.0, 0.2)
  return model


def _prompts(eos_token_id: int) -> np.ndarray:
  """(4, SEQ) ids as `padding="max_length"` gives them: body, end token, padding.

  Rows end at different positions (the last one is truncated so its end token is the last
  position). Under LEGACY_EOS the end token is the largest id and the padding repeats it, as
  CLIP-L's tokenizer pads with <|endoftext|>; row 0 also holds a literal 2, which argmax skips.
  Otherwise bodies hold larger ids than EOS and row 1 pads with EOS itself (its first wins).
  """
  rng = np.random.default_rng(eos_token_id)
  ends = (4, 9, 15, SEQ - 1)
  ids = np.zeros((len(ends), SEQ), np.int64)
  for row, end in enumerate(ends):
    if eos_token_id == LEGACY_EOS:
      body, stop, pad = rng.integers(3, END, end), END, END
    else:
      body = rng.choice([i for i in range(3, VOCAB) if i != EOS], end)
      body[0] = VOCAB - 1
      stop, pad = EOS, EOS if row == 1 else PAD
    ids[row, :end] = body
    ids[row, end] = stop
    ids[row, end + 1 :] = pad
  if eos_token_id == LEGACY_EOS:
    ids[0, 2] = LEGACY_EOS
  return ids


VARIANTS = {"legacy": (LEGACY_EOS, "quick_gelu"), "eos": (EOS, "quick_gelu"), "gelu": (EOS, "gelu")}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
  """variant -> (torch model, saved folder, our model, prompts), built on first use."""
  cache = {}

  def get(variant):
    if variant not in cache:
      eos_token_id, hidden_act = VARIANTS[variant]
      model = _torch_model(eos_token_id, hidden_act)
      folder = tmp_path_factory.mktemp(f"clip_{variant}")
      model.save_pretrained(folder)
      ours = clip_params.from_pretrained(folder)
      cache[variant] = model, folder, ours, _prompts(eos_token_id)
    return cache[variant]

  return get


def _torch_forward(model, ids, mask=None):
  with torch.no_grad():
    out = model(torch.tensor(ids), attention_mask=None if mask is None else torch.tensor(mask))
  return out.last_hidden_state.numpy(), out.pooler_output.numpy()


@jax.jit
def _jit_forward(model, ids, mask):
  return model(ids, mask)


def _forward(model, ids, mask=None):
  out = _jit_forward(model, jnp.asarray(ids), None if mask is None else jnp.asarray(mask))
  return np.asarray(out.last_hidden_state, np.float32), np.asarray(out.pooler_output, np.float32)


def _assert_close(got, expected, rtol=1e-4):
  assert got.shape == expected.shape
  np.testing.assert_allclose(got, expected, rtol=rtol, atol=rtol * np.abs(expected).max())


def _first(ids, token):
  """Index of the first `token` in each row (0 if none), as transformers' non-legacy rule."""
  return (ids == token).argmax(-1)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_matches_transformers_padded_to_max_length(checkpoints, variant):
  torch_model, _, ours, ids = checkpoints(variant)
  eos = torch_model.config.eos_token_id
  assert ours.config.eos_token_id == eos
  # The inputs tell the two pooling rules apart, so a wrong branch cannot pass.
  assert (ids.argmax(-1) != _first(ids, eos)).any()
  expected = ids.argmax(-1) if eos == LEGACY_EOS else _first(ids, eos)
  np.testing.assert_array_equal(model_lib.pooled_positions(jnp.asarray(ids), eos), expected)

  hidden, pooled = _forward(ours, ids)
  expected_hidden, expected_pooled = _torch_forward(torch_model, ids)
  assert hidden.shape == (len(ids), SEQ, HF_CONFIG["hidden_size"])
  _assert_close(hidden, expected_hidden)
  _assert_close(pooled, expected_pooled)


@pytest.mark.parametrize("variant", ["legacy", "eos"])
def test_matches_transformers_with_attention_mask(checkpoints, variant):
  torch_model, _, ours, ids = checkpoints(variant)
  mask = np.ones_like(ids)
  mask[0, 6:] = 0  # Right padding: the tokenizer's mask.
  mask[2, :2] = 0  # Left padding: queries 0-1 see no key; SDPA (and we) output zeros there.
  for got, expected in zip(
    _forward(ours, ids, mask), _torch_forward(torch_model, ids, mask), strict=True
  ):
    _assert_close(got, expected)


def test_hub_key_names_load(checkpoints, tmp_path):
  """The hub's `text_model.` keys (transformers 4 exports) and the `position_ids` buffer."""
  _, folder, ours, ids = checkpoints("legacy")
  tensors = safetensors.numpy.load_file(folder / "model.safetensors")
  tensors = {f"text_model.{k}": v for k, v in tensors.items()}
  tensors["text_model.embeddings.position_ids"] = np.arange(SEQ, dtype=np.int64)[None]
  safetensors.numpy.save_file(tensors, tmp_path / "model.safetensors")
  (tmp_path / "config.json").write_text((folder / "config.json").read_text())
  hub = clip_params.from_pretrained(tmp_path)
  for got, expected in zip(_forward(hub, ids), _forward(ours, ids), strict=True):
    np.testing.assert_array_equal(got, expected)


def test_missing_and_unexpected_keys_raise(checkpoints, tmp_path):
  folder = checkpoints("legacy")[1]
  tensors = safetensors.numpy.load_file(folder / "model.safetensors")
  del tensors["encoder.layers.1.mlp.fc2.bias"]
  tensors["text_projection.weight"] = np.zeros((32, 32), np.float32)  # A CLIPModel key.
  safetensors.numpy.save_file(tensors, tmp_path / "model.safetensors")
  (tmp_path / "config.json").write_text((folder / "config.json").read_text())
  with pytest.raises(hf.LoadError) as error:
    clip_params.from_pretrained(tmp_path)
  assert "text_model.encoder.layers.1.mlp.fc2.bias" in str(error.value)
  assert "text_projection.weight" in str(error.value)


def test_bfloat16_close_to_float32(checkpoints):
  _, folder, ours, ids = checkpoints("legacy")
  bf16 = clip_params.from_pretrained(folder, dtype="bfloat16")
  assert bf16.text_model.encoder.layers[0].mlp.fc1.kernel.dtype == jnp.bfloat16
  out = _jit_forward(bf16, jnp.asarray(ids), None)
  assert out.last_hidden_state.dtype == out.pooler_output.dtype == jnp.bfloat16
  for got, expected in zip(_forward(bf16, ids), _forward(ours, ids), strict=True):
    err = np.abs(got - expected).max() / np.abs(expected).max()
    assert err < BF16_RTOL, err


def test_sharded_load_matches(checkpoints):
  _, folder, ours, ids = checkpoints("legacy")
  mesh = sharding.make_mesh([("data", 4), ("fsdp", 2)])
  sharded = clip_params.from_pretrained(folder, mesh=mesh)
  kernel = sharded.text_model.encoder.layers[0].self_attn.q_proj.kernel[...]
  assert kernel.sharding.spec[0] == "fsdp"  # ("embed", "heads") under the default rules.
  position = sharded.text_model.embeddings.position_embedding.weight[...]
  assert tuple(position.sharding.spec) == (None, "fsdp")  # (None, "embed").
  with sharding.use_mesh(mesh, sharding.resolve_rules()):
    got = jax.jit(lambda m, x: m(x))(sharded, jnp.asarray(ids))
  for a, b in zip((np.asarray(g) for g in got), _forward(ours, ids), strict=True):
    _assert_close(a, b, rtol=1e-5)


def test_config_from_full_clip_config():
  text = dict(HF_CONFIG, hidden_act="gelu", eos_token_id=EOS)
  full = transformers.CLIPConfig(
    text_config=text, vision_config=dict(hidden_size=16, num_attention_heads=2)
  ).to_dict()
  config = CLIPTextConfig.from_hf_config(full, dtype="bfloat16")
  assert config == CLIPTextConfig.from_hf_config(
    transformers.CLIPTextConfig(**text).to_dict(), dtype="bfloat16"
  )
  assert (config.hidden_size, config.hidden_act, config.eos_token_id) == (32, "gelu", EOS)
  assert config.param_dtype == "float32"
  # Keys a file leaves out take transformers' defaults, as `CLIPTextConfig(**file)` would.
  assert (
    CLIPTextConfig.from_hf_config({}).eos_token_id == transformers.CLIPTextConfig().eos_token_id
  )
  with pytest.raises(ValueError, match="hidden_act='nope' is not supported"):
    CLIPTextConfig(hidden_act="nope")
