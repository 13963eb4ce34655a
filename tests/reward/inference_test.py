"""SpatialScore inference: load a training workdir, score, export, reload, and bad input."""

import gc
import json
import os
import shutil

import jax
import numpy as np
import pytest
import safetensors.numpy
from flax import nnx
from PIL import Image

from spatial_jax import checkpoint, lora, metrics, sharding
from spatial_jax.configs_lib import load_config
from spatial_jax.data import pairs
from spatial_jax.jobs import reward_train
from spatial_jax.reward import build, evaluate, inference
from spatial_jax.reward.inference import SpatialScore

pytestmark = pytest.mark.slow  # End to end: built on a reward_train run.


def _smoke_config(**model):
  """The smoke config, smaller still: 2 steps on 16 pairs, one checkpoint."""
  config = load_config("configs/reward_synthetic.py", "smoke")
  config.data.synthetic.update(num_train=16, num_test=8, gallery_pairs=4)
  config.train.update(steps=2, batch_size=4, checkpoint_every=2)
  config.eval.update(batch_size=4, max_pairs=8)
  config.eval_every_steps = 100  # Only the final evaluation.
  config.model.update(model)
  return config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A trained smoke workdir, laid out as `spatial_jax.main` leaves it (with config.json)."""
  workdir = str(tmp_path_factory.mktemp("reward"))
  config = _smoke_config()
  metrics.write_config_json(workdir, config)
  summary = reward_train.run(config, workdir)
  return workdir, config, summary


@pytest.fixture(scope="module")
def scorer(trained):
  return SpatialScore.load(trained[0])


@pytest.fixture(scope="module")
def eval_pairs(trained):
  workdir, config, _ = trained
  return evaluate.load_eval_pairs(
    os.path.join(workdir, "pairs"),
    "test",
    max_pairs=config.eval.max_pairs,
    image_size=config.data.image_size,
  )


def _score_pairs(scorer, eval_pairs):
  images = [p.chosen for p in eval_pairs] + [p.rejected for p in eval_pairs]
  return scorer.score(images, [p.prompt for p in eval_pairs] * 2)


def test_workdir_scores_equal_the_training_runs_final_evaluation(trained, scorer, eval_pairs):
  _, config, summary = trained
  assert scorer.step == config.train.steps
  result = evaluate.evaluate(scorer.score_inputs, scorer.preparer, eval_pairs, config)
  # The training job's summary was computed from its in-memory state: the restored one matches.
  final = summary["eval"]
  assert result.scalars()["accuracy"] == final["accuracy"]
  np.testing.assert_allclose(result.scalars()["margin"], final["margin"], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(result.scalars()["sigma"], final["sigma"], rtol=1e-5)
  mu, sigma = _score_pairs(scorer, eval_pairs)
  n = len(eval_pairs)
  assert mu.dtype == sigma.dtype == np.float32 and mu.shape == (2 * n,)
  np.testing.assert_allclose(mu[:n], result.mu_chosen, atol=1e-5)
  np.testing.assert_allclose(mu[n:], result.mu_rejected, atol=1e-5)
  np.testing.assert_allclose(sigma[n:], result.sigma_rejected, atol=1e-5)
  assert np.all(sigma > 0)


def test_score_accepts_pil_arrays_floats_any_size_and_pads_chunks(scorer, eval_pairs):
  assert scorer.image_size == 32 and scorer.batch_size % jax.device_count() == 0
  image, prompt = eval_pairs[0].chosen, eval_pairs[0].prompt
  big = np.asarray(Image.fromarray(image).resize((64, 48), Image.Resampling.NEAREST))
  mu, sigma = scorer.score(
    [image, Image.fromarray(image), image.astype(np.float32) / 255.0, big], prompt
  )
  np.testing.assert_array_equal(mu[:3], mu[0])
  # Other sizes are resized to the training size, as the training data was.
  (mu_resized,), _ = scorer.score([pairs.resize_rgb(big, (32, 32))], [prompt])
  np.testing.assert_allclose(mu[3], mu_resized, atol=1e-6)
  # A stacked (N, H, W, 3) batch of more than one chunk: the same numbers as one at a time.
  n = scorer.batch_size + 3
  stacked = np.stack([p.rejected for p in eval_pairs] * 3)[:n]
  prompts = ([p.prompt for p in eval_pairs] * 3)[:n]
  many, _ = scorer.score(stacked, prompts)
  assert many.shape == (n,)
  (last,), _ = scorer.score(Image.fromarray(stacked[-1]), prompts[-1])  # One image.
  np.testing.assert_allclose(many[-1], last, atol=1e-6)
  k = len(eval_pairs)  # The list repeats every k images; the chunks are scored alike.
  np.testing.assert_allclose(many[k:], many[: n - k], atol=1e-6)


def test_score_rejects_bad_input(scorer, eval_pairs):
  image = eval_pairs[0].chosen
  with pytest.raises(ValueError, match="no images"):
    scorer.score([], [])
  with pytest.raises(ValueError, match="2 images but 1 prompts"):
    scorer.score([image, image], ["a red circle left of a blue square"])
  with pytest.raises(ValueError, match=r"images\[1\]"):
    scorer.score([image, image.astype(np.int32)], "x")


def test_export_and_reload_give_identical_scores(scorer, eval_pairs, tmp_path):
  folder = scorer.export(tmp_path / "export")
  assert sorted(os.listdir(folder)) == [
    "backbone.safetensors",
    "checksums.sha256",
    "head.safetensors",
    "spatial_score.json",
    "tokenizer",
  ]
  with open(os.path.join(folder, "spatial_score.json")) as f:
    meta = json.load(f)
  assert (meta["trainable"], meta["base_model"], meta["step"]) == ("all", "synthetic:tiny", 2)
  assert meta["reward_token_id"] == scorer.preparer.reward_token_id
  assert meta["config"]["model"]["head_hidden"] == scorer.config.model.head_hidden
  head = safetensors.numpy.load_file(os.path.join(folder, "head.safetensors"))
  assert sorted(head) == [
    "head.fc1.bias",
    "head.fc1.kernel",
    "head.fc2.bias",
    "head.fc2.kernel",
    "reward_embedding",
  ]
  np.testing.assert_array_equal(head["reward_embedding"], scorer.model.reward_embedding[...])

  loaded = SpatialScore.load(folder)
  assert loaded.step == 2 and loaded.source == os.fspath(folder)
  np.testing.assert_allclose(
    _score_pairs(loaded, eval_pairs), _score_pairs(scorer, eval_pairs), atol=1e-6
  )


def test_lora_export_writes_a_peft_adapter_and_reloads_it(tmp_path):
  # Two adapted layers keep the two builds' compiles short.
  targets = [r"language_model\.layers\.0\.self_attn\.[qv]_proj"]
  config = _smoke_config(trainable="lora", lora_rank=2, lora_alpha=4, lora_targets=targets)
  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.resolve_rules(config.sharding_rules)
  built = build.build(config, str(tmp_path / "fresh"), mesh, rules)
  # Non-zero adapters (B starts at zero), so a lost adapter would show.
  for i, layer in enumerate(lora.lora_layers(built.model.backbone).values()):
    b = layer.lora_b[...]
    layer.lora_b[...] = jax.device_put(
      0.5 * jax.random.normal(jax.random.key(i), b.shape, b.dtype), b.sharding
    )
  folder = SpatialScore(built, config, mesh, rules).export(tmp_path / "export")
  assert sorted(os.listdir(os.path.join(folder, "adapter"))) == [
    "adapter_config.json",
    "adapter_model.safetensors",
  ]
  adapter = safetensors.numpy.load_file(
    os.path.join(folder, "adapter", "adapter_model.safetensors")
  )
  assert "base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_B.weight" in adapter
  # The synthetic base is a random init: it travels too, without the adapters.
  backbone = safetensors.numpy.load_file(os.path.join(folder, "backbone.safetensors"))
  assert "language_model.layers.0.self_attn.q_proj.base.kernel" in backbone
  assert not any("lora" in k for k in backbone)

  loaded = SpatialScore.load(folder)
  # Every array equal (same graph, same values) means equal scores; all-mode scores are compared
  # above, so this test skips the extra compiles.
  want = nnx.to_flat_state(nnx.state(built.model))
  got = dict(nnx.to_flat_state(nnx.state(loaded.model)))
  assert len(got) == len(want)
  for path, var in want:
    np.testing.assert_array_equal(got[path][...], var[...], err_msg=str(path))
  assert isinstance(got[path], type(var))


def _copy_workdir(workdir, dest):
  shutil.copytree(workdir, dest, ignore=shutil.ignore_patterns("pairs", "events.*"))
  return str(dest)


def test_mismatching_checkpoint_is_refused(trained, tmp_path):
  workdir = _copy_workdir(trained[0], tmp_path / "w")
  path = os.path.join(workdir, "config.json")
  with open(path) as f:
    config = json.load(f)
  config["model"]["head_hidden"] = 8  # Trained with 16.
  with open(path, "w") as f:
    json.dump(config, f)
  with pytest.raises(checkpoint.CheckpointMismatchError, match=r"head/fc1/kernel.*shape"):
    SpatialScore.load(workdir)


# Orbax's failed read leaves a tensorstore callback for the event loop it closed; collected here.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_damaged_checkpoint_names_the_step(trained, tmp_path):
  workdir = _copy_workdir(trained[0], tmp_path / "w")
  data = os.path.join(workdir, "checkpoints", "2", "params", "d")
  for name in os.listdir(data):
    with open(os.path.join(data, name), "r+b") as f:
      f.truncate(16)
  with pytest.raises(OSError, match="Could not read checkpoint step 2"):
    SpatialScore.load(workdir)
  gc.collect()


def test_missing_files_give_clear_errors(trained, tmp_path):
  workdir = _copy_workdir(trained[0], tmp_path / "w")
  with pytest.raises(FileNotFoundError, match="step 7"):
    SpatialScore.load(workdir, step=7)
  shutil.rmtree(os.path.join(workdir, "checkpoints"))
  with pytest.raises(FileNotFoundError, match="No checkpoints/"):
    SpatialScore.load(workdir)
  os.remove(os.path.join(workdir, "config.json"))
  with pytest.raises(FileNotFoundError, match="neither a training workdir"):
    SpatialScore.load(workdir)
  with pytest.raises(FileNotFoundError, match="not found"):
    SpatialScore.load(tmp_path / "nowhere")
  assert inference.base_model(load_config("configs/reward_synthetic.py")) == "synthetic:tiny"


def test_non_finite_scores_stop_naming_the_model(trained, eval_pairs):
  # Damaged weights (here every float NaN) must not pass for scores (reward_eval's accuracy,
  # GRPO's rewards, pairs_generate's verdicts all come from `score`).
  damaged = SpatialScore.load(trained[0])
  nan = lambda x: x * np.nan if np.issubdtype(x.dtype, np.floating) else x  # noqa: E731
  damaged.trainable, damaged.frozen = jax.tree.map(nan, (damaged.trainable, damaged.frozen))
  image = eval_pairs[0].chosen
  with pytest.raises(FloatingPointError, match="non-finite scores for 2 of 2") as e:
    damaged.score([image, image], "a red circle left of a blue square")
  assert trained[0] in str(e.value) and "damaged or diverged" in str(e.value)


def test_another_jobs_workdir_is_not_taken_for_a_spatial_score(tmp_path):
  # A GRPO workdir has model/data/eval/seed/mesh too; it is named, not half-loaded.
  record = json.dumps({"job": "grpo", "model": {}, "data": {}, "eval": {}, "seed": 0, "mesh": []})
  (tmp_path / "config.json").write_text(record)
  with pytest.raises(ValueError, match="is a 'grpo' workdir, not a SpatialScore"):
    SpatialScore.load(tmp_path)
  (tmp_path / "config.json").write_text(record[:30])
  with pytest.raises(ValueError, match="config.json is not valid JSON"):
    SpatialScore.load(tmp_path)
  assert (tmp_path / "config.json").read_text() == record[:30]


def test_a_damaged_export_is_named(scorer, tmp_path):
  folder = scorer.export(tmp_path / "export")
  head = os.path.join(folder, "head.safetensors")
  data = bytearray(open(head, "rb").read())
  data[-3] ^= 0x40  # One flipped bit in the weights: the file still parses.
  open(head, "wb").write(bytes(data))
  with pytest.raises(ValueError, match="head.safetensors does not match its checksum.*export"):
    SpatialScore.load(folder)
