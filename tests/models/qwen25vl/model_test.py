"""Whole-model parity with transformers' Qwen2_5_VLForConditionalGeneration, loading, sharding."""

import dataclasses
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import qwen_reference as R
import torch
from flax import nnx
from jax.sharding import PartitionSpec
from safetensors.torch import load_file, save_file

from spatial_jax import hf, lora, sharding
from spatial_jax.models import attention
from spatial_jax.models.qwen25vl import (
  DEFAULT_LORA_TARGETS,
  Qwen25VLConfig,
  Qwen25VLModel,
  params,
  prepare_inputs,
)

# Config A: the tiny preset (merge 2, ragged 2x2 windows, block 1 full attention, GQA 4/2).
# Config B: merge 1, patch 2, 3x3-patch windows, block 0 full, 3 blocks, MHA, 3 layers.
CONFIGS = {
  "merge2": dict(hf=dict(), grids=[[1, 8, 10], [1, 6, 6], [1, 4, 6]], patch_dim=96, merge=2),
  "merge1": dict(
    hf=dict(merge=1, patch=2, window=6, fullatt=(0,), depth=3, kv_heads=4, text_layers=3),
    grids=[[1, 7, 5], [1, 3, 8], [1, 4, 4]],
    patch_dim=24,
    merge=1,
  ),
}


def _batch(case, padding):
  spec = CONFIGS[case]
  return R.batch(
    spec["grids"], [[0], [1, 2]], patch_dim=spec["patch_dim"], merge=spec["merge"], padding=padding
  )


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """(reference model, folder) per (config, naming, shards, tie)."""
  cache = {}

  def get(case, *, naming="hub", shards=1, tie=True):
    key = (case, naming, shards, tie)
    if key not in cache:
      model = R.build(R.hf_config(tie=tie, **CONFIGS[case]["hf"]))
      folder = tmp_path_factory.mktemp("qwen") / "_".join(map(str, key))
      cache[key] = (model, R.save(model, str(folder), naming=naming, shards=shards))
    return cache[key]

  return get


def _assert_close_on_valid(ours, ref, mask, rtol=1e-4, atol=1e-5):
  """rtol 1e-4, plus an absolute floor of `atol` times the output's scale (for values near 0)."""
  valid = mask.astype(bool)
  scale = max(1.0, float(np.abs(ref[valid]).max()))
  np.testing.assert_allclose(np.asarray(ours)[valid], ref[valid], rtol=rtol, atol=atol * scale)


@pytest.mark.parametrize(
  "case, naming, shards, tie, padding",
  [
    ("merge2", "hub", 1, True, "left"),
    ("merge2", "v5", 3, False, "right"),
    ("merge1", "v5", 1, False, "left"),
    ("merge1", "hub", 2, True, "right"),
  ],
)
@pytest.mark.slow
def test_parity_with_transformers(saved, case, naming, shards, tie, padding):
  reference, folder = saved(case, naming=naming, shards=shards, tie=tie)
  ids, mask, pixels, grid = _batch(case, padding)
  ref_logits, ref_hidden = R.run(reference, ids, mask, pixels, grid)
  model = params.from_pretrained(folder)
  assert model.config.text.tie_word_embeddings == tie
  out = model(ids, mask, pixels, grid)
  _assert_close_on_valid(out.last_hidden_state, ref_hidden, mask)
  _assert_close_on_valid(out.logits, ref_logits, mask)
  # The comparison is sensitive to the 3D positions: 1D ones change the reference a lot.
  with torch.no_grad():
    flat = reference.model(
      input_ids=torch.from_numpy(ids),
      attention_mask=torch.from_numpy(mask),
      pixel_values=torch.from_numpy(pixels),
      image_grid_thw=torch.from_numpy(grid),
    ).last_hidden_state.numpy()
  assert np.abs(flat - ref_hidden)[mask.astype(bool)].max() > 1e-2


def test_text_only_parity(saved):
  reference, folder = saved("merge2")
  ids, mask, _, _ = R.batch([], [[], []], patch_dim=96, merge=2, padding="right")
  ref_logits, _ = R.run(reference, ids, mask, None, None)
  out = params.from_pretrained(folder)(ids, mask)
  _assert_close_on_valid(out.logits, ref_logits, mask)


