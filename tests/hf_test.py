"""Tests for spatial_jax.hf: safetensors folders, key maps, sharded loading."""

import json
import os

import jax
import ml_dtypes
import numpy as np
import pytest
import safetensors.torch
import torch
from flax import nnx
from huggingface_hub import save_torch_state_dict
from jax.sharding import PartitionSpec as P
from torch import nn

from spatial_jax import hf
from spatial_jax import sharding as sharding_lib

VOCAB, DIM, HIDDEN = 32, 8, 16


class TorchBlock(nn.Module):
  def __init__(self):
    super().__init__()
    self.norm = nn.LayerNorm(DIM)
    self.fc = nn.Linear(DIM, HIDDEN)


class TorchRotary(nn.Module):
  def __init__(self):
    super().__init__()
    self.register_buffer("inv_freq", torch.arange(4, dtype=torch.float32))


class TorchNet(nn.Module):
  """The HF side: `embed`, `layers.{i}.{norm,fc}`, `head`, a rotary buffer."""

  def __init__(self):
    super().__init__()
    self.embed = nn.Embedding(VOCAB, DIM)
    self.layers = nn.ModuleList([TorchBlock() for _ in range(2)])
    self.head = nn.Linear(DIM, VOCAB, bias=False)
    self.rotary = TorchRotary()


def _init(names):
  return nnx.with_partitioning(nnx.initializers.lecun_normal(), names)


class Block(nnx.Module):
  def __init__(self, dtype, *, rngs):
    self.ln = nnx.LayerNorm(DIM, param_dtype=dtype, rngs=rngs)
    self.mlp = nnx.Linear(
      DIM, HIDDEN, kernel_init=_init(("embed", "mlp")), param_dtype=dtype, rngs=rngs
    )


class Net(nnx.Module):
  """Our twin: other names, (in, out) kernels."""

  def __init__(self, dtype=jax.numpy.float32, *, rngs):
    self.tok = nnx.Embed(
      VOCAB, DIM, embedding_init=_init(("vocab", "embed")), param_dtype=dtype, rngs=rngs
    )
    self.blocks = nnx.List([Block(dtype, rngs=rngs) for _ in range(2)])
    self.lm_head = nnx.Linear(
      DIM,
      VOCAB,
      use_bias=False,
      kernel_init=_init(("embed", "vocab")),
      param_dtype=dtype,
      rngs=rngs,
    )


class StackedNet(nnx.Module):
  """A scanned-layers twin: one (layers, in, out) kernel for all blocks."""

  def __init__(self, *, rngs):
    init = _init(("layers", "embed", "mlp"))
    self.fc = nnx.Param(init(rngs.params(), (2, DIM, HIDDEN)))


RULES = [
  hf.KeyRule(r"embed\.weight", "tok.embedding"),
  hf.KeyRule(r"layers\.(\d+)\.norm\.weight", r"blocks.\1.ln.scale"),
  hf.KeyRule(r"layers\.(\d+)\.norm\.bias", r"blocks.\1.ln.bias"),
  hf.KeyRule(r"layers\.(?P<i>\d+)\.fc\.weight", r"blocks.\g<i>.mlp.kernel", hf.transpose()),
  hf.KeyRule(r"layers\.(\d+)\.fc\.bias", r"blocks.\1.mlp.bias"),
  hf.KeyRule(r"head\.weight", "lm_head.kernel", hf.transpose()),
  hf.ignore(r"rotary\.inv_freq"),
]


def _abstract(dtype=jax.numpy.float32):
  with nnx.use_eager_sharding(False):
    return nnx.eval_shape(lambda: Net(dtype, rngs=nnx.Rngs(0)))


def _expected(sd):
  """Our path -> the value the loaded model must hold."""
  sd = {k: v.float().numpy() for k, v in sd.items()}
  out = {"tok.embedding": sd["embed.weight"], "lm_head.kernel": sd["embed.weight"].T}
  if "head.weight" in sd:
    out["lm_head.kernel"] = sd["head.weight"].T
  for i in range(2):
    out[f"blocks.{i}.ln.scale"] = sd[f"layers.{i}.norm.weight"]
    out[f"blocks.{i}.ln.bias"] = sd[f"layers.{i}.norm.bias"]
    out[f"blocks.{i}.mlp.kernel"] = sd[f"layers.{i}.fc.weight"].T
    out[f"blocks.{i}.mlp.bias"] = sd[f"layers.{i}.fc.bias"]
  return out


def _flat(model):
  return {".".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(nnx.state(model))}


def _assert_values(model, sd, dtype=np.float32):
  got = _flat(model)
  expected = _expected(sd)
  assert sorted(got) == sorted(expected)
  for path, want in expected.items():
    assert got[path].dtype == dtype, path
    np.testing.assert_array_equal(np.asarray(got[path], np.float32), want, err_msg=path)


