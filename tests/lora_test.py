"""Tests for spatial_jax.lora: scaling, targets, merge, disabled view, splitting, PEFT parity."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import safetensors.numpy
import torch
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from spatial_jax import lora

D, HIDDEN, VOCAB, N_BLOCKS = 16, 32, 8, 2
RULES = (("embed", "data"), ("heads", None), ("mlp", None), ("vocab", None), ("lora", None))
# Our toy paths <-> the torch toy's module names. `head` <-> top-level `proj_out` collides, as a
# suffix, with `transformer_blocks.{i}.ff.proj_out` (FLUX has the same pair).
NAME_MAP = [
  ("blocks.{i}.attn.{proj}", "transformer_blocks.{i}.attn.{proj}"),
  ("blocks.{i}.mlp.{proj}", "transformer_blocks.{i}.ff.{proj}"),
  ("head", "proj_out"),
]


@pytest.fixture(autouse=True)
def mesh():
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  with jax.set_mesh(mesh), nnx.logical_axis_rules(RULES):
    yield mesh


def _linear(din, dout, axes, rngs):
  init = nnx.with_partitioning(nnx.initializers.lecun_normal(), axes)
  return nnx.Linear(din, dout, kernel_init=init, rngs=rngs)


class Attn(nnx.Module):
  def __init__(self, rngs):
    self.to_q = _linear(D, D, ("embed", "heads"), rngs)
    self.to_k = _linear(D, D, ("embed", "heads"), rngs)
    self.to_out = _linear(D, D, ("heads", "embed"), rngs)


class Mlp(nnx.Module):
  def __init__(self, rngs):
    self.fc = _linear(D, HIDDEN, ("embed", "mlp"), rngs)
    self.proj_out = _linear(HIDDEN, D, ("mlp", "embed"), rngs)


class Block(nnx.Module):
  def __init__(self, rngs):
    self.attn = Attn(rngs)
    self.mlp = Mlp(rngs)


class Toy(nnx.Module):
  def __init__(self, rngs):
    self.blocks = nnx.List([Block(rngs) for _ in range(N_BLOCKS)])
    self.head = _linear(D, VOCAB, ("embed", "vocab"), rngs)

  def __call__(self, x):
    for b in self.blocks:
      x = x + b.attn.to_out(jnp.tanh(b.attn.to_q(x)) * b.attn.to_k(x))
      x = x + b.mlp.proj_out(jnp.tanh(b.mlp.fc(x)))
    return self.head(x)


class TorchToy(torch.nn.Module):
  """The same network in PyTorch, with the Hugging Face-style names of NAME_MAP."""

  def __init__(self):
    super().__init__()
    self.transformer_blocks = torch.nn.ModuleList()
    for _ in range(N_BLOCKS):
      block = torch.nn.Module()
      block.attn = torch.nn.Module()
      block.attn.to_q, block.attn.to_k, block.attn.to_out = (torch.nn.Linear(D, D) for _ in "qko")
      block.ff = torch.nn.Module()
      block.ff.fc, block.ff.proj_out = torch.nn.Linear(D, HIDDEN), torch.nn.Linear(HIDDEN, D)
      self.transformer_blocks.append(block)
    self.proj_out = torch.nn.Linear(D, VOCAB)

  def forward(self, x):
    for b in self.transformer_blocks:
      x = x + b.attn.to_out(torch.tanh(b.attn.to_q(x)) * b.attn.to_k(x))
      x = x + b.ff.proj_out(torch.tanh(b.ff.fc(x)))
    return self.proj_out(x)


def _toy(seed=0):
  return Toy(nnx.Rngs(seed))


def _x(seed=1, n=4):
  return jax.random.normal(jax.random.key(seed), (n, D))


def _randomize_b(model, seed=2):
  """Gives every B nonzero values (B starts at zero, which would hide most bugs)."""
  for i, layer in enumerate(lora.lora_layers(model).values()):
    b = layer.lora_b
    b[...] = 0.5 * jax.random.normal(jax.random.key(seed + i), b.shape)


def _linear_paths(model):
  return {".".join(map(str, p)) for p, m in nnx.iter_modules(model) if isinstance(m, nnx.Linear)}


def _close(a, b, atol=1e-5):
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=atol)


# ------------------------------------------------------------------------------------------------
# The layer.
# ------------------------------------------------------------------------------------------------


def test_lora_linear_matches_numpy_formula():
  base = _linear(D, VOCAB, ("embed", "vocab"), nnx.Rngs(0))
  layer = lora.LoRALinear(base, rank=2, alpha=6.0, rngs=nnx.Rngs(1))
  assert layer.base is base
  layer.lora_b[...] = jax.random.normal(jax.random.key(3), (2, VOCAB))
  x = np.asarray(_x())
  w, bias = np.asarray(base.kernel[...]), np.asarray(base.bias[...])
  a, b = np.asarray(layer.lora_a[...]), np.asarray(layer.lora_b[...])
  want = x @ w + bias + (x @ a @ b) * (6.0 / 2)
  _close(layer(jnp.asarray(x)), want)
  # The update is not negligible, so a wrong scale could not pass.
  assert np.abs((x @ a @ b) * 3.0).max() > 0.1


def test_init_is_peft_kaiming_uniform_and_b_zero():
  base = nnx.Linear(64, 32, rngs=nnx.Rngs(0))
  layer = lora.LoRALinear(base, rank=8, alpha=8, rngs=nnx.Rngs(1))
  a = np.asarray(layer.lora_a[...])
  bound = 1 / np.sqrt(64)  # kaiming_uniform_(a=sqrt(5)) on torch's (rank, in) weight.
  assert a.shape == (64, 8) and np.abs(a).max() <= bound
  assert np.abs(a).max() > 0.95 * bound and abs(a.std() - bound / np.sqrt(3)) < 0.01
  assert layer.lora_b.shape == (8, 32) and not np.asarray(layer.lora_b[...]).any()
  assert isinstance(layer.lora_a, nnx.LoRAParam) and isinstance(layer.lora_b, nnx.LoRAParam)


def test_computes_in_base_dtype():
  base = nnx.Linear(D, D, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  layer = lora.LoRALinear(base, rank=2, alpha=2, rngs=nnx.Rngs(1))
  assert layer(_x()).dtype == jnp.bfloat16
  assert layer.lora_a[...].dtype == jnp.float32  # Params keep the base's param dtype.


def test_adapters_stay_fp32_on_a_bf16_base_so_small_updates_land():
  base = nnx.Linear(D, D, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  layer = lora.LoRALinear(base, rank=2, alpha=2, rngs=nnx.Rngs(1))
  assert layer.lora_a[...].dtype == layer.lora_b[...].dtype == jnp.float32
  a = layer.lora_a[...]
  # A 2e-6 step (the paper's reward lr) vanishes in bf16 near |a| ~ 0.1 but not in fp32.
  assert not np.array_equal(np.asarray(a + 2e-6), np.asarray(a))
  assert np.array_equal(
    np.asarray(a.astype(jnp.bfloat16) + 2e-6), np.asarray(a.astype(jnp.bfloat16))
  )
  assert layer(_x()).dtype == jnp.bfloat16


def test_adapter_sharding_follows_base_axes(mesh):
  model = _toy()
  lora.apply_lora(model, rank=4, alpha=4, targets=["blocks.0.attn.to_q"], rngs=nnx.Rngs(1))
  layer = model.blocks[0].attn.to_q
  assert layer.lora_a.get_metadata()["out_sharding"] == ("embed", "lora")
  assert layer.lora_b.get_metadata()["out_sharding"] == ("lora", "heads")
  specs = nnx.get_partition_spec(nnx.state(layer, nnx.LoRAParam))
  assert specs["lora_a"].get_value() == P("data", None)
  assert specs["lora_b"].get_value() == P(None, None)
  # Eager sharding placed the values accordingly.
  assert layer.lora_a[...].sharding.is_equivalent_to(NamedSharding(mesh, P("data", None)), 2)


def test_adapters_follow_base_eager_sharding_flag():
  with nnx.use_eager_sharding(False):
    base = _linear(D, D, ("embed", "heads"), nnx.Rngs(0))
  # Wrapped with eager sharding on: the adapters still follow the base and are not placed.
  layer = lora.LoRALinear(base, rank=2, alpha=2, rngs=nnx.Rngs(1))
  assert layer.lora_a.get_metadata()["out_sharding"] == ("embed", "lora")
  assert layer.lora_a.get_metadata()["eager_sharding"] is False
  assert layer.lora_a[...].sharding.spec == P()  # Eager sharding would give P("data", None).
  plain = lora.LoRALinear(nnx.Linear(D, D, rngs=nnx.Rngs(0)), rank=2, alpha=2, rngs=nnx.Rngs(1))
  assert not plain.lora_a.get_metadata().get("out_sharding")


# ------------------------------------------------------------------------------------------------
# apply_lora, disabled, merge, splitting.
# ------------------------------------------------------------------------------------------------


def test_apply_lora_matches_exact_paths():
  model = _toy()
  q0 = model.blocks[0].attn.to_q
  matched = lora.apply_lora(
    model, rank=4, alpha=8, targets=[r"blocks\.\d+\.attn\.to_(q|k)", "head"], rngs=nnx.Rngs(1)
  )
  assert matched == [
    "blocks.0.attn.to_k",
    "blocks.0.attn.to_q",
    "blocks.1.attn.to_k",
    "blocks.1.attn.to_q",
    "head",
  ]
  assert list(lora.lora_layers(model)) == matched
  assert model.blocks[0].attn.to_q.base is q0  # The same module, not a copy.
  assert isinstance(model.blocks[0].attn.to_out, nnx.Linear)  # fullmatch: `to_out` is untouched.
  assert model(_x()).shape == (4, VOCAB)
  with pytest.raises(ValueError, match="already applied"):
    lora.apply_lora(model, rank=4, alpha=8, targets=["head"], rngs=nnx.Rngs(1))


def test_apply_lora_reports_unmatched_patterns():
  model = _toy()
  with pytest.raises(ValueError, match=r"\['to_q'\].*blocks\.0\.attn\.to_q"):
    lora.apply_lora(model, rank=4, alpha=8, targets=["head", "to_q"], rngs=nnx.Rngs(1))
  assert not lora.lora_layers(model)  # Nothing was changed before the error.


def test_disabled_gives_base_outputs_and_restores():
  model, x = _toy(), _x()
  y_base = model(x)
  lora.apply_lora(model, rank=4, alpha=8, targets=[r".*attn\.to_q", "head"], rngs=nnx.Rngs(1))
  _randomize_b(model)
  y_lora = model(x)
  assert np.abs(np.asarray(y_lora - y_base)).max() > 1e-2
  with lora.disabled(model):
    _close(model(x), y_base)
  assert all(layer.enabled for layer in lora.lora_layers(model).values())
  _close(model(x), y_lora)
  with pytest.raises(RuntimeError), lora.disabled(model):
    raise RuntimeError
  _close(model(x), y_lora)


def test_disabled_inside_jit_on_merged_and_captured_model():
  model, x = _toy(), _x()
  y_base = model(x)
  lora.apply_lora(model, rank=4, alpha=8, targets=[r".*"], rngs=nnx.Rngs(1))
  _randomize_b(model)
  graphdef, state = nnx.split(model)

  @jax.jit
  def policy_and_reference(state, x):
    m = nnx.merge(graphdef, state)
    y = m(x)
    with lora.disabled(m):
      return y, m(x)

  y, y_ref = policy_and_reference(state, x)
  _close(y, model(x))
  _close(y_ref, y_base)

  @jax.jit
  def reference_of_captured(x):  # NNX forbids normal mutation of a captured module here.
    with lora.disabled(model):
      return model(x)

  _close(reference_of_captured(x), y_base)
  assert all(layer.enabled for layer in lora.lora_layers(model).values())


def test_merge_equals_unmerged():
  model, x = _toy(), _x()
  paths_before = _linear_paths(model)
  lora.apply_lora(model, rank=4, alpha=2, targets=[r"blocks\.1\..*", "head"], rngs=nnx.Rngs(1))
  _randomize_b(model)
  y = model(x)
  head = model.head
  want_kernel = np.asarray(head.base.kernel[...]) + 0.5 * np.asarray(head.lora_a[...]) @ np.asarray(
    head.lora_b[...]
  )
  merged = lora.merge(model)
  assert merged is model and not lora.lora_layers(model)
  assert model.head is head.base and _linear_paths(model) == paths_before
  _close(model.head.kernel[...], want_kernel)
  _close(model(x), y)
  assert not nnx.state(model, nnx.LoRAParam)


def test_split_selects_exactly_the_adapters():
  model = _toy()
  matched = lora.apply_lora(model, rank=4, alpha=8, targets=[r".*mlp\.fc"], rngs=nnx.Rngs(1))
  want = {f"{p}.lora_{ab}" for p in matched for ab in "ab"}
  _, trainable, frozen = nnx.split(model, lora.trainable_filter, ...)

  def paths(state):
    return {".".join(map(str, p)) for p, _ in nnx.to_flat_state(state)}

  assert paths(trainable) == want
  assert paths(nnx.state(model, nnx.LoRAParam)) == want
  assert not paths(frozen) & want
  assert "blocks.0.mlp.fc.base.kernel" in paths(frozen)


def test_jitted_functional_step_changes_only_adapters():
  model, x = _toy(), _x()
  lora.apply_lora(model, rank=4, alpha=8, targets=[r".*attn\.to_[qk]"], rngs=nnx.Rngs(1))
  graphdef, trainable, frozen = nnx.split(model, nnx.LoRAParam, ...)
  frozen_before = jax.tree.map(np.asarray, frozen)
  target = jnp.ones((x.shape[0], VOCAB))

  @jax.jit
  def step(trainable, frozen, x):
    def loss_fn(trainable):
      m = nnx.merge(graphdef, trainable, frozen)
      return jnp.mean((m(x) - target) ** 2)

    loss, grads = jax.value_and_grad(loss_fn)(trainable)
    return jax.tree.map(lambda p, g: p - 0.1 * g, trainable, grads), loss

  new, loss0 = step(trainable, frozen, x)
  new, loss1 = step(new, frozen, x)  # Step 2: A gets gradients once B is nonzero.
  assert float(loss1) < float(loss0)
  for (path, old), (_, upd) in zip(
    nnx.to_flat_state(trainable), nnx.to_flat_state(new), strict=True
  ):
    assert np.abs(np.asarray(upd[...]) - np.asarray(old[...])).max() > 1e-6, path
  nnx.update(model, new)
  for (path, a), (_, b) in zip(
    nnx.to_flat_state(frozen_before),
    nnx.to_flat_state(nnx.state(model, nnx.Not(nnx.LoRAParam))),
    strict=True,
  ):
    np.testing.assert_array_equal(a[...], np.asarray(b[...]), err_msg=str(path))


# ------------------------------------------------------------------------------------------------
# PEFT adapter I/O.
# ------------------------------------------------------------------------------------------------

TARGETS = [r"blocks\.\d+\.attn\.to_[qk]", "head"]


def test_hf_name():
  assert lora.hf_name("blocks.3.attn.to_q", NAME_MAP) == "transformer_blocks.3.attn.to_q"
  assert lora.hf_name("blocks.3.mlp.fc", NAME_MAP) == "transformer_blocks.3.ff.fc"
  assert lora.hf_name("head", NAME_MAP) == "proj_out"
  assert lora.hf_name("head", None) == "head"
  with pytest.raises(ValueError, match="blocks.0.norm"):
    lora.hf_name("blocks.0.norm", NAME_MAP)


def test_peft_export_import_round_trip(tmp_path):
  model, x = _toy(), _x()
  lora.apply_lora(model, rank=4, alpha=8, targets=TARGETS, rngs=nnx.Rngs(1))
  _randomize_b(model)
  lora.export_peft(model, tmp_path, name_map=NAME_MAP, base_model_name_or_path="toy")
  config = json.loads((tmp_path / "adapter_config.json").read_text())
  assert (config["r"], config["lora_alpha"], config["peft_type"]) == (4, 8, "LORA")
  assert config["base_model_name_or_path"] == "toy"
  tensors = safetensors.numpy.load_file(tmp_path / "adapter_model.safetensors")
  assert len(tensors) == 2 * 5
  q0 = model.blocks[0].attn.to_q
  key = "base_model.model.transformer_blocks.0.attn.to_q"
  np.testing.assert_array_equal(tensors[f"{key}.lora_A.weight"], np.asarray(q0.lora_a[...]).T)
  np.testing.assert_array_equal(tensors[f"{key}.lora_B.weight"], np.asarray(q0.lora_b[...]).T)
  assert tensors["base_model.model.proj_out.lora_B.weight"].shape == (VOCAB, 4)

  other = _toy()  # Same base weights, fresh adapters.
  lora.apply_lora(other, rank=4, alpha=8, targets=TARGETS, rngs=nnx.Rngs(7))
  lora.import_peft(other, tmp_path, name_map=NAME_MAP)
  _close(other(x), model(x))
  a = other.head.lora_a[...]
  assert a.sharding.is_equivalent_to(model.head.lora_a[...].sharding, 2)


def test_diffusers_style_prefix(tmp_path):
  model = _toy()
  lora.apply_lora(model, rank=2, alpha=2, targets=["head"], rngs=nnx.Rngs(1))
  name = "pytorch_lora_weights.safetensors"
  lora.export_peft(model, tmp_path, name_map=NAME_MAP, key_prefix="transformer.", weights_name=name)
  keys = set(safetensors.numpy.load_file(tmp_path / name))
  assert keys == {"transformer.proj_out.lora_A.weight", "transformer.proj_out.lora_B.weight"}
  lora.import_peft(model, tmp_path, name_map=NAME_MAP, key_prefix="transformer.", weights_name=name)


def test_import_errors_name_the_problem(tmp_path):
  model = _toy()
  lora.apply_lora(model, rank=4, alpha=8, targets=TARGETS, rngs=nnx.Rngs(1))
  lora.export_peft(model, tmp_path, name_map=NAME_MAP)
  weights = str(tmp_path / "adapter_model.safetensors")

  fewer = _toy()
  lora.apply_lora(fewer, rank=4, alpha=8, targets=["head", r".*mlp\.fc"], rngs=nnx.Rngs(1))
  with pytest.raises(ValueError, match="adapter_model.safetensors") as err:
    lora.import_peft(fewer, tmp_path, name_map=NAME_MAP)
  assert "missing keys: ['base_model.model.transformer_blocks.0.ff.fc.lora_A.weight'" in str(
    err.value
  )
  assert "unexpected keys: ['base_model.model.transformer_blocks.0.attn.to_k.lora_A" in str(
    err.value
  )

  other_rank = _toy()
  lora.apply_lora(other_rank, rank=2, alpha=8, targets=TARGETS, rngs=nnx.Rngs(1))
  with pytest.raises(ValueError, match=r"adapter_config.json: r=4, lora_alpha=8.*rank=2"):
    lora.import_peft(other_rank, tmp_path, name_map=NAME_MAP)

  tensors = safetensors.numpy.load_file(weights)
  tensors["base_model.model.proj_out.lora_B.weight"] = np.zeros((VOCAB + 1, 4), np.float32)
  safetensors.numpy.save_file(tensors, weights)
  with pytest.raises(ValueError, match=r"proj_out.lora_B.weight: file \(9, 4\), model \(8, 4\)"):
    lora.import_peft(model, tmp_path, name_map=NAME_MAP)

  config = json.loads((tmp_path / "adapter_config.json").read_text())
  (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
  with pytest.raises(ValueError, match="use_dora"):
    lora.import_peft(model, tmp_path, name_map=NAME_MAP)
  with pytest.raises(ValueError, match="not found"):
    lora.import_peft(model, tmp_path / "nope", name_map=NAME_MAP)


def _copy_torch_weights(torch_model, model):
  """Loads the torch toy's base weights into our toy (kernel = weight.T)."""
  for path, m in nnx.iter_modules(model):
    if isinstance(m, nnx.Linear):
      t = torch_model.get_submodule(lora.hf_name(".".join(map(str, path)), NAME_MAP))
      m.kernel[...] = jnp.asarray(t.weight.detach().numpy().T)
      m.bias[...] = jnp.asarray(t.bias.detach().numpy())