@pytest.mark.slow
def test_jitted_forward_on_prepared_inputs_equals_eager(saved):
  _, folder = saved("merge2")
  model = params.from_pretrained(folder)
  ids, mask, pixels, grid = _batch("merge2", "left")
  inputs = prepare_inputs(model.config, ids, mask, pixels, grid)
  graphdef, state = nnx.split(model)
  jitted = jax.jit(lambda s, x: nnx.merge(graphdef, s).forward(x).logits)(state, inputs)
  eager = np.asarray(model.forward(inputs).logits)
  _assert_close_on_valid(jitted, eager, np.ones(eager.shape[:2]), rtol=1e-5, atol=1e-6)


def test_missing_and_unexpected_keys_are_listed(saved, tmp_path):
  _, folder = saved("merge2")
  state = load_file(os.path.join(folder, "model.safetensors"))
  state.pop("model.layers.1.mlp.up_proj.weight")
  state["visual.blocks.0.attn.extra.weight"] = torch.zeros(2)
  save_file(state, tmp_path / "model.safetensors")
  (tmp_path / "config.json").write_text(open(os.path.join(folder, "config.json")).read())
  with pytest.raises(hf.LoadError) as error:
    params.from_pretrained(tmp_path)
  message = str(error.value)
  assert "language_model.layers.1.mlp.up_proj.kernel" in message
  assert "visual.blocks.0.attn.extra.weight" in message