@pytest.fixture(scope="module")
def torch_net():
  torch.manual_seed(0)
  net = TorchNet()
  with torch.no_grad():  # non-trivial LayerNorm params
    for block in net.layers:
      block.norm.weight.uniform_(0.5, 1.5)
      block.norm.bias.uniform_(-0.5, 0.5)
  return net


@pytest.fixture(scope="module")
def single(tmp_path_factory, torch_net):
  folder = tmp_path_factory.mktemp("single")
  safetensors.torch.save_file(
    torch_net.state_dict(), folder / "model.safetensors", {"format": "pt"}
  )
  (folder / "config.json").write_text(json.dumps({"hidden_size": DIM}))
  return folder


@pytest.fixture(scope="module")
def sharded(tmp_path_factory, torch_net):
  folder = tmp_path_factory.mktemp("sharded")
  # ~1 KB shards: the embedding and the head each take their own.
  save_torch_state_dict(torch_net.state_dict(), folder, max_shard_size=1200)
  return folder


def test_folder_lists_keys_without_reading(single, sharded, torch_net):
  sd = torch_net.state_dict()
  index_name = "model.safetensors.index.json"
  index = json.loads((sharded / index_name).read_text())
  assert len(set(index["weight_map"].values())) >= 3
  for folder in (single, sharded, single / "model.safetensors", sharded / index_name):
    ckpt = hf.SafetensorsFolder(folder)
    assert ckpt.keys() == sorted(sd)
    info = ckpt.info("layers.1.fc.weight")
    assert info.shape == (HIDDEN, DIM) and info.dtype == np.float32
    np.testing.assert_array_equal(ckpt.read("embed.weight"), sd["embed.weight"].numpy())
  assert hf.SafetensorsFolder(single).metadata == {"format": "pt"}
  assert "head.weight" in ckpt and len(ckpt) == len(sd)
  with pytest.raises(KeyError, match="nope"):
    ckpt.read("nope")


def test_read_config(single, tmp_path):
  assert hf.read_config(single) == {"hidden_size": DIM}
  with pytest.raises(FileNotFoundError, match=r"No model_index\.json in .*'model\.safetensors'"):
    hf.read_config(single, "model_index.json")
  (tmp_path / "config.json").write_text("{oops")
  with pytest.raises(ValueError, match="config.json is not valid JSON"):
    hf.read_config(tmp_path)


