"""FLUX transformer: configs, key errors, sharding over 8 fake devices, bf16, LoRA gradients."""

import json
import re

import flux_reference as R
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from spatial_jax import hf, lora, sharding
from spatial_jax.models import attention
from spatial_jax.models.flux import FluxConfig, FluxTransformer, layers, params

NAME = "guided"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  folder = tmp_path_factory.mktemp("flux_model")
  R.torch_model(NAME).save_pretrained(folder)
  return folder


def _batch(seed=0, batch=2):
  return {k: jnp.asarray(v) for k, v in R.inputs(NAME, seed=seed, batch=batch).items()}


def _num_params(config):
  with nnx.use_eager_sharding(False):
    abstract = nnx.eval_shape(lambda: FluxTransformer(config, rngs=nnx.Rngs(0)))
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))


def test_presets_have_the_reference_sizes():
  # FLUX.1-dev: 11,901,408,320 parameters (flux.md §2); schnell lacks the guidance embedder.
  assert _num_params(FluxConfig.flux1_dev()) == 11_901_408_320
  guidance = 256 * 3072 + 3072 + 3072 * 3072 + 3072
  assert _num_params(FluxConfig.flux1_schnell()) == 11_901_408_320 - guidance
  hf_config = FluxConfig.flux1_dev().to_hf_config()
  assert FluxConfig.from_hf_config({**hf_config, "_diffusers_version": "0.42.1"}) == (
    FluxConfig.flux1_dev()
  )


def test_bad_configs_are_refused():
  with pytest.raises(ValueError, match="axes_dims_rope"):
    FluxConfig.tiny(axes_dims_rope=(4, 4, 4))
  with pytest.raises(ValueError, match="remat"):
    FluxConfig.tiny(remat="everything")


def test_missing_and_unexpected_keys_are_listed(saved, tmp_path):
  (tmp_path / "config.json").write_text((saved / "config.json").read_text())
  tensors = safetensors.numpy.load_file(saved / "diffusion_pytorch_model.safetensors")
  tensors.pop("transformer_blocks.1.attn.to_k.weight")
  tensors["transformer_blocks.0.attn.extra.weight"] = np.zeros((2, 2), np.float32)
  hf.save_safetensors(tensors, tmp_path / "diffusion_pytorch_model.safetensors")
  with pytest.raises(hf.LoadError) as err:
    params.from_pretrained(tmp_path)
  assert "transformer_blocks.attn.to_k.kernel[1]" in str(err.value)
  assert "transformer_blocks.0.attn.extra.weight" in str(err.value)


def test_wrong_shapes_are_named(saved, tmp_path):
  config = json.loads((saved / "config.json").read_text())
  (tmp_path / "config.json").write_text(json.dumps({**config, "joint_attention_dim": 48}))
  (tmp_path / "diffusion_pytorch_model.safetensors").symlink_to(
    saved / "diffusion_pytorch_model.safetensors"
  )
  with pytest.raises(hf.LoadError, match="context_embedder.weight"):
    params.from_pretrained(tmp_path)


def test_not_a_bfl_file(tmp_path):
  path = tmp_path / "model.safetensors"
  hf.save_safetensors({"x": np.zeros(2, np.float32)}, path)
  with pytest.raises(hf.LoadError, match="not a BFL FLUX checkpoint"):
    params.from_pretrained(path)


