"""Parity of our T5EncoderModel (`params.from_pretrained`) with transformers' one (tiny, random).

The PyTorch model is written with `save_pretrained` and read back through `spatial_jax.hf`, so
the key map, the transposes and the numerics are all checked (flux.md §13: transformers 5 has no
Flax T5 to compare against, PyTorch is the reference).
"""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from transformers.models.t5.modeling_t5 import T5Attention

from spatial_jax import hf, sharding
from spatial_jax.models.t5 import T5Config
from spatial_jax.models.t5 import params as t5_params
from spatial_jax.models.t5.model import relative_position_bucket

# max_distance 20 with 8 buckets: 4 per direction, exact below 2, log-spaced up to 20.
TINY = dict(
  vocab_size=100,
  d_model=32,
  d_kv=8,
  d_ff=48,
  num_layers=2,
  num_heads=4,
  relative_attention_num_buckets=8,
  relative_attention_max_distance=20,
  feed_forward_proj="gated-gelu",
  dropout_rate=0.0,
)
LONG = 48  # > relative_attention_max_distance, so the clipped last buckets are used.
# bf16 (weights and activations) against fp32, as a fraction of max |output|: measured 9.4e-3
# here (transformers' own bf16 model is off by 1.1e-2 on the same input); ~3x headroom.
BF16_TOL = 3e-2


def _torch_model(**overrides) -> transformers.T5EncoderModel:
  torch.manual_seed(0)
  model = transformers.T5EncoderModel(transformers.T5Config(**{**TINY, **overrides})).eval()
  with torch.no_grad():
    for name, param in model.named_parameters():
      if name.endswith("layer_norm.weight"):  # ones by default: a swapped norm would pass
        param.uniform_(0.5, 1.5)
  return model


def _torch_forward(model, ids, mask=None) -> np.ndarray:
  with torch.no_grad():
    out = model(
      input_ids=torch.from_numpy(ids).long(),
      attention_mask=None if mask is None else torch.from_numpy(mask).long(),
    )
  return out.last_hidden_state.numpy()


@jax.jit
def _forward(model, ids, mask):
  return model(ids, mask)


def _ours(model, ids, mask=None) -> np.ndarray:
  mask = None if mask is None else jnp.asarray(mask)
  return np.asarray(_forward(model, jnp.asarray(ids), mask)).astype(np.float32)


def _ids(batch, length, seed=0):
  return np.random.default_rng(seed).integers(0, TINY["vocab_size"], (batch, length), np.int32)


def _close(got, expected, rtol=1e-4):
  np.testing.assert_allclose(got, expected, rtol=rtol, atol=rtol * np.abs(expected).max())


def _rewrite(src, dst, edit):
  """Copies the checkpoint folder `src` to `dst` with `edit(tensors)` applied to its tensors."""
  folder = hf.SafetensorsFolder(src)
  tensors = {k: np.array(folder.read(k)) for k in folder.keys()}
  dst.mkdir()
  hf.save_safetensors(edit(tensors), dst / "model.safetensors")
  shutil.copy(src / "config.json", dst / "config.json")
  return dst


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  model = _torch_model()
  folder = tmp_path_factory.mktemp("t5")
  model.save_pretrained(folder)
  return model, folder


@pytest.fixture(scope="module")
def ours(saved):
  return t5_params.from_pretrained(saved[1])


def test_config_from_hf(saved):
  config = T5Config.from_hf_config(json.loads((saved[1] / "config.json").read_text()))
  assert config == T5Config(**{k: v for k, v in TINY.items() if k != "dropout_rate"})
  assert config.is_gated_act and config.dense_act_fn == "gelu_new"
  assert T5Config(feed_forward_proj="relu").dense_act_fn == "relu"
  with pytest.raises(ValueError, match="feed_forward_proj"):
    T5Config(feed_forward_proj="gelu-gated")


def test_relative_position_bucket_matches_torch():
  relative = np.arange(-3000, 3001)
  for buckets, distance in ((32, 128), (8, 20), (64, 256)):
    expected = T5Attention._relative_position_bucket(
      torch.from_numpy(relative), bidirectional=True, num_buckets=buckets, max_distance=distance
    ).numpy()
    np.testing.assert_array_equal(relative_position_bucket(relative, buckets, distance), expected)


def test_only_first_layer_has_position_bias(ours):
  assert hasattr(ours.encoder.block[0].layer[0].SelfAttention, "relative_attention_bias")
  assert not hasattr(ours.encoder.block[1].layer[0].SelfAttention, "relative_attention_bias")


def test_no_mask_long_sequence_matches_torch(saved, ours):
  ids = _ids(2, LONG)
  expected = _torch_forward(saved[0], ids)
  got = _ours(ours, ids)
  assert got.shape == (2, LONG, TINY["d_model"])
  _close(got, expected)