def _torch_toy():
  torch.manual_seed(0)
  return TorchToy()


def test_peft_to_ours_parity(tmp_path):
  torch_model = _torch_toy()
  model = _toy(seed=5)
  _copy_torch_weights(torch_model, model)
  config = peft.LoraConfig(r=4, lora_alpha=12, target_modules=["to_q", "to_k", "fc"])
  peft_model = peft.get_peft_model(torch_model, config)
  with torch.no_grad():
    for name, p in peft_model.named_parameters():
      if "lora_B" in name:
        p.normal_(0, 0.5)
  peft_model.save_pretrained(tmp_path)
  lora.apply_lora(
    model, rank=4, alpha=12, targets=[r"blocks\.\d+\.(attn\.to_[qk]|mlp\.fc)"], rngs=nnx.Rngs(1)
  )
  lora.import_peft(model, tmp_path, name_map=NAME_MAP)
  x = np.random.default_rng(0).normal(size=(4, D)).astype(np.float32)
  with torch.no_grad():
    want = peft_model(torch.from_numpy(x)).numpy()
  _close(model(jnp.asarray(x)), want)
  with lora.disabled(model), peft_model.disable_adapter(), torch.no_grad():
    _close(model(jnp.asarray(x)), peft_model(torch.from_numpy(x)).numpy())


