"""The flux_sft job: the objective, a smoke run through main, exact resume, the NaN guard."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import safetensors.numpy
from absl import flags
from flax import nnx
from PIL import Image

from spatial_jax import checkpoint, lora, main, optim, sharding
from spatial_jax.configs_lib import load_config
from spatial_jax.diffusion import build, flow_matching
from spatial_jax.diffusion import generator as generator_lib
from spatial_jax.diffusion.pipeline import FluxPipeline
from spatial_jax.diffusion.schedule import FlowMatchSchedule
from spatial_jax.jobs import flux_sft
from spatial_jax.models.flux import params as flux_params

pytestmark = pytest.mark.slow  # End to end: flux_sft job runs.

CONFIG = "configs/flux_sft_synthetic.py"


def _config(**train):
  config = load_config(CONFIG, "smoke")
  config.train.update(train)
  return config


def _flat(tree):
  return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree.leaves_with_path(tree)}


def _losses(workdir):
  with open(os.path.join(workdir, "history.json")) as f:
    return dict(json.load(f)["train/loss"])


def test_loss_matches_a_numpy_reference_on_a_toy_velocity():
  rng = np.random.default_rng(0)
  x0, noise = rng.normal(size=(2, 3, 5, 4)).astype(np.float32)
  t = np.array([0.25, 0.9, 0.5], np.float32)
  w = rng.normal(size=(4, 4)).astype(np.float32)

  def velocity(x, s):  # Any function of (x_t, t) will do; this one uses both.
    return x @ w + 2.0 * s[:, None, None]

  x_t = (1 - t[:, None, None]) * x0 + t[:, None, None] * noise
  expected = np.mean((x_t @ w + 2.0 * t[:, None, None] - (noise - x0)) ** 2)
  loss = flow_matching.flow_matching_loss(
    velocity, jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(t)
  )
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  # The exact velocity of the straight path has zero loss.
  exact = flow_matching.flow_matching_loss(lambda x, s: noise - x0, x0, noise, t)
  assert float(exact) == 0.0


def test_params_ema_ramps_its_decay():
  tx = optim.params_ema(0.9)
  params = {"w": jnp.array([1.0, -2.0])}
  state = tx.init(params)
  expected = np.array([1.0, -2.0])
  for n, delta in enumerate(([0.5, 0.5], [-1.0, 2.0], [0.25, 0.0]), start=1):
    updates = {"w": jnp.array(delta)}
    out, state = tx.update(updates, state, params)
    params = optax.apply_updates(params, out)
    d = min(0.9, (1 + n) / (10 + n))
    expected = d * expected + (1 - d) * np.asarray(params["w"])
    np.testing.assert_array_equal(out["w"], delta)  # Updates pass through.
    np.testing.assert_allclose(optim.ema_params((None, state))["w"], expected, rtol=1e-6)
  assert optim.ema_params(optax.sgd(0.1).init(params)) is None


def test_timestep_sampling_schemes():
  config = _config(resolution_shift=False, logit_mean=0.5, logit_std=0.8)
  key = jax.random.key(3)
  t = np.asarray(flow_matching.sample_timesteps(key, 20_000, config, 64))
  logits = np.log(t / (1 - t))
  assert abs(logits.mean() - 0.5) < 0.02 and abs(logits.std() - 0.8) < 0.02
  config.train.resolution_shift = True
  shifted = np.asarray(flow_matching.sample_timesteps(key, 20_000, config, 64))
  s = np.exp(FlowMatchSchedule().mu(64))  # The sampler's shift for 64 image tokens.
  np.testing.assert_allclose(shifted, s * t / (1 + (s - 1) * t), rtol=1e-5)
  config.train.update(timestep_sampling="uniform", resolution_shift=False)
  u = np.asarray(flow_matching.sample_timesteps(key, 20_000, config, 64))
  assert 0 <= u.min() and u.max() <= 1 and abs(u.mean() - 0.5) < 0.01
  config.train.timestep_sampling = "cosine"
  with pytest.raises(ValueError, match="timestep_sampling='cosine'"):
    flow_matching.sample_timesteps(key, 4, config, 64)


def _run_main(*args):
  """`python -m spatial_jax.main ARGS`, in this process (the same 8 fake devices as run())."""
  flags.FLAGS.unparse_flags()
  flags.FLAGS(["spatial_jax.main", *args])
  try:
    main.main(["spatial_jax.main"])
  finally:
    flags.FLAGS.unparse_flags()


def test_miscaption_swaps_the_drawn_fraction_for_perturbed_prompts_reproducibly():
  n = 4000
  batch = dict(
    prompt=np.array([f"a red circle left of a blue star {i}" for i in range(n)], dtype=object),
    perturbed_prompt=np.array(
      [f"a red circle right of a blue star {i}" if i % 10 else "" for i in range(n)], dtype=object
    ),
  )
  assert flux_sft.miscaption(batch, 0.0, (0, 1)) == list(batch["prompt"])
  captions = flux_sft.miscaption(batch, 0.3, (0, 1))
  swapped = np.array([c != p for c, p in zip(captions, batch["prompt"], strict=True)])
  # Only rows with a perturbed prompt (9 in 10) swap, each with probability 0.3: 0.27 +- 0.02.
  assert abs(swapped.mean() - 0.27) < 0.02
  assert not swapped[::10].any()
  np.testing.assert_array_equal(np.array(captions)[swapped], batch["perturbed_prompt"][swapped])
  assert flux_sft.miscaption(batch, 0.3, (0, 1)) == captions  # Same (seed, step): same draw.
  assert flux_sft.miscaption(batch, 0.3, (0, 2)) != captions


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("flux_sft"))
  _run_main(f"--config={CONFIG}:smoke", f"--workdir={workdir}")
  return workdir


def test_smoke_run_writes_checkpoints_metrics_gallery_and_a_loadable_generator(smoke):
  config = _config()
  assert json.loads(open(os.path.join(smoke, "config.json")).read())["job"] == "flux_sft"
  assert checkpoint.Checkpointer(smoke).all_steps() == [2, 4]
  losses = _losses(smoke)
  assert sorted(losses) == [1, 2, 3, 4] and all(np.isfinite(list(losses.values())))
  assert any(name.startswith("events.out.tfevents") for name in os.listdir(smoke))
  summary = json.loads(open(os.path.join(smoke, "summary.json")).read())
  assert summary["step"] == 4 and 0 <= summary["gallery"]["gallery/oracle_relations"] <= 1
  # Four samples above their four reference renders, 32x32 tiles with 2-pixel padding.
  gallery = np.asarray(Image.open(os.path.join(smoke, "gallery", "step_000004.png")))
  assert gallery.shape == (2 * 34 + 2, 4 * 34 + 2, 3)

  # The export is a diffusers folder of the trained weights: the EMA of the last checkpoint,
  # which galleries use too.
  final = os.path.join(smoke, "final")
  generator = generator_lib.load_generator(final)
  assert generator.image_size == 32 and generator.info["step"] == 4
  graphdef, params, rest = nnx.split(generator.transformer, nnx.Param, ...)
  opt_target = build.make_optimizer(config).init(params)
  restored = checkpoint.Checkpointer(smoke).restore(params=params, opt_state=opt_target)
  ema = optim.ema_params(restored.opt_state)
  exported, averaged, raw = (_flat(tree) for tree in (params, ema, restored.params))
  assert exported.keys() == averaged.keys() == raw.keys()
  for name, value in exported.items():
    np.testing.assert_array_equal(value, averaged[name], err_msg=name)
  assert any(np.abs(raw[k] - averaged[k]).max() > 1e-6 for k in raw)  # Not the raw weights.

  # The exported components plug into FluxPipeline, which then draws what the gallery sampler
  # draws from the same noise.
  pipe = FluxPipeline(
    generator.transformer,
    generator.codec,
    schedule=FlowMatchSchedule(),
    **generator.prompt_encoder.pipeline_components(),
  )
  prompts = ["a red circle above a blue star", "a green square"]
  x = jax.random.normal(jax.random.key(0), (2, 64, 48))
  images = pipe(prompts, height=32, width=32, num_inference_steps=3, latents=x)
  geo = generator_lib.geometry(32, generator.codec, config.text.max_length)
  sample = generator_lib.make_sampler(graphdef, generator.codec, geo, num_steps=3, guidance=1.0)
  expected = jax.jit(sample)(params, rest, *generator.prompt_encoder(prompts), x)
  assert images.shape == (2, 32, 32, 3)
  np.testing.assert_allclose(images, expected, atol=1e-6)


def test_resume_continues_exactly_like_an_uninterrupted_run(smoke, tmp_path):
  # A run stopped after step 2 leaves what the uninterrupted run saved at step 2 (model,
  # optimizer, data iterator, rng): resuming from a copy of it must retrace steps 3 and 4.
  shutil.copytree(os.path.join(smoke, "checkpoints", "2"), tmp_path / "checkpoints" / "2")
  config = _config()
  config.data.pairs = os.path.join(smoke, "pairs")  # The smoke run's data: the same batches.
  config.gallery.num_prompts = 0
  summary = flux_sft.run(config, str(tmp_path))
  full, resumed = _losses(smoke), _losses(str(tmp_path))
  assert summary["step"] == 4 and sorted(resumed) == [3, 4]
  for step in (3, 4):
    np.testing.assert_allclose(resumed[step], full[step], rtol=1e-6)
  assert full[4] != full[3]
  assert checkpoint.Checkpointer(str(tmp_path)).all_steps() == [2, 4]


def test_diffusers_export_round_trips_across_layer_layouts(smoke, tmp_path):
  # The smoke export (scanned) read as a looped model and written again: the same file.
  exported = os.path.join(smoke, "final", "transformer")
  looped = flux_params.from_pretrained(exported, scan_layers=False)
  flux_params.save_pretrained(looped, tmp_path)
  saved = safetensors.numpy.load_file(tmp_path / "diffusion_pytorch_model.safetensors")
  original = safetensors.numpy.load_file(
    os.path.join(exported, "diffusion_pytorch_model.safetensors")
  )
  assert saved.keys() == original.keys() and "transformer_blocks.0.attn.to_q.weight" in saved
  for key, value in original.items():
    np.testing.assert_array_equal(saved[key], value, err_msg=key)
  np.testing.assert_array_equal(  # torch's (out, in) layout
    saved["proj_out.weight"], np.asarray(looped.proj_out.kernel[...]).T
  )
  assert (tmp_path / "config.json").read_text() == open(
    os.path.join(exported, "config.json")
  ).read()
  lora.apply_lora(looped, rank=2, alpha=2, targets=flux_params.lora_targets(), rngs=nnx.Rngs(1))
  with pytest.raises(ValueError, match="lora.merge"):
    flux_params.save_pretrained(looped, tmp_path)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(smoke, tmp_path):
  # Warmup makes step 1's learning rate 0 (a good checkpoint); step 2's huge rate overflows.
  config = _config(steps=4, lr=1e38, warmup_steps=2, checkpoint_every=1)
  config.data.pairs = os.path.join(smoke, "pairs")
  config.gallery.num_prompts = 0
  with pytest.raises(FloatingPointError, match="step 2.*last good checkpoint is step 1"):
    flux_sft.run(config, str(tmp_path))
  ckpt = checkpoint.Checkpointer(str(tmp_path))
  assert ckpt.all_steps() == [1]
  assert not os.path.exists(tmp_path / "final")
  mesh = sharding.make_mesh(config.mesh)
  codec, encoder = build.build_codec(config), build.build_prompt_encoder(config)
  model = build.build_model(config, codec, encoder, mesh, sharding.resolve_rules(None))
  _, target, _ = nnx.split(model, nnx.Param, ...)
  params = ckpt.restore(step=1, params=target).params
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))


def test_bad_config_fails_before_any_work(tmp_path):
  config = _config(batch_size=6)  # 8 fake devices split the batch 8 ways.
  with pytest.raises(ValueError, match="batch_size=6 must be a multiple of the 8 shards"):
    flux_sft.run(config, str(tmp_path))
  config = _config(timestep_sampling="cosine")
  with pytest.raises(ValueError, match="timestep_sampling='cosine'"):
    flux_sft.run(config, str(tmp_path))
  assert not os.path.exists(tmp_path / "checkpoints")


def test_trainable_t5_step_matches_the_frozen_step_and_trains_t5():
  # T5 run inside the step on the batch's ids gives the loss and transformer update of the step
  # fed T5's embeddings from outside; and only the trainable-T5 step moves T5.
  config = _config(prompt_dropout=0.5)
  config.model.zero_init = False  # adaLN-Zero would send no gradient to the text at first.
  mesh, rules = sharding.make_mesh(config.mesh), sharding.resolve_rules(None)
  codec, encoder = build.build_codec(config), build.build_prompt_encoder(config)
  geo = generator_lib.geometry(32, codec, config.text.max_length)
  model = build.build_model(config, codec, encoder, mesh, rules)
  graphdef, params, frozen = nnx.split(model, nnx.Param, ...)
  t5_graphdef, t5_params = nnx.split(encoder.encoders.t5)
  prompts = ["a red circle above a blue star", "a green square left of a cyan cross"] * 4
  ids = encoder.tokenize(prompts)
  embeds, pooled = encoder.encode_ids(ids["t5_ids"], ids["clip_ids"])
  empty = encoder([""])
  images = np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3), np.uint8)
  tx = optax.sgd(0.1)
  key = jax.random.key(3)
  with sharding.use_mesh(mesh, rules):
    frozen_step = jax.jit(flow_matching.make_train_step(graphdef, tx, config, codec, geo, empty))
    joint_step = jax.jit(
      flow_matching.make_train_step(
        graphdef,
        tx,
        config,
        codec,
        geo,
        (jnp.asarray(encoder.tokenize([""])["t5_ids"]), empty[1]),
        t5_graphdef,
      )
    )
    batch = dict(images=images, prompt_embeds=embeds, pooled=pooled)
    new, _, aux = frozen_step(params, tx.init(params), frozen, batch, key)
    joint = dict(transformer=params, t5=t5_params)
    batch = dict(images=images, t5_ids=ids["t5_ids"], pooled=pooled)
    new_joint, _, joint_aux = joint_step(joint, tx.init(joint), frozen, batch, key)
  np.testing.assert_allclose(joint_aux["loss"], aux["loss"], rtol=1e-5)
  got, expected = _flat(new_joint["transformer"]), _flat(new)
  for name, value in expected.items():
    np.testing.assert_allclose(got[name], value, rtol=1e-4, atol=1e-6, err_msg=name)
  trained, initial = _flat(new_joint["t5"]), _flat(t5_params)
  assert max(np.abs(trained[k] - initial[k]).max() for k in initial) > 1e-4


def test_trainable_t5_run_exports_the_trained_t5(smoke, tmp_path):
  config = _config(steps=2, checkpoint_every=2)
  config.data.pairs = os.path.join(smoke, "pairs")
  config.gallery.every_steps = 1  # Galleries between steps encode with the trained T5.
  config.text.t5_trainable = True
  config.model.zero_init = False  # So that T5 gets a gradient within the two steps.
  flux_sft.run(config, str(tmp_path))
  exported = generator_lib.load_generator(tmp_path / "final").prompt_encoder.encoders
  initial_encoder = build.build_prompt_encoder(config)
  initial = initial_encoder.encoders
  # The export's T5 is the EMA of the checkpoint's T5 (as the transformer is); CLIP stays.
  mesh, rules = sharding.make_mesh(config.mesh), sharding.resolve_rules(None)
  codec = build.build_codec(config)
  model = build.build_model(config, codec, initial_encoder, mesh, rules)
  _, params, _ = nnx.split(model, nnx.Param, ...)
  target = dict(transformer=params, t5=nnx.state(initial.t5))
  opt_target = build.make_optimizer(config).init(target)
  restored = checkpoint.Checkpointer(str(tmp_path)).restore(params=target, opt_state=opt_target)
  ema = _flat(optim.ema_params(restored.opt_state)["t5"])
  t5, t5_initial = _flat(nnx.state(exported.t5)), _flat(nnx.state(initial.t5))
  assert t5.keys() == ema.keys()
  for name, value in ema.items():
    np.testing.assert_allclose(t5[name], value, rtol=1e-6, err_msg=name)
  assert max(np.abs(t5[k] - t5_initial[k]).max() for k in t5) > 1e-5
  clip, clip_initial = _flat(nnx.state(exported.clip)), _flat(nnx.state(initial.clip))
  for name, value in clip_initial.items():
    np.testing.assert_array_equal(clip[name], value, err_msg=name)


def test_a_damaged_generator_export_is_named(smoke, tmp_path):
  final = tmp_path / "final"
  shutil.copytree(os.path.join(smoke, "final"), final)
  assert (final / "checksums.sha256").exists()
  weights = next((final / "transformer").glob("*.safetensors"))
  data = bytearray(weights.read_bytes())
  data[-5] ^= 0x40  # One flipped bit in the weights: the file still parses.
  weights.write_bytes(bytes(data))
  with pytest.raises(ValueError, match="safetensors does not match its checksum.*generator"):
    generator_lib.load_generator(final)
