"""Tests for spatial_jax.metrics."""

import glob
import io
import json
import os
import subprocess
import sys

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from PIL import Image

from spatial_jax import metrics


def test_import_does_not_load_tensorflow_or_tensorboard():
  code = (
    "import sys, spatial_jax.metrics; "
    "bad = [m for m in ('tensorflow', 'clu', 'tensorboard', 'tensorboardX') if m in sys.modules]; "
    "assert not bad, bad"
  )
  subprocess.run(
    [sys.executable, "-c", code], check=True, env={**os.environ, "JAX_PLATFORMS": "cpu"}
  )


def test_make_grid_layout():
  # 5 images of 3x4, each filled with its index + 1; 3 columns, pad 2, pad value 0.
  images = np.stack([np.full((3, 4, 3), i + 1, np.uint8) for i in range(5)])
  grid = metrics.make_grid(images, ncols=3, pad=2)
  assert grid.dtype == np.uint8
  assert grid.shape == (2 * (3 + 2) + 2, 3 * (4 + 2) + 2, 3) == (12, 20, 3)
  for i in range(5):
    top, left = 2 + (i // 3) * 5, 2 + (i % 3) * 6
    np.testing.assert_array_equal(grid[top : top + 3, left : left + 4], i + 1)
  # Image 4 (row 1, col 1) starts at pixel (7, 8); padding around it and the empty cell are 0.
  assert grid[7, 8, 0] == 5 and grid[6, 8, 0] == 0 and grid[7, 7, 0] == 0
  assert (grid[7:10, 14:18] == 0).all()  # Unused cell (row 1, col 2).
  assert (grid[:2] == 0).all() and (grid[:, :2] == 0).all()
  assert int(grid.sum()) == sum((i + 1) * 3 * 4 * 3 for i in range(5))


def test_make_grid_float_and_default_columns():
  images = np.zeros((4, 2, 2, 3), np.float32)
  images[1] = 1.0
  images[2] = 0.5
  images[3] = 7.0  # Clipped to 1.
  grid = metrics.make_grid(images, pad=0)
  assert grid.shape == (4, 4, 3)  # ncols = ceil(sqrt(4)) = 2.
  assert grid[0, 0, 0] == 0 and grid[0, 2, 0] == 255 and grid[2, 0, 0] == 128
  assert grid[2, 2, 0] == 255
  with pytest.raises(ValueError, match="shape"):
    metrics.make_grid(np.zeros((2, 2, 3), np.uint8))


class _FakeWriter:
  def __init__(self):
    self.scalars, self.images = [], []

  def write_scalars(self, step, scalars):
    self.scalars.append((step, dict(scalars)))

  def write_images(self, step, images):
    self.images.append((step, {k: np.asarray(v) for k, v in images.items()}))


def test_write_images_png_and_writer(tmp_path):
  images = np.random.default_rng(0).uniform(size=(3, 5, 6, 3)).astype(np.float32)
  writer = _FakeWriter()
  png = tmp_path / "images" / "samples_000010.png"
  grid = metrics.write_images(writer, 10, "samples", images, png_path=png, ncols=2, pad=1)
  assert grid.shape == (2 * 6 + 1, 2 * 7 + 1, 3)
  with Image.open(png) as im:
    assert im.size == (15, 13) and im.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(im), grid)
  assert writer.images[0][0] == 10
  np.testing.assert_array_equal(writer.images[0][1]["samples"], grid[None])


def test_progress_eta_with_fake_clock(caplog):
  now = [100.0]
  writer = _FakeWriter()
  progress = metrics.Progress(
    1000, every_steps=100, writer=writer, name="train", clock=lambda: now[0]
  )
  reports = {}
  for step in range(1, 301):
    now[0] += 0.5 if step <= 100 else 0.25  # 2 steps/s, then 4 steps/s.
    msg = progress.update(step)
    if msg:
      reports[step] = msg
  assert sorted(reports) == [100, 200, 300]
  assert reports[100] == "train: 100/1000 (10.0%), 2 steps/s, elapsed 50.0s, ETA 7m30s"
  # The rate is measured over the last interval: 100 steps in 25 s; ETA 700 / 4 = 175 s.
  assert reports[300] == "train: 300/1000 (30.0%), 4 steps/s, elapsed 1m40s, ETA 2m55s"
  assert writer.scalars == [
    (100, {"train/steps_per_sec": 2.0}),
    (200, {"train/steps_per_sec": 4.0}),
    (300, {"train/steps_per_sec": 4.0}),
  ]


def test_progress_every_secs_unknown_total_and_wrap():
  now = [0.0]
  writer = _FakeWriter()
  progress = metrics.Progress(
    None, every_secs=10, writer=writer, unit="images", clock=lambda: now[0]
  )

  def items():
    for i in range(7):
      now[0] += 3.0
      yield i

  assert list(progress.wrap(items())) == list(range(7))
  # Due at t=12 (4 items); at t=21 (7 items) only 9 s have passed since that report.
  assert writer.scalars == [(4, {"progress/images_per_sec": 4 / 12})]
  assert progress.report(7) == "progress: 7, 0.333 images/s, elapsed 21.0s"
  assert metrics.format_secs(7384) == "2h03m04s"


def test_progress_reports_last_step_once():
  now = [0.0]
  progress = metrics.Progress(10, every_steps=4, clock=lambda: now[0])
  due = []
  for step in range(1, 11):
    now[0] += 1.0
    if progress.update(step):
      due.append(step)
  assert due == [4, 8, 10]
  assert progress.update(10) is None


