"""The colabs/ notebooks: each .ipynb matches its jupytext source (.py), is committed without
outputs, and runs top to bottom in a fresh kernel on smoke settings (SPATIAL_JAX_SMOKE=1)."""

import asyncio
import json
import math
import os
import sys
from pathlib import Path

import jupytext
import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient

pytestmark = pytest.mark.slow  # End to end: executes the notebooks.

COLABS = Path(__file__).resolve().parent.parent / "colabs"
NOTEBOOKS = ("01_spatial_score", "02_grpo")
PROBE = "PROBE_JSON:"
KERNEL = "spatial_jax_tests"

# Run after the notebook's own cells, in its kernel: what the assertions read.
PROBES = {
  "01_spatial_score": """
import json
print("PROBE_JSON:" + json.dumps(dict(
  mu=mu.tolist(), sigma=sigma.tolist(), num_test=len(test), step=scorer.step,
  accuracy=summary["eval"]["accuracy"], smoke=SMOKE, workdir=WORKDIR,
)))
""",
  "02_grpo": """
import json
print("PROBE_JSON:" + json.dumps(dict(
  history=history, num_images=len(roll.images), image_shape=list(roll.images.shape),
  rewards={k: np.asarray(v).tolist() for k, v in scored.rewards.items()},
  mask=np.asarray(scored.mask).tolist(), P=P, G=G, steps=t.steps, smoke=SMOKE,
)))
""",
}


def _cells(notebook) -> list[tuple[str, str]]:
  return [(cell.cell_type, cell.source.strip()) for cell in notebook.cells]


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_matches_its_jupytext_source(name):
  from_ipynb = jupytext.read(COLABS / f"{name}.ipynb")
  from_py = jupytext.read(COLABS / f"{name}.py")
  assert _cells(from_ipynb) == _cells(from_py), (
    f"colabs/{name}.ipynb is out of date: regenerate it with `jupytext --to ipynb colabs/{name}.py`"
  )
  assert len([c for c in from_py.cells if c.cell_type == "code"]) >= 5


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_notebook_is_clean(name):
  notebook = nbformat.read(COLABS / f"{name}.ipynb", as_version=4)
  nbformat.validate(notebook)
  assert notebook.metadata.kernelspec.name == "python3"
  for index, cell in enumerate(notebook.cells):
    if cell.cell_type == "code":
      assert cell.outputs == [], f"{name}.ipynb cell {index} has stored outputs"
      assert cell.execution_count is None, f"{name}.ipynb cell {index} has an execution count"


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
  """Runs both notebooks (+ their probe cells) at once, each in a fresh kernel and working
  folder with smoke settings: name -> (executed notebook, probe values, working folder), or the
  exception that stopped it (a cell that raised: `CellExecutionError` with the traceback).

  At once, because most of a smoke run is single-threaded XLA compilation: two kernels keep
  two cores busy. The kernelspec starts ipykernel with this interpreter (the venv's), not a
  `python` found on PATH.
  """
  specs = tmp_path_factory.mktemp("kernels")
  (specs / KERNEL).mkdir()
  spec = dict(
    argv=[sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
    display_name="spatial_jax tests",
    language="python",
  )
  (specs / KERNEL / "kernel.json").write_text(json.dumps(spec))
  env = dict(os.environ, SPATIAL_JAX_SMOKE="1", JAX_PLATFORMS="cpu")
  # One CPU device, as in Colab: conftest's 8 fake devices are for the sharding tests.
  flags = os.environ.get("XLA_FLAGS", "").split()
  env["XLA_FLAGS"] = " ".join(f for f in flags if "xla_force_host_platform_device_count" not in f)
  # A persistent XLA cache: SpatialScore.load reads back the scorer its training compiled.
  env.update(
    JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.mktemp("kernel_xla_cache")),
    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
    JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
  )

  async def run(name: str):
    workdir = tmp_path_factory.mktemp(name)
    notebook = nbformat.read(COLABS / f"{name}.ipynb", as_version=4)
    notebook.cells.append(nbformat.v4.new_code_cell(PROBES[name]))
    km = KernelManager(
      kernel_name=KERNEL, kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(specs)])
    )
    client = NotebookClient(
      notebook, km=km, timeout=600, resources={"metadata": {"path": str(workdir)}}
    )
    await client.async_execute(env=env)
    outputs = notebook.cells[-1].outputs
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    line = next(line for line in text.splitlines() if line.startswith(PROBE))
    return notebook, json.loads(line[len(PROBE) :]), workdir

  async def run_all():
    return await asyncio.gather(*(run(name) for name in NOTEBOOKS), return_exceptions=True)

  return dict(zip(NOTEBOOKS, asyncio.run(run_all()), strict=True))


def _result(executed, name: str):
  result = executed[name]
  if isinstance(result, BaseException):
    raise result
  return result


def _images(notebook) -> int:
  return sum(
    "image/png" in output.get("data", {})
    for cell in notebook.cells
    if cell.cell_type == "code"
    for output in cell.outputs
  )


def _finite(values) -> bool:
  return all(math.isfinite(v) for v in values)


def test_spatial_score_notebook_runs_on_smoke_settings(executed):
  notebook, probe, tmp_path = _result(executed, "01_spatial_score")
  assert probe["smoke"] is True
  assert probe["workdir"] == str(tmp_path / "colab_workdirs" / "spatial_score")
  # Chosen and rejected of each shown test pair, scored against the original prompt.
  assert len(probe["mu"]) == len(probe["sigma"]) == 2 * probe["num_test"] == 16
  assert _finite(probe["mu"]) and _finite(probe["sigma"])
  assert min(probe["sigma"]) > 0
  assert probe["step"] == 4  # reward_synthetic:smoke's steps, restored from the checkpoint.
  assert 0.0 <= probe["accuracy"] <= 1.0
  reward_dir = tmp_path / "colab_workdirs" / "spatial_score" / "reward"
  assert (reward_dir / "learning_curve.png").is_file()
  assert (tmp_path / "colab_workdirs" / "spatial_score" / "pairs" / "pairs.jsonl").is_file()
  assert _images(notebook) == 3  # Pairs, learning curve, scored pairs.


def test_grpo_notebook_runs_on_smoke_settings(executed):
  notebook, probe, _ = _result(executed, "02_grpo")
  assert probe["smoke"] is True
  P, G = probe["P"], probe["G"]
  assert len(probe["history"]) == probe["steps"] == 2
  for scalars in probe["history"]:
    assert _finite(scalars.values())
    assert scalars["train/finite"] == 1.0
    assert scalars["train/kept_fraction"] == 0.5  # Top-2 and bottom-2 of each group of 8.
    assert 0.0 <= scalars["train/reward_brightness"] <= 1.0
  assert probe["num_images"] == P * G and probe["image_shape"][1:] == [32, 32, 3]
  assert set(probe["rewards"]) == {"oracle", "oracle_soft", "brightness"}
  assert all(len(v) == P * G for v in probe["rewards"].values())
  assert [sum(row) for row in probe["mask"]] == [4] * P
  assert _images(notebook) == 3  # Two galleries and the reward curve.