def test_ours_to_peft_parity(tmp_path):
  torch_model = _torch_toy()
  model = _toy(seed=5)
  _copy_torch_weights(torch_model, model)
  lora.apply_lora(model, rank=4, alpha=12, targets=TARGETS, rngs=nnx.Rngs(1))
  _randomize_b(model)
  lora.export_peft(model, tmp_path, name_map=NAME_MAP)
  peft_model = peft.PeftModel.from_pretrained(torch_model, str(tmp_path))
  adapted = {
    n.removeprefix("base_model.model.")
    for n, m in peft_model.named_modules()
    if isinstance(m, peft.tuners.lora.LoraLayer)
  }
  # Exactly our modules: the top-level proj_out, not transformer_blocks.*.ff.proj_out.
  assert adapted == {lora.hf_name(p, NAME_MAP) for p in lora.lora_layers(model)}
  x = np.random.default_rng(0).normal(size=(4, D)).astype(np.float32)
  with torch.no_grad():
    want = peft_model(torch.from_numpy(x)).numpy()
  _close(model(jnp.asarray(x)), want)


def test_damaged_adapter_file_is_named(tmp_path):
  # A LoRA file cut short (a copy interrupted, a full disk) names itself; nothing is rewritten.
  weights = {"transformer.x.lora_A.weight": np.ones((2, 4), np.float32)}
  path = tmp_path / "pytorch_lora_weights.safetensors"
  safetensors.numpy.save_file(weights, str(path))
  damaged = path.read_bytes()[:40]
  path.write_bytes(damaged)
  with pytest.raises(ValueError, match="pytorch_lora_weights.safetensors is not a readable"):
    lora.read_adapter_config(tmp_path, diffusers_component="transformer")
  assert path.read_bytes() == damaged