def test_write_summary_round_trip(tmp_path):
  summary = {
    "accuracy": np.float32(0.75),
    "steps": np.int64(12),
    "loss": jnp.asarray(0.5),
    "per_class": jnp.arange(3, dtype=jnp.bfloat16),
    "nested": {"ok": True, "path": tmp_path / "x"},
  }
  path = metrics.write_summary(tmp_path / "run", summary)
  assert path == os.path.join(tmp_path, "run", "summary.json")
  with open(path) as f:
    back = json.load(f)
  assert back == {
    "accuracy": 0.75,
    "steps": 12,
    "loss": 0.5,
    "per_class": [0.0, 1.0, 2.0],
    "nested": {"ok": True, "path": str(tmp_path / "x")},
  }
  # A value that cannot be serialized fails before touching the existing file.
  with pytest.raises(TypeError, match="object"):
    metrics.write_summary(tmp_path / "run", {"bad": object()})
  with open(path) as f:
    assert json.load(f) == back
  assert [p for p in os.listdir(tmp_path / "run") if p.endswith(".tmp")] == []


def test_write_config_json(tmp_path):
  config = ml_collections.ConfigDict({"lr": 3e-4, "model": {"name": "flux", "rank": 32}})
  path = metrics.write_config_json(tmp_path, config)
  with open(path) as f:
    assert json.load(f) == {"lr": 3e-4, "model": {"name": "flux", "rank": 32}}


def test_write_config_json_replaces_only_the_same_jobs_record(tmp_path):
  path = metrics.write_config_json(tmp_path, ml_collections.ConfigDict({"job": "a", "lr": 1.0}))
  metrics.write_config_json(tmp_path, ml_collections.ConfigDict({"job": "a", "lr": 2.0}))
  assert json.loads(open(path).read())["lr"] == 2.0  # A rerun of the same job.
  with pytest.raises(ValueError, match="holds a 'a' run.*this is a 'b' run"):
    metrics.write_config_json(tmp_path, ml_collections.ConfigDict({"job": "b"}))
  assert json.loads(open(path).read()) == {"job": "a", "lr": 2.0}
  # A model folder's own config (no job key) and an unreadable file are not replaced either.
  model_config = '{"model_type": "qwen2_5_vl"}'
  for text, message in ((model_config, "not a job record"), ("{trunc", "not a readable")):
    with open(path, "w") as f:
      f.write(text)
    with pytest.raises(ValueError, match=message):
      metrics.write_config_json(tmp_path, ml_collections.ConfigDict({"job": "a"}))
    assert open(path).read() == text
  # Plain dicts without a job (exports, summaries) are written as before.
  metrics.write_config_json(tmp_path, {"model_type": "x"})
  assert json.loads(open(path).read()) == {"model_type": "x"}


def test_create_writer_writes_tensorboard_scalars_and_images(tmp_path, caplog):
  # The reader TensorBoard's own plugins use: it shows tensorboardX's scalar and image summaries
  # as tensors, as TF2 writes them.
  from tensorboard.backend.event_processing import plugin_event_accumulator
  from tensorboard.util import tensor_util

  caplog.set_level("INFO")
  writer = metrics.create_writer(tmp_path)
  writer.write_scalars(1, {"loss": 0.5, "accuracy": np.float32(0.25)})
  writer.write_scalars(2, {"loss": jnp.asarray(0.125)})
  metrics.write_images(writer, 2, "grid", np.zeros((2, 4, 4, 3), np.uint8))
  writer.close()

  assert "[1] accuracy=0.25, loss=0.5" in caplog.text
  assert glob.glob(str(tmp_path / "events.out.tfevents.*"))
  acc = plugin_event_accumulator.EventAccumulator(str(tmp_path), size_guidance={"tensors": 0})
  acc.Reload()
  assert {"loss", "accuracy", "grid"} <= set(acc.Tags()["tensors"])
  loss = [(e.step, float(tensor_util.make_ndarray(e.tensor_proto))) for e in acc.Tensors("loss")]
  assert loss == [(1, 0.5), (2, 0.125)]
  (image_event,) = acc.Tensors("grid")
  # Image summaries store [width, height, png bytes] strings.
  width, height, png = tensor_util.make_ndarray(image_event.tensor_proto)
  assert (int(width), int(height)) == (2 * 6 + 2, 1 * 6 + 2)
  with Image.open(io.BytesIO(png)) as im:
    np.testing.assert_array_equal(np.asarray(im), np.zeros((8, 14, 3), np.uint8))


def test_create_writer_without_tensorboardx_only_logs_and_warns_once(tmp_path, monkeypatch, caplog):
  monkeypatch.setitem(sys.modules, "tensorboardX", None)  # As if the extra were not installed.
  monkeypatch.setattr(metrics, "_warned_no_tensorboard", False)
  caplog.set_level("INFO")
  for _ in range(2):
    writer = metrics.create_writer(tmp_path)
    assert type(writer) is metrics.LoggingWriter
    writer.write_scalars(3, {"loss": 0.5})
    writer.close()
  assert caplog.text.count("pip install -e '.[tensorboard]'") == 1
  assert caplog.text.count("[3] loss=0.5") == 2
  assert not os.listdir(tmp_path)


def test_json_outputs_have_no_nan_tokens(tmp_path):
  summary = {"a": float("nan"), "b": [float("inf"), 1.5], "c": np.float32("nan"),
             "d": np.array([1.0, np.nan]), "e": {"f": -np.inf, "g": 2}}  # fmt: skip
  path = metrics.write_summary(tmp_path, summary)
  text = open(path).read()

  def refuse(token):
    raise ValueError(f"non-JSON token {token}")

  assert json.loads(text, parse_constant=refuse) == {
    "a": None, "b": [None, 1.5], "c": None, "d": [1.0, None], "e": {"f": None, "g": 2}
  }  # fmt: skip