def test_padded_batch_matches_torch_on_valid_positions(saved, ours):
  ids = _ids(3, 12, seed=1)
  mask = np.ones_like(ids)
  mask[1, 7:] = 0  # right padding
  mask[2, :4] = 0  # left padding
  valid = mask.astype(bool)
  expected = _torch_forward(saved[0], ids, mask)
  got = _ours(ours, ids, mask)
  _close(got[valid], expected[valid])
  # The mask changes the result: padding is really ignored, not just tolerated.
  assert not np.allclose(_ours(ours, ids)[1, :7], got[1, :7], atol=1e-3)


def test_relu_t5_matches_torch(tmp_path):
  model = _torch_model(feed_forward_proj="relu")
  model.save_pretrained(tmp_path)
  ours = t5_params.from_pretrained(tmp_path)
  assert not ours.config.is_gated_act
  ids = _ids(2, 24, seed=2)
  _close(_ours(ours, ids), _torch_forward(model, ids))


@pytest.mark.parametrize("variant", ["embed_tokens_only", "both_tied_and_decoder"])
def test_tied_embedding_and_full_t5_keys(saved, tmp_path, variant):
  def edit(tensors):
    shared = tensors["shared.weight"]
    if variant == "embed_tokens_only":
      del tensors["shared.weight"]
    else:  # A T5ForConditionalGeneration export: encoder + decoder + lm_head.
      tensors["decoder.block.0.layer.0.SelfAttention.q.weight"] = np.zeros((32, 32), np.float32)
      tensors["lm_head.weight"] = np.zeros_like(shared)
    tensors["encoder.embed_tokens.weight"] = shared
    return tensors

  folder = _rewrite(saved[1], tmp_path / variant, edit)
  ids = _ids(2, LONG)
  _close(_ours(t5_params.from_pretrained(folder), ids), _torch_forward(saved[0], ids))


def test_missing_and_unexpected_keys_raise(saved, tmp_path):
  def edit(tensors):
    del tensors["encoder.block.1.layer.0.SelfAttention.q.weight"]
    tensors["encoder.block.1.layer.0.SelfAttention.bogus.weight"] = np.zeros(3, np.float32)
    return tensors

  folder = _rewrite(saved[1], tmp_path / "broken", edit)
  with pytest.raises(hf.LoadError) as error:
    t5_params.from_pretrained(folder)
  message = str(error.value)
  assert "encoder.block.1.layer.0.SelfAttention.q.kernel" in message
  assert "encoder.block.1.layer.0.SelfAttention.bogus.weight" in message


def test_bf16_close_to_fp32(saved, ours):
  ids = _ids(2, LONG)
  expected = _ours(ours, ids)
  model = t5_params.from_pretrained(saved[1], dtype="bfloat16")
  params = nnx.to_flat_state(nnx.state(model, nnx.Param))
  assert {v.dtype for _, v in params} == {jnp.dtype(jnp.bfloat16)}
  out = _forward(model, jnp.asarray(ids), None)
  assert out.dtype == jnp.bfloat16
  error = np.abs(np.asarray(out, np.float32) - expected).max() / np.abs(expected).max()
  assert error < BF16_TOL, error


def test_sharded_load_matches_torch(saved):
  mesh = sharding.make_mesh([("fsdp", 2), ("tensor", 4)])
  rules = sharding.resolve_rules()
  model = t5_params.from_pretrained(saved[1], mesh=mesh)
  q = model.encoder.block[0].layer[0].SelfAttention.q.kernel[...]
  assert q.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
  ids = _ids(2, LONG)
  with sharding.use_mesh(mesh, rules):
    got = _ours(model, ids)
  _close(got, _torch_forward(saved[0], ids))


def test_save_pretrained_round_trips_and_transformers_reads_it(ours, saved, tmp_path):
  t5_params.save_pretrained(ours, tmp_path, pad_token_id=0, eos_token_id=3)
  written = hf.SafetensorsFolder(tmp_path)
  original = hf.SafetensorsFolder(saved[1])
  assert written.keys() == original.keys()
  for key in written.keys():  # The same tensors as transformers' own save (torch layout).
    np.testing.assert_array_equal(written.read(key), original.read(key), err_msg=key)
  config = json.loads((tmp_path / "config.json").read_text())
  assert config["model_type"] == "t5" and config["eos_token_id"] == 3
  assert T5Config.from_hf_config(config) == ours.config
  ids = _ids(2, LONG)
  reloaded = transformers.T5EncoderModel.from_pretrained(tmp_path).eval()
  _close(_ours(t5_params.from_pretrained(tmp_path), ids), _torch_forward(saved[0], ids), 1e-5)
  _close(_torch_forward(reloaded, ids), _torch_forward(saved[0], ids), 1e-6)
