"""The text_encoder_synthetic job: a smoke run through main, its transformers T5 folder, exact
resume, the NaN guard, and flux_sft reading the folder through `config.text.t5_pretrained`."""

import json
import os
import shutil

import jax
import numpy as np
import pytest
import torch
import transformers
from absl import flags
from flax import nnx

from spatial_jax import checkpoint, main
from spatial_jax.configs_lib import load_config
from spatial_jax.data import tokenizer as tokenizer_lib
from spatial_jax.diffusion import build, synthetic, text_pretrain
from spatial_jax.jobs import flux_sft, text_encoder_synthetic
from spatial_jax.models.t5 import params as t5_params

pytestmark = pytest.mark.slow  # End to end: text_encoder_synthetic and flux_sft job runs.

CONFIG = "configs/text_encoder_synthetic.py"
PROMPTS = ["a red circle to the left of a blue star", "A green square lies above the red circle."]


def _config(**train):
  config = load_config(CONFIG, "smoke")
  config.train.update(train)
  return config


def _run_main(*args):
  """`python -m spatial_jax.main ARGS`, in this process (the same 8 fake devices as run())."""
  flags.FLAGS.unparse_flags()
  flags.FLAGS(["spatial_jax.main", *args])
  try:
    main.main(["spatial_jax.main"])
  finally:
    flags.FLAGS.unparse_flags()


def _losses(workdir):
  with open(os.path.join(workdir, "history.json")) as f:
    return dict(json.load(f)["train/loss"])


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("text_encoder"))
  _run_main(f"--config={CONFIG}:smoke", f"--workdir={workdir}")
  return workdir


def _ours(folder, ids):
  model = t5_params.from_pretrained(folder)
  return np.asarray(jax.jit(lambda m, x: m(x))(model, ids))


def test_smoke_run_writes_a_summary_and_a_transformers_t5_folder(smoke):
  assert json.load(open(os.path.join(smoke, "config.json")))["job"] == "text_encoder_synthetic"
  assert checkpoint.Checkpointer(smoke).all_steps() == [2, 4]
  losses = _losses(smoke)
  assert sorted(losses) == [1, 2, 3, 4] and all(np.isfinite(list(losses.values())))
  assert any(name.startswith("events.out.tfevents") for name in os.listdir(smoke))
  summary = json.load(open(os.path.join(smoke, "summary.json")))
  assert summary["step"] == 4 and summary["final"] == os.path.join(smoke, "final")
  for which in ("pretrained", "random"):
    probe = summary["probe"][which]
    assert all(0 <= probe[axis] <= 1 for axis in ("x", "y", "mean")), probe
  assert 0 <= summary["parse_sign_accuracy"] <= 1
  assert summary["held_out"]["parse_sign_accuracy"] == summary["parse_sign_accuracy"]
  # The temporary folder the export was written into is gone.
  assert sorted(os.listdir(os.path.join(smoke, "final"))) == [
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
  ]
  assert not [name for name in os.listdir(smoke) if name.endswith(".tmp")]


def test_final_folder_matches_transformers_and_the_trained_weights(smoke):
  final = os.path.join(smoke, "final")
  config = transformers.T5Config.from_pretrained(final)
  assert config.model_type == "t5" and config.feed_forward_proj == "gated-gelu"
  assert config.vocab_size == len(tokenizer_lib.vocabulary()) and config.d_model == 32
  tokenizer = tokenizer_lib.load_tokenizer(final)
  assert tokenizer.model_max_length == 80
  ids = synthetic.tokenize(PROMPTS, 80, bos=False)
  torch_model = transformers.T5EncoderModel.from_pretrained(final).eval()
  with torch.no_grad():
    expected = torch_model(input_ids=torch.from_numpy(ids).long()).last_hidden_state.numpy()
  ours = _ours(final, ids)
  np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-5)

  # The folder holds the weights of the last checkpoint (not the initial ones).
  smoke_config = _config()
  t5_config = synthetic.t5_config(**smoke_config.model.t5)
  with nnx.use_eager_sharding(False):
    abstract = nnx.eval_shape(lambda: text_pretrain.Pretrainer(t5_config, rngs=nnx.Rngs(0)))
  graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
  params = checkpoint.Checkpointer(smoke).restore(params=params).params
  trained = nnx.merge(graphdef, params, rest).encoder
  np.testing.assert_allclose(ours, np.asarray(trained(ids)), rtol=1e-5, atol=1e-5)