def test_wrong_model_type_is_refused(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
  with pytest.raises(ValueError, match="model_type='llama'"):
    params.from_pretrained(tmp_path)


def test_sharded_forward_equals_single_device(saved):
  _, folder = saved("merge2", tie=False)
  ids, mask, pixels, grid = _batch("merge2", "left")
  single = params.from_pretrained(folder)(ids, mask, pixels, grid)
  mesh = sharding.make_mesh([("fsdp", 4), ("tensor", 2)])
  rules = sharding.resolve_rules(None)
  model = params.from_pretrained(folder, mesh=mesh)
  q_kernel = model.language_model.layers[0].self_attn.q_proj.kernel[...]
  assert q_kernel.sharding.spec == PartitionSpec("fsdp", "tensor")
  assert model.lm_head.kernel[...].sharding.spec == PartitionSpec("fsdp", "tensor")
  inputs = prepare_inputs(model.config, ids, mask, pixels, grid)
  graphdef, state = nnx.split(model)
  with sharding.use_mesh(mesh, rules):
    logits = jax.jit(lambda s, x: nnx.merge(graphdef, s).forward(x).logits)(state, inputs)
  _assert_close_on_valid(logits, np.asarray(single.logits), mask, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_bf16_forward_stays_close_to_fp32(saved):
  _, folder = saved("merge2")
  ids, mask, pixels, grid = _batch("merge2", "left")
  fp32 = np.asarray(params.from_pretrained(folder)(ids, mask, pixels, grid).last_hidden_state)
  model = params.from_pretrained(folder, dtype="bfloat16")
  assert model.language_model.layers[0].mlp.up_proj.kernel[...].dtype == jnp.bfloat16
  bf16 = model(ids, mask, pixels, grid).last_hidden_state
  assert bf16.dtype == jnp.bfloat16
  valid = mask.astype(bool)
  error = np.abs(np.asarray(bf16, np.float32) - fp32)[valid]
  # bf16 keeps 8 mantissa bits (0.4% per rounding); through the ViT, the merger and 2 decoder
  # layers this measured 1.4% mean / 2.4% max of the activations' scale.
  assert error.max() < 0.04 * np.abs(fp32[valid]).max(), error.max()
  assert error.mean() < 0.025 * np.abs(fp32[valid]).mean(), error.mean()


@pytest.mark.slow
def test_peft_adapter_from_pytorch_gives_pytorch_outputs(saved, tmp_path):
  reference, folder = saved("merge2", tie=False)
  targets = r".*language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"
  peft_model = peft.get_peft_model(
    R.build(reference.config), peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets)
  )
  peft_model.base_model.model.load_state_dict(reference.state_dict(), strict=False)
  torch.manual_seed(1)
  with torch.no_grad():
    for name, p in peft_model.named_parameters():
      if "lora_B" in name:
        p.normal_(0.0, 0.3)
  peft_model.save_pretrained(tmp_path)
  ids, mask, pixels, grid = _batch("merge2", "left")
  ref_logits, _ = R.run(peft_model.base_model.model, ids, mask, pixels, grid)
  base_logits, _ = R.run(reference, ids, mask, pixels, grid)
  assert np.abs(ref_logits - base_logits).max() > 1e-2  # The adapter matters.

  model = params.from_pretrained(folder)
  adapted = params.load_peft_adapter(model, tmp_path)
  assert len(adapted) == 2 * 7
  assert all(any(re.fullmatch(t, p) for t in DEFAULT_LORA_TARGETS) for p in adapted)
  _assert_close_on_valid(model(ids, mask, pixels, grid).logits, ref_logits, mask)
  with lora.disabled(model):
    _assert_close_on_valid(model(ids, mask, pixels, grid).logits, base_logits, mask)


@pytest.mark.slow
def test_default_lora_targets_and_logical_names():
  with nnx.use_eager_sharding(False):
    model = Qwen25VLModel(Qwen25VLConfig.tiny(), rngs=nnx.Rngs(0))
    matched = lora.apply_lora(
      model, rank=2, alpha=4, targets=DEFAULT_LORA_TARGETS, rngs=nnx.Rngs(1)
    )
  assert len(matched) == 2 * 7 and all(p.startswith("language_model.layers.") for p in matched)
  # Every parameter, adapters included, carries logical axis names.
  for path, variable in nnx.to_flat_state(nnx.state(model)):
    assert sharding.variable_names(variable) is not None, path


def test_initializer_range_sets_the_init_std_and_is_read_from_hf():
  hf = R.hf_config(tie=False).to_dict()
  hf["vision_config"]["initializer_range"] = 0.3
  hf.setdefault("text_config", {})["initializer_range"] = 0.05
  hf["initializer_range"] = 0.05  # transformers 4.x keeps text fields at the top level.
  config = Qwen25VLConfig.from_hf_config(hf)
  assert (config.vision.initializer_range, config.text.initializer_range) == (0.3, 0.05)

  tiny = Qwen25VLConfig.tiny()
  config = tiny.replace(
    # Wide enough for each kernel's sample std to be within a few percent of the init std.
    vision=dataclasses.replace(tiny.vision, hidden_size=64, initializer_range=0.3),
    text=dataclasses.replace(tiny.text, tie_word_embeddings=False, initializer_range=0.1),
  )
  with nnx.use_eager_sharding(False):
    model = Qwen25VLModel(config, rngs=nnx.Rngs(0))
  vision, text = model.visual, model.language_model
  for name, param, want in [
    ("patch_embed", vision.patch_embed.proj.kernel, 0.3),
    ("vision_qkv", vision.blocks[0].attn.qkv.kernel, 0.3),
    ("vision_mlp", vision.blocks[0].mlp.up_proj.kernel, 0.3),
    ("merger", vision.merger.mlp_0.kernel, 0.3),
    ("text_q", text.layers[0].self_attn.q_proj.kernel, 0.1),
    ("text_mlp", text.layers[0].mlp.down_proj.kernel, 0.1),
    ("embed", text.embed_tokens.embedding, 0.1),
    ("lm_head", model.lm_head.kernel, 0.1),
  ]:
    np.testing.assert_allclose(float(param[...].std()), want, rtol=0.1, err_msg=name)


@pytest.mark.parametrize("implementation", ["xla", "einsum", "blockwise"])
def test_attention_implementations_give_the_eager_logits(saved, implementation, monkeypatch):
  # Tiles of 8 x 8 tokens: the padded text sequence and the vision windows span several.
  monkeypatch.setattr(attention, "BLOCK_Q", 8)
  monkeypatch.setattr(attention, "BLOCK_K", 8)
  _, folder = saved("merge2")
  ids, mask, pixels, grid = _batch("merge2", "left")
  eager = params.from_pretrained(folder)(ids, mask, pixels, grid)
  model = params.from_pretrained(folder, attention_impl=implementation)
  assert model.config.attention_impl == implementation
  out = model(ids, mask, pixels, grid)
  _assert_close_on_valid(out.logits, np.asarray(eager.logits), mask, rtol=1e-5, atol=1e-5)
