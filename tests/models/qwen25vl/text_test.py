"""TextModel (Qwen2 decoder + M-RoPE) against transformers 5.24 `Qwen2_5_VLTextModel` at fp32."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec
from transformers import Qwen2_5_VLConfig
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLTextModel

from spatial_jax import sharding
from spatial_jax.models.qwen25vl.config import Qwen25VLConfig
from spatial_jax.models.qwen25vl.rope_index import rope_index
from spatial_jax.models.qwen25vl.text import TextModel, mrope_cos_sin

TINY = Qwen25VLConfig.tiny()
# Second config: plain MHA (kv heads == heads), wider heads, an uneven mrope_section, 3 layers.
MHA = TINY.replace(
  text=dataclasses.replace(
    TINY.text,
    hidden_size=64,
    intermediate_size=80,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=4,
    rope_theta=1_000_000.0,
    mrope_section=(2, 3, 3),
  )
)
IMAGE, START, END = TINY.image_token_id, TINY.vision_start_token_id, TINY.vision_end_token_id
MERGE = TINY.vision.spatial_merge_size


def _hf_text_model(cfg: Qwen25VLConfig) -> Qwen2_5_VLTextModel:
  text = cfg.text
  hf_cfg = Qwen2_5_VLConfig(
    text_config=dict(
      vocab_size=text.vocab_size,
      hidden_size=text.hidden_size,
      intermediate_size=text.intermediate_size,
      num_hidden_layers=text.num_hidden_layers,
      num_attention_heads=text.num_attention_heads,
      num_key_value_heads=text.num_key_value_heads,
      rms_norm_eps=text.rms_norm_eps,
      hidden_act=text.hidden_act,
      rope_parameters=dict(
        rope_type="default", rope_theta=text.rope_theta, mrope_section=list(text.mrope_section)
      ),
      bos_token_id=1,
      eos_token_id=2,
    ),
    vision_config=dict(depth=1, hidden_size=16, num_heads=2, out_hidden_size=text.hidden_size),
    image_token_id=IMAGE,
  )
  # Eager attention: the additive-mask softmax that `layers.attention` mirrors.
  hf_cfg.text_config._attn_implementation = "eager"
  torch.manual_seed(0)
  model = Qwen2_5_VLTextModel(hf_cfg.text_config).eval()
  # HF's init (std 0.02) makes attention nearly uniform, so positions would barely matter.
  # Unit-variance projections give peaked attention, and random norm scales and biases
  # mean a swapped or missing weight cannot pass.
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("norm.weight"):
        p.copy_(1.0 + 0.1 * torch.randn_like(p))
      elif p.ndim == 2 and not name.startswith("embed_tokens"):
        p.copy_(torch.randn_like(p) * p.shape[1] ** -0.5)
      else:
        p.copy_(torch.randn_like(p) * (0.1 if p.ndim == 1 else 1.0))
  return model


def _load_from_torch(model: TextModel, hf: Qwen2_5_VLTextModel) -> None:
  """Copies an HF state_dict: Linear weight -> kernel (transposed), Embedding -> embedding."""
  loaded = set()
  for key, tensor in hf.state_dict().items():
    *path, leaf = key.split(".")
    module = model
    for part in path:
      module = module[int(part)] if part.isdigit() else getattr(module, part)
    value = tensor.detach().numpy()
    if isinstance(module, nnx.Linear) and leaf == "weight":
      variable, value = module.kernel, value.T
    elif isinstance(module, nnx.Embed):
      variable = module.embedding
    else:
      variable = getattr(module, leaf)
    assert variable.shape == value.shape, key
    variable[...] = jnp.asarray(value)
    loaded.add(id(variable))
  params = jax.tree.leaves(
    nnx.state(model, nnx.Param), is_leaf=lambda x: isinstance(x, nnx.Variable)
  )
  n_params = len(nnx.to_flat_state(nnx.state(model, nnx.Param)))
  assert len(loaded) == n_params == len(params), "every Param must come from the state_dict"


def _make_model(cfg: Qwen25VLConfig, seed: int = 0) -> TextModel:
  with nnx.use_eager_sharding(False):
    return TextModel(cfg, rngs=nnx.Rngs(seed))


def _inputs(cfg: Qwen25VLConfig, seed: int = 0):
  """Four rows: two images in one row, one image, text only; left and right padding."""
  rng = np.random.default_rng(seed)

  def image(t, h, w):
    return [START] + [IMAGE] * (t * (h // MERGE) * (w // MERGE)) + [END]

  def text(n):
    return list(rng.integers(8, cfg.text.vocab_size, size=n))

  rows = [
    text(3) + image(1, 4, 6) + text(2) + image(1, 6, 4) + text(3),  # 24 tokens, longest
    text(2) + image(1, 8, 4) + text(4),  # left padded
    text(9),  # text only, right padded
    text(1) + image(1, 4, 4) + text(5),  # right padded
  ]
  grids = [(1, 4, 6), (1, 6, 4), (1, 8, 4), (1, 4, 4)]
  length = max(map(len, rows))
  input_ids = np.zeros((len(rows), length), dtype=np.int32)
  mask = np.zeros((len(rows), length), dtype=np.int32)
  for b, ids in enumerate(rows):
    sl = slice(length - len(ids), length) if b == 1 else slice(0, len(ids))
    input_ids[b, sl], mask[b, sl] = ids, 1
  positions, _ = rope_index(
    input_ids, np.array(grids), mask, image_token_id=IMAGE, spatial_merge_size=MERGE
  )
  embeds = rng.standard_normal((len(rows), length, cfg.text.hidden_size)).astype(np.float32)
  return input_ids, embeds, positions, mask


def _hf_forward(hf, embeds, positions, mask):
  with torch.no_grad():
    out = hf(
      inputs_embeds=torch.from_numpy(embeds),
      position_ids=torch.from_numpy(positions.astype(np.int64)),
      attention_mask=torch.from_numpy(mask.astype(np.int64)),
    )
  return out.last_hidden_state.numpy()


@pytest.mark.parametrize("cfg", [TINY, MHA], ids=["gqa", "mha"])
def test_matches_transformers(cfg):
  hf = _hf_text_model(cfg)
  model = _make_model(cfg)
  _load_from_torch(model, hf)
  input_ids, embeds, positions, mask = _inputs(cfg)
  # Rows really differ in their 3D positions (image tokens present).
  assert (positions[0] != positions[1]).any()

  ours = np.asarray(model(jnp.asarray(embeds), jnp.asarray(positions), jnp.asarray(mask)))
  ref = _hf_forward(hf, embeds, positions, mask)
  valid = mask.astype(bool)
  np.testing.assert_allclose(ours[valid], ref[valid], rtol=1e-5, atol=1e-5)
  assert np.isfinite(ours).all()  # padded queries too

  with torch.no_grad():
    ref_embed = hf.embed_tokens(torch.from_numpy(input_ids.astype(np.int64))).numpy()
  np.testing.assert_array_equal(np.asarray(model.embed(jnp.asarray(input_ids))), ref_embed)


def test_padding_does_not_change_valid_outputs():
  """A left-padded row gives the same outputs as the same row unpadded."""
  model = _make_model(TINY, seed=1)
  _, embeds, positions, mask = _inputs(TINY)
  out = model(jnp.asarray(embeds), jnp.asarray(positions), jnp.asarray(mask))
  valid = mask[1].astype(bool)  # row 1 is left padded
  alone = model(
    jnp.asarray(embeds[1:2, valid]), jnp.asarray(positions[:, 1:2, valid]), attention_mask=None
  )
  np.testing.assert_allclose(np.asarray(out[1, valid]), np.asarray(alone[0]), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_jit_matches_eager_and_remat_keeps_gradients():
  model = _make_model(TINY, seed=2)
  _, embeds, positions, mask = _inputs(TINY)
  args = (jnp.asarray(embeds), jnp.asarray(positions), jnp.asarray(mask))
  eager = model(*args)
  jitted = nnx.jit(lambda m, *a: m(*a))(model, *args)
  np.testing.assert_allclose(np.asarray(jitted), np.asarray(eager), rtol=1e-5, atol=1e-5)

  def loss(state, graphdef, embeds):
    return jnp.sum(nnx.merge(graphdef, state)(embeds, *args[1:]) ** 2)

  remat_model = _make_model(TINY.replace(remat=True), seed=2)
  grads = []
  for m in (model, remat_model):
    graphdef, state = nnx.split(m)
    grads.append(
      jax.jit(jax.grad(loss, argnums=(0, 2)), static_argnums=1)(state, graphdef, args[0])
    )
  for a, b in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1]), strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def _np_rope_1d(pos, head_dim, theta):
  inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2) / head_dim)
  freqs = pos[..., None] * inv_freq
  return np.cos(np.concatenate([freqs, freqs], -1)), np.sin(np.concatenate([freqs, freqs], -1))


@pytest.mark.parametrize("section", [(2, 2, 2), (1, 2, 3), (4, 1, 1)])
def test_mrope_tables(section):
  head_dim, theta = 2 * sum(section), 10000.0
  rng = np.random.default_rng(0)
  kw = dict(head_dim=head_dim, theta=theta, mrope_section=section, dtype=jnp.float32)
  # Identical T/H/W rows (text): exactly plain 1D RoPE.
  pos1d = rng.integers(0, 3000, size=(2, 7))
  cos, sin = mrope_cos_sin(jnp.asarray(np.stack([pos1d] * 3)), **kw)
  ref_cos, ref_sin = _np_rope_1d(pos1d.astype(np.float64), head_dim, theta)
  np.testing.assert_allclose(np.asarray(cos), ref_cos, atol=2e-4)
  np.testing.assert_allclose(np.asarray(sin), ref_sin, atol=2e-4)
  # Distinct rows: frequency chunk i comes from row i % 3 (transformers' split-and-pick).
  pos3d = rng.integers(0, 50, size=(3, 2, 7))
  cos, sin = mrope_cos_sin(jnp.asarray(pos3d), **kw)
  per_row = [_np_rope_1d(p.astype(np.float64), head_dim, theta) for p in pos3d]
  bounds = np.cumsum((0, *section))
  for half in (0, head_dim // 2):
    for i in range(3):
      sl = slice(half + bounds[i], half + bounds[i + 1])
      np.testing.assert_allclose(np.asarray(cos)[..., sl], per_row[i][0][..., sl], atol=1e-5)
      np.testing.assert_allclose(np.asarray(sin)[..., sl], per_row[i][1][..., sl], atol=1e-5)


@pytest.mark.slow
def test_param_names_and_sharded_forward():
  cfg = TINY
  model = _make_model(cfg, seed=3)
  attn = model.layers[0].self_attn
  names = sharding.variable_names
  assert names(attn.q_proj.kernel) == ("embed", "heads")
  assert names(attn.k_proj.kernel) == ("embed", "kv_heads")
  assert names(attn.o_proj.kernel) == ("heads", "embed")
  assert names(model.embed_tokens.embedding) == ("vocab", "embed")
  assert attn.o_proj.bias is None and model.layers[0].mlp.gate_proj.bias is None
  _, embeds, positions, mask = _inputs(cfg)
  args = (jnp.asarray(embeds), jnp.asarray(positions), jnp.asarray(mask))
  expected = model(*args)

  mesh = sharding.make_mesh([("data", 2), ("fsdp", 2), ("tensor", 2)])
  rules = sharding.resolve_rules(None)
  sharded = sharding.create_sharded(lambda: TextModel(cfg, rngs=nnx.Rngs(3)), mesh, rules)
  assert sharded.layers[0].self_attn.q_proj.kernel.sharding.spec == PartitionSpec("fsdp", "tensor")
  with sharding.use_mesh(mesh, rules):
    out = nnx.jit(lambda m, *a: m(*a))(sharded, *args)
  batch_sharded = NamedSharding(mesh, PartitionSpec(("data", "fsdp"), None, None))
  assert out.sharding.is_equivalent_to(batch_sharded, out.ndim), out.sharding
  np.testing.assert_allclose(np.asarray(out), np.asarray(expected), rtol=1e-5, atol=1e-5)


def test_bad_shapes_raise():
  model = _make_model(TINY)
  x = jnp.zeros((2, 5, TINY.text.hidden_size))
  with pytest.raises(ValueError, match="position_ids shape"):
    model(x, jnp.zeros((4, 2, 5), jnp.int32))
  with pytest.raises(ValueError, match="attention_mask shape"):
    model(x, jnp.zeros((3, 2, 5), jnp.int32), jnp.ones((2, 4), jnp.int32))
  with pytest.raises(ValueError, match="inputs_embeds width"):
    model(jnp.zeros((2, 5, 7)), jnp.zeros((3, 2, 5), jnp.int32))


def test_remat_with_lora_differentiates_the_adapters():
  # The reward trainer differentiates the LoRA params only, merging them with the frozen base
  # inside jax.grad; nnx.remat used to fail there with a TraceContextError.
  from spatial_jax import lora

  _, embeds, positions, mask = _inputs(TINY)
  args = (jnp.asarray(embeds), jnp.asarray(positions), jnp.asarray(mask))
  grads = []
  for remat in (False, True):
    model = _make_model(TINY.replace(remat=remat), seed=2)
    lora.apply_lora(model, rank=2, alpha=4, targets=[r".*q_proj"], rngs=nnx.Rngs(1))
    graphdef, adapters, frozen = nnx.split(model, nnx.LoRAParam, ...)

    def loss(adapters, frozen, graphdef=graphdef):
      return jnp.sum(nnx.merge(graphdef, adapters, frozen)(*args) ** 2)

    grads.append(jax.jit(jax.grad(loss))(adapters, frozen))
  leaves = [jax.tree.leaves(g) for g in grads]
  assert leaves[0] and any(np.abs(np.asarray(x)).max() > 0 for x in leaves[1])
  for a, b in zip(*leaves, strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