def test_resume_continues_exactly_like_an_uninterrupted_run(smoke, tmp_path):
  shutil.copytree(os.path.join(smoke, "checkpoints", "2"), tmp_path / "checkpoints" / "2")
  summary = text_encoder_synthetic.run(_config(), str(tmp_path))
  full, resumed = _losses(smoke), _losses(str(tmp_path))
  assert summary["step"] == 4 and sorted(resumed) == [3, 4]
  for step in (3, 4):
    np.testing.assert_allclose(resumed[step], full[step], rtol=1e-6)
  ids = synthetic.tokenize(PROMPTS, 80, bos=False)
  np.testing.assert_allclose(
    _ours(tmp_path / "final", ids), _ours(os.path.join(smoke, "final"), ids), rtol=1e-5, atol=1e-6
  )


def test_non_finite_loss_stops_and_writes_no_final_folder(tmp_path):
  # Warmup makes step 1's learning rate 0 (a good checkpoint); step 2's huge rate overflows.
  config = _config(steps=4, lr=1e38, warmup_steps=2, checkpoint_every=1)
  with pytest.raises(FloatingPointError, match="step 2.*last good checkpoint is step 1"):
    text_encoder_synthetic.run(config, str(tmp_path))
  assert checkpoint.Checkpointer(str(tmp_path)).all_steps() == [1]
  assert not os.path.exists(tmp_path / "final")


def test_flux_sft_reads_the_pretrained_t5_and_keeps_its_random_clip(smoke, tmp_path):
  final = os.path.join(smoke, "final")
  config = load_config("configs/flux_sft_synthetic.py", "smoke")
  random_encoder = build.build_prompt_encoder(config)
  config.text.t5_pretrained = final
  encoder = build.build_prompt_encoder(config)
  prompt_embeds, pooled = encoder(PROMPTS)
  ids = synthetic.tokenize(PROMPTS, config.text.max_length, bos=False)
  np.testing.assert_allclose(prompt_embeds, _ours(final, ids), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(pooled, random_encoder(PROMPTS)[1], rtol=1e-6, atol=1e-6)
  assert encoder.joint_attention_dim == 32 and encoder.to_json()["t5_pretrained"] == final

  # What flux_sft's export writes and `load_generator` reads keeps the pretrained weights.
  synthetic.save_text_encoders(encoder, tmp_path / "text_encoders")
  loaded = synthetic.load_text_encoders(tmp_path / "text_encoders")
  np.testing.assert_allclose(loaded(PROMPTS)[0], prompt_embeds, rtol=1e-6, atol=1e-6)
  assert loaded.t5_pretrained == final


def test_flux_sft_refuses_a_t5_folder_of_another_length_or_vocabulary(smoke, tmp_path):
  final = os.path.join(smoke, "final")
  with pytest.raises(ValueError, match="model_max_length=80, but config.text.max_length=96"):
    synthetic.build_prompt_encoder(max_length=96, t5_pretrained=final)
  bad = tmp_path / "bad"
  shutil.copytree(final, bad)
  tokenizer = json.loads((bad / "tokenizer.json").read_text())
  tokenizer["model"]["vocab"]["zebra"] = len(tokenizer["model"]["vocab"])
  (bad / "tokenizer.json").write_text(json.dumps(tokenizer))
  with pytest.raises(ValueError, match="tokenizer.json: its vocabulary"):
    synthetic.build_prompt_encoder(t5_pretrained=bad)
  os.remove(bad / "tokenizer_config.json")
  with pytest.raises(FileNotFoundError, match="no tokenizer_config.json"):
    synthetic.build_prompt_encoder(t5_pretrained=bad)


def test_flux_sft_smoke_run_with_the_pretrained_t5_exports_it(smoke, tmp_path):
  from spatial_jax.diffusion import generator as generator_lib

  config = load_config("configs/flux_sft_synthetic.py", "smoke")
  config.text.t5_pretrained = os.path.join(smoke, "final")
  config.gallery.num_prompts = 0
  flux_sft.run(config, str(tmp_path))
  generator = generator_lib.load_generator(tmp_path / "final")
  ids = synthetic.tokenize(PROMPTS, config.text.max_length, bos=False)
  np.testing.assert_allclose(
    generator.prompt_encoder(PROMPTS)[0],
    _ours(config.text.t5_pretrained, ids),
    rtol=1e-6,
    atol=1e-6,
  )