@pytest.mark.slow
def test_sharded_forward_equals_single_device(saved):
  batch = _batch(batch=4)  # Split over data x fsdp = 4.
  single = np.asarray(params.from_pretrained(saved)(**batch))
  mesh = sharding.make_mesh([("fsdp", 4), ("tensor", 2)])
  rules = sharding.resolve_rules(None)
  model = params.from_pretrained(saved, mesh=mesh)
  with sharding.use_mesh(mesh, rules):  # Adapters are born sharded like their base kernels.
    lora.apply_lora(model, rank=4, alpha=8, targets=params.DEFAULT_LORA_TARGETS, rngs=nnx.Rngs(0))
  to_q = model.transformer_blocks.attn.to_q
  assert to_q.base.kernel[...].sharding.spec == PartitionSpec(None, "fsdp", "tensor")
  a_layout = NamedSharding(mesh, PartitionSpec(None, "fsdp", None))
  assert to_q.lora_a[...].sharding.is_equivalent_to(a_layout, 3)
  b_layout = NamedSharding(mesh, PartitionSpec(None, None, "tensor"))
  assert to_q.lora_b[...].sharding.is_equivalent_to(b_layout, 3)
  ff_out = model.transformer_blocks.ff.net[2].base.kernel[...]
  assert ff_out.sharding.spec == PartitionSpec(None, "tensor", "fsdp")
  # Each device holds 1/8 of the kernel: fsdp x tensor.
  assert ff_out.addressable_shards[0].data.shape == (2, 128 // 2, 32 // 4)
  graphdef, state = nnx.split(model)
  data = sharding.data_sharding(mesh, rules, 3)
  batch = {k: jax.device_put(v, data) if v.ndim == 3 else v for k, v in batch.items()}
  with sharding.use_mesh(mesh, rules):
    out = jax.jit(lambda s, b: nnx.merge(graphdef, s)(**b))(state, batch)
  # LoRA B is zero at init: the adapted, sharded model equals the plain single-device one.
  np.testing.assert_allclose(np.asarray(out), single, rtol=1e-4, atol=1e-4 * np.abs(single).max())


@pytest.mark.slow
def test_created_sharded_with_scanned_layers():
  mesh = sharding.make_mesh([("fsdp", 4), ("tensor", 2)])
  rules = sharding.resolve_rules(None)
  config = FluxConfig.tiny(num_layers=2, num_single_layers=2)
  model = sharding.create_sharded(lambda: FluxTransformer(config, rngs=nnx.Rngs(0)), mesh, rules)
  kernel = model.single_transformer_blocks.proj_mlp.kernel[...]
  assert kernel.shape == (2, 32, 128)
  assert kernel.sharding.spec == PartitionSpec(None, "fsdp", "tensor")
  # The two stacked layers were initialised independently.
  assert not np.allclose(np.asarray(kernel[0]), np.asarray(kernel[1]))


@pytest.mark.slow
def test_bf16_forward_stays_close_to_fp32(saved):
  batch = _batch(seed=0)
  fp32 = np.asarray(params.from_pretrained(saved)(**batch))
  model = params.from_pretrained(saved, dtype="bfloat16")
  assert model.transformer_blocks.ff.net[0].proj.kernel[...].dtype == jnp.bfloat16
  out = model(**batch)
  assert out.dtype == jnp.bfloat16
  error = np.abs(np.asarray(out, np.float32) - fp32)
  # bf16 keeps 8 mantissa bits; through 2 double + 3 single blocks of random weights this
  # measured 2.9% max / 1.5% mean of the output's scale (input seeds 0-3: 0.7-2.9% / 0.6-1.6%).
  # Timesteps stay fp32 here (as BFL); diffusers rounds them to bf16 before the sinusoid.
  assert error.max() < 0.05 * np.abs(fp32).max(), error.max()
  assert error.mean() < 0.025 * np.abs(fp32).mean(), error.mean()


def _adapted(saved, **runtime):
  """The saved model with LoRA adapters whose B is non-zero, so they change the output."""
  model = params.from_pretrained(saved, **runtime)
  lora.apply_lora(model, rank=4, alpha=8, targets=params.lora_targets(True), rngs=nnx.Rngs(0))
  for layer in lora.lora_layers(model).values():
    layer.lora_b[...] = jnp.full(layer.lora_b.shape, 0.05)
  return model


def _lora_grads(model, batch):
  graphdef, trainable, rest = nnx.split(model, nnx.LoRAParam, ...)

  @jax.jit
  def grads(trainable, rest):
    def loss(trainable):
      out = nnx.merge(graphdef, trainable, rest)(**batch)
      return jnp.mean(jnp.square(out))

    return jax.grad(loss)(trainable)

  return grads(trainable, rest)


@pytest.mark.slow
@pytest.mark.parametrize("remat", ["full", "dots_saveable"])
def test_lora_gradients_scan_loop_and_remat_agree(saved, remat):
  batch = _batch(seed=5)

  scanned = _adapted(saved, scan_layers=True)
  reference = _lora_grads(scanned, batch)
  rematted = _lora_grads(_adapted(saved, scan_layers=True, remat=remat), batch)
  # The looped model gets slice i of each stacked adapter in block i.
  looped_model = _adapted(saved, scan_layers=False)
  stacked = lora.lora_layers(scanned)
  for path, layer in lora.lora_layers(looped_model).items():
    kind, index, rest = re.fullmatch(r"(\w+)\.(\d+)\.(.*)", path).groups()
    source = stacked[f"{kind}.{rest}"]
    layer.lora_a[...] = source.lora_a[...][int(index)]
    layer.lora_b[...] = source.lora_b[...][int(index)]
  looped = _lora_grads(looped_model, batch)
  flat = dict(nnx.to_flat_state(reference))
  assert len(flat) == 2 * (12 + 5)  # A and B of every adapted module: only LoRA params.
  for path, value in nnx.to_flat_state(rematted):
    expected = np.asarray(flat[path][...])
    # Recomputation reorders float sums: equal up to ~1e-5 of the gradient's scale.
    np.testing.assert_allclose(value[...], expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())
  # Slice 1 of a stacked adapter's gradient is the second block's gradient.
  np.testing.assert_allclose(
    looped["transformer_blocks"][1]["attn"]["to_q"]["lora_b"][...],
    reference["transformer_blocks"]["attn"]["to_q"]["lora_b"][...][1],
    rtol=1e-4,
    atol=1e-5
    * float(jnp.abs(reference["transformer_blocks"]["attn"]["to_q"]["lora_b"][...]).max()),
  )
  assert float(jnp.abs(flat[("transformer_blocks", "attn", "to_q", "lora_a")][...]).max()) > 0


def test_gelu_tanh_values_and_gradients():
  x = np.linspace(-6.0, 6.0, 241)
  c = np.sqrt(2 / np.pi)
  t = np.tanh(c * (x + 0.044715 * x**3))  # float64 truth
  value = 0.5 * x * (1 + t)
  slope = 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * c * (1 + 3 * 0.044715 * x * x)
  x32 = jnp.asarray(x, jnp.float32)
  ours = np.asarray(jax.vmap(jax.value_and_grad(layers.gelu_tanh))(x32))
  jax_ref = np.asarray(jax.vmap(jax.value_and_grad(lambda v: jax.nn.gelu(v, True)))(x32))
  for got in (ours, jax_ref):  # Both within fp32 rounding of the truth (1 + tanh cancels).
    np.testing.assert_allclose(got[0], value, rtol=1e-5, atol=3e-6)
    np.testing.assert_allclose(got[1], slope, rtol=1e-5, atol=3e-6)


def test_blockwise_attention_gives_the_xla_outputs_and_lora_gradients(saved, monkeypatch):
  # Tiles of 8 queries x 4 keys over the 7 + 15 tokens: several tiles, the last ones padded.
  monkeypatch.setattr(attention, "BLOCK_Q", 8)
  monkeypatch.setattr(attention, "BLOCK_K", 4)
  batch = _batch(seed=2)

  xla, blockwise = _adapted(saved), _adapted(saved, attention_impl="blockwise")
  assert blockwise.config.attention_impl == "blockwise"
  np.testing.assert_allclose(blockwise(**batch), xla(**batch), rtol=1e-5, atol=1e-5)
  expected = dict(nnx.to_flat_state(_lora_grads(xla, batch)))
  for path, value in nnx.to_flat_state(_lora_grads(blockwise, batch)):
    want = np.asarray(expected[path][...])
    np.testing.assert_allclose(value[...], want, rtol=1e-4, atol=1e-5 * np.abs(want).max())