def test_folder_errors(sharded, tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    hf.SafetensorsFolder(tmp_path / "nowhere")
  (tmp_path / "config.json").write_text("{}")
  with pytest.raises(FileNotFoundError, match=r"No safetensors weights .*config\.json"):
    hf.SafetensorsFolder(tmp_path)
  # An index naming a shard that is not there: the error names the file.
  index = json.loads((sharded / "model.safetensors.index.json").read_text())
  shard = sorted(set(index["weight_map"].values()))[-1]
  broken = tmp_path / "broken"
  broken.mkdir()
  (broken / "model.safetensors.index.json").write_text(json.dumps(index))
  for name in set(index["weight_map"].values()) - {shard}:
    os.symlink(sharded / name, broken / name)
  with pytest.raises(FileNotFoundError, match=shard):
    hf.SafetensorsFolder(broken)


def test_map_keys_first_rule_wins_and_reports_unmatched():
  rules = [hf.ignore(r".*\.inv_freq"), hf.KeyRule(r"a\.(\d+)\.w", r"b.\1.k"), hf.KeyRule(".*", "x")]
  mapped, unexpected = hf.map_keys(["a.3.w", "r.inv_freq"], rules)
  assert mapped == {"b.3.k": hf.Source("a.3.w", None)} and unexpected == []
  _, unexpected = hf.map_keys(["a.3.w", "zzz"], rules[:2])
  assert unexpected == ["zzz"]
  with pytest.raises(ValueError, match="'a.1.w' and 'zzz' both map to 'x'"):
    hf.map_keys(["a.1.w", "zzz"], [hf.KeyRule(".*", "x")])


@pytest.mark.parametrize("layout", ["single", "sharded"])
def test_load_values_and_forward(layout, single, sharded, torch_net):
  folder = single if layout == "single" else sharded
  model = hf.load_into(_abstract(), folder, RULES)
  _assert_values(model, torch_net.state_dict())
  x = np.random.default_rng(0).normal(size=(3, DIM)).astype(np.float32)
  with torch.no_grad():
    want = torch_net.layers[1].fc(torch.from_numpy(x)).numpy()
  np.testing.assert_allclose(model.blocks[1].mlp(x), want, rtol=1e-5, atol=1e-6)


def test_bf16_checkpoint(tmp_path, torch_net):
  sd = {k: v.bfloat16() for k, v in torch_net.state_dict().items()}
  safetensors.torch.save_file(sd, tmp_path / "diffusion_pytorch_model.safetensors")
  assert hf.SafetensorsFolder(tmp_path).info("embed.weight").dtype == ml_dtypes.bfloat16
  bf16 = jax.numpy.bfloat16
  _assert_values(hf.load_into(_abstract(bf16), tmp_path, RULES), sd, dtype=bf16)
  # An fp32 model (or dtype=) gets the bf16 values exactly, upcast.
  _assert_values(hf.load_into(_abstract(), tmp_path, RULES), sd)
  _assert_values(hf.load_into(_abstract(bf16), tmp_path, RULES, dtype=np.float32), sd)


def test_tied_alias(tmp_path, torch_net):
  sd = {k: v for k, v in torch_net.state_dict().items() if k != "head.weight"}
  safetensors.torch.save_file(sd, tmp_path / "model.safetensors")
  with pytest.raises(hf.LoadError, match=r"1 model variables have no checkpoint key:\n  lm_head"):
    hf.load_into(_abstract(), tmp_path, RULES)
  aliases = {"lm_head.kernel": ("tok.embedding", hf.transpose())}
  _assert_values(hf.load_into(_abstract(), tmp_path, RULES, aliases=aliases), sd)


def test_alias_yields_to_an_existing_key(single, torch_net):
  aliases = {"lm_head.kernel": ("tok.embedding", hf.transpose())}
  model = hf.load_into(_abstract(), single, RULES, aliases=aliases)
  np.testing.assert_array_equal(model.lm_head.kernel[...], torch_net.head.weight.detach().numpy().T)
  with pytest.raises(ValueError, match="no variable 'nope.kernel'"):
    hf.load_into(_abstract(), single, RULES, aliases={"nope.kernel": "tok.embedding"})


def test_missing_and_unexpected_listed_in_one_error(tmp_path, torch_net):
  sd = dict(torch_net.state_dict())
  del sd["layers.1.fc.bias"]
  sd["extra.weight"] = torch.zeros(2)
  safetensors.torch.save_file(sd, tmp_path / "model.safetensors")
  rules = RULES + [hf.KeyRule(r"extra\.weight", "blocks.7.mlp.bias")]
  with pytest.raises(hf.LoadError) as error:
    hf.load_into(_abstract(), tmp_path, rules)
  message = str(error.value)
  assert "1 model variables have no checkpoint key:\n  blocks.1.mlp.bias" in message
  assert "1 checkpoint keys are not used:\n  extra.weight -> blocks.7.mlp.bias" in message
  # strict=False: the report lists them; the abstract missing one is zeros.
  model, report = hf.load_into(_abstract(), tmp_path, RULES, strict=False)
  assert report == hf.LoadReport(missing=["blocks.1.mlp.bias"], unexpected=["extra.weight"])
  np.testing.assert_array_equal(model.blocks[1].mlp.bias[...], np.zeros(HIDDEN))
  np.testing.assert_array_equal(model.blocks[0].mlp.bias[...], sd["layers.0.fc.bias"].numpy())


def test_error_lists_are_capped(tmp_path):
  hf.save_safetensors(
    {f"junk.{i}": np.zeros(1, np.float32) for i in range(25)}, tmp_path / "a.safetensors"
  )
  with pytest.raises(
    hf.LoadError, match=r"25 checkpoint keys are not used:(\n  junk\.\d+){20}\n  \.\.\. and 5 more"
  ):
    hf.load_into(_abstract(), tmp_path / "a.safetensors", RULES)


def test_shape_mismatch_names_both_keys_and_shapes(single):
  rules = [hf.KeyRule(r"layers\.(\d+)\.fc\.weight", r"blocks.\1.mlp.kernel")] + RULES
  with pytest.raises(
    hf.LoadError,
    match=r"'layers\.0\.fc\.weight' \(16, 8\) gives \(16, 8\) .* 'blocks\.0\.mlp\.kernel' has shape \(8, 16\)",
  ):
    hf.load_into(_abstract(), single, rules)


def _mesh():
  return sharding_lib.make_mesh([("data", 2), ("fsdp", 2), ("tensor", 2)])


def test_load_under_mesh_places_shards(sharded, torch_net):
  mesh = _mesh()
  model = hf.load_into(_abstract(), sharded, RULES, mesh=mesh)
  _assert_values(model, torch_net.state_dict())
  specs = {
    "tok.embedding": P("tensor", "fsdp"),
    "lm_head.kernel": P("fsdp", "tensor"),
    "blocks.0.mlp.kernel": P("fsdp", "tensor"),
    "blocks.0.mlp.bias": P(),
  }
  arrays = _flat(model)
  for path, spec in specs.items():
    array = arrays[path]
    assert array.sharding.mesh == mesh and array.sharding.spec == spec, path
    shard_shape = array.sharding.shard_shape(array.shape)
    assert all(s.data.shape == shard_shape for s in array.addressable_shards), path
  # The same spec as a born-sharded model of the same class gets.
  born = sharding_lib.create_sharded(
    lambda: Net(rngs=nnx.Rngs(0)), mesh, sharding_lib.resolve_rules()
  )
  assert born.tok.embedding[...].sharding.spec == arrays["tok.embedding"].sharding.spec


def test_mesh_callback_reads_only_shards(single, monkeypatch):
  """Each device's callback gets an index covering only its shard, never the whole tensor."""
  calls = []
  original = jax.make_array_from_callback

  def spy(shape, sharding, callback):
    def recording(index):
      out = callback(index)
      calls.append((shape, out.shape))
      return out

    return original(shape, sharding, recording)

  monkeypatch.setattr(jax, "make_array_from_callback", spy)
  hf.load_into(_abstract(), single, RULES, mesh=_mesh())
  # tok.embedding is the only (VOCAB, DIM) tensor; P("tensor", "fsdp") gives 4 distinct shards.
  embedding = [out for shape, out in calls if shape == (VOCAB, DIM)]
  assert len(embedding) >= 4 and set(embedding) == {(VOCAB // 2, DIM // 2)}


def test_stacked_layers_target(single, torch_net):
  rules = [hf.KeyRule(r"layers\.(\d+)\.fc\.weight", r"fc[\1]", hf.transpose()), hf.ignore(".*")]
  with nnx.use_eager_sharding(False):
    abstract = nnx.eval_shape(lambda: StackedNet(rngs=nnx.Rngs(0)))
  # Shard the layer axis too, so a device's callback reads one layer.
  model = hf.load_into(abstract, single, rules, mesh=_mesh(), sharding_rules=[("layers", "data")])
  kernel = model.fc[...]
  assert kernel.sharding.spec == P("data", "fsdp", "tensor")
  assert {s.data.shape for s in kernel.addressable_shards} == {(1, DIM // 2, HIDDEN // 2)}
  want = np.stack([block.fc.weight.detach().numpy().T for block in torch_net.layers])
  np.testing.assert_array_equal(kernel, want)
  # A missing layer is reported per layer.
  rules = [hf.KeyRule(r"layers\.0\.fc\.weight", r"fc[0]"), hf.ignore(".*")]
  with pytest.raises(hf.LoadError, match=r"no checkpoint key:\n  fc\[1\]"):
    hf.load_into(abstract, single, rules)


def test_concrete_model_keeps_unloaded_values(single):
  with nnx.use_eager_sharding(False):
    model = Net(rngs=nnx.Rngs(1))
  before = np.asarray(model.blocks[0].ln.scale[...])
  rules = [r for r in RULES if "norm" not in r.pattern.pattern] + [hf.ignore(r".*norm.*")]
  loaded, report = hf.load_into(model, single, rules, strict=False, mesh=_mesh())
  assert report.missing == [f"blocks.{i}.ln.{n}" for i in range(2) for n in ("bias", "scale")]
  assert report.unexpected == []
  scale = loaded.blocks[0].ln.scale[...]
  np.testing.assert_array_equal(scale, before)
  assert scale.sharding.spec == P() and len(scale.sharding.device_set) == 8


def test_save_safetensors_round_trip(tmp_path):
  tensors = {
    "w": np.arange(6, dtype=np.float32).reshape(2, 3),
    "b": np.array([1.5, -2.25], dtype=ml_dtypes.bfloat16),
    "i": np.array([[1, 2]], dtype=np.int64),
    "j": jax.numpy.ones((3,), jax.numpy.float16),
  }
  path = tmp_path / "out.safetensors"
  hf.save_safetensors(tensors, path, metadata={"format": "pt"})
  assert sorted(os.listdir(tmp_path)) == ["out.safetensors"]  # no temp file left
  back = safetensors.torch.load_file(path)  # the reference reader accepts it
  assert back["b"].dtype == torch.bfloat16
  np.testing.assert_array_equal(back["b"].float().numpy(), [1.5, -2.25])
  ckpt = hf.SafetensorsFolder(path)
  assert ckpt.metadata == {"format": "pt"}
  for key, value in tensors.items():
    np.testing.assert_array_equal(ckpt.read(key), np.asarray(value))
    assert ckpt.info(key).dtype == np.asarray(value).dtype
  with pytest.raises(ValueError, match="metadata values must be str"):
    hf.save_safetensors(tensors, path, metadata={"step": 3})
  with pytest.raises(ValueError, match="'c' has dtype complex64"):
    hf.save_safetensors({"c": np.zeros(2, np.complex64)}, path)
