import collections
import json
import os
import socket

import numpy as np
import pytest

from spatial_jax.configs_lib import load_config
from spatial_jax.data import llm_perturb, loader, pairs
from spatial_jax.jobs import data_synthetic, pairs_generate
from spatial_jax.reward import evaluate

pytestmark = pytest.mark.slow  # End to end: pairs_generate job runs.

SMOKE_PROMPTS = 16


# -- Pure pieces --------------------------------------------------------------------------------


def test_judge_filter_on_hand_made_scores():
  chosen = [0.9, 0.5, 0.5, np.nan, 0.3, 0.50001]
  rejected = [0.1, 0.5, 0.45, 0.1, np.inf, 0.5]
  keep = pairs_generate.judge_keep(chosen, rejected, margin=0.0)
  np.testing.assert_array_equal(keep, [True, False, True, False, False, True])  # Ties lose.
  keep = pairs_generate.judge_keep(chosen, rejected, margin=0.1)
  np.testing.assert_array_equal(keep, [True, False, False, False, False, False])
  keep = pairs_generate.judge_keep(chosen, rejected, margin=-0.01)
  np.testing.assert_array_equal(keep, [True, True, True, False, False, True])
  reasons = [pairs_generate.drop_reason(c, r, 0.0) for c, r in zip(chosen, rejected, strict=True)]
  assert reasons == [None, "judge_margin", None, "judge_not_finite", "judge_not_finite", None]
  with pytest.raises(ValueError, match="two"):
    pairs_generate.judge_keep([1.0, 2.0], [1.0], 0.0)


def test_oracle_judge_keeps_rendered_pairs():
  # Renders of the synthetic world are exact: the oracle must prefer the original's render.
  config = load_config("configs/data_synthetic.py", "smoke")
  made = [data_synthetic.make_pair(config, "train", i) for i in range(4)]
  judge_config = load_config("configs/pairs_flux.py", "synthetic")
  judge = pairs_generate.make_judge(judge_config, mesh=None)
  prompts = [m["prompt"] for m in made]
  mu, sigma = judge.score(
    [m["chosen_image"] for m in made] + [m["rejected_image"] for m in made], prompts + prompts
  )
  assert sigma is None and judge.name == "oracle"
  np.testing.assert_array_equal(mu[:4], 1.0)
  assert pairs_generate.judge_keep(mu[:4], mu[4:], judge_config.filter.margin).all()


def test_describe_change_and_relation_type():
  cases = [
    ("a cat to the left of a dog", "a cat to the right of a dog", "left of -> right of"),
    ("A cup is in front of a vase.", "A cup is behind a vase.", "in front of -> behind"),
    ("a kite higher than a tree", "a kite lower than a tree", "higher than -> lower than"),
    (
      "A cat is left of a dog.",
      "A dog is left of a cat.",
      "cat is left of a dog -> dog is left of a cat",
    ),
  ]
  for prompt, perturbed, change in cases:
    assert pairs_generate.describe_change(prompt, perturbed) == change
  types = [pairs_generate.relation_type(c) for _, _, c in cases]
  assert types == ["horizontal", "depth", "vertical", "horizontal"]
  assert pairs_generate.relation_type("red -> blue") == "other"


def test_split_is_a_function_of_the_prompt_text():
  prompts = [f"prompt number {i}" for i in range(4000)]
  splits = [pairs_generate.split_of(p, 0.1) for p in prompts]
  assert 0.08 < splits.count("test") / len(prompts) < 0.12
  assert [pairs_generate.split_of(p, 0.1) for p in reversed(prompts)] == splits[::-1]
  assert {pairs_generate.split_of(p, 0.0) for p in prompts} == {"train"}
  assert pairs_generate.pair_id(3, "a") != pairs_generate.pair_id(3, "b")


def test_parse_llm_replies():
  prompt = "a cat left of a dog"
  fenced = (
    '```json\n{"perturbed_prompt": "a cat right of a dog", "relation_changed": "x -> y"}\n```'
  )
  assert llm_perturb.parse_reply(fenced, prompt) == ("a cat right of a dog", "x -> y")
  assert llm_perturb.parse_reply('{"perturbed_prompt": null}', prompt) is None
  bad = [
    "no json here",
    '{"perturbed": "x"}',
    '{"perturbed_prompt": 3}',
    '{"perturbed_prompt": "a cat left of a dog"}',
  ]
  for reply in bad:
    with pytest.raises(llm_perturb.LLMReplyError):
      llm_perturb.parse_reply(reply, prompt)
  assert llm_perturb.chat_url("http://h:1/v1/") == "http://h:1/v1/chat/completions"
  with pytest.raises(ValueError, match="not an http"):
    llm_perturb.chat_url("localhost:8000")


# -- The job ------------------------------------------------------------------------------------


class _Crash(Exception):
  pass


@pytest.fixture(scope="module")
def smoke_folder(tmp_path_factory):
  """`:smoke` built the hard way: killed after 6 rows (and a torn line), then rerun."""
  folder = str(tmp_path_factory.mktemp("pairs_smoke"))
  config = load_config("configs/pairs_flux.py", "smoke")
  add = pairs.PairsWriter.add
  calls = []

  def crashing_add(self, **kwargs):
    if len(calls) == 6:
      raise _Crash()
    calls.append(kwargs["id"])
    return add(self, **kwargs)

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(pairs.PairsWriter, "add", crashing_add)
    with pytest.raises(_Crash):
      pairs_generate.run(config, folder)
  before = {
    name: open(os.path.join(folder, name, pairs.PAIRS_FILE)).read() for name in ("", "dropped")
  }
  with open(os.path.join(folder, pairs.PAIRS_FILE), "a") as f:
    f.write('{"id": "p0000')  # A line torn by the crash.
  stats = pairs_generate.run(config, folder)
  return dict(folder=folder, config=config, first_ids=calls, before=before, stats=stats)


def test_resume_after_an_interruption_has_no_duplicates_and_no_gaps(smoke_folder):
  folder, stats = smoke_folder["folder"], smoke_folder["stats"]
  kept = pairs.read_pairs(folder)  # Validates: unique ids, every image present.
  dropped = pairs.read_pairs(os.path.join(folder, "dropped"))
  ids = [r.id for r in kept + dropped]
  assert len(ids) == len(set(ids)) == SMOKE_PROMPTS
  assert set(smoke_folder["first_ids"]) <= set(ids)
  # Rows written before the crash are untouched, the torn line is gone.
  for name, text in smoke_folder["before"].items():
    assert open(os.path.join(folder, name, pairs.PAIRS_FILE)).read().startswith(text)
  assert sum(stats["written_by_this_run"].values()) == SMOKE_PROMPTS - 6
  assert stats["kept"] == len(kept) and stats["dropped"] == {"judge_margin": len(dropped)}
  assert stats["perturbed_by_this_run"] == 0  # The first run logged every perturbation.
  log = [json.loads(line) for line in open(os.path.join(folder, "perturbations.jsonl"))]
  assert len(log) == SMOKE_PROMPTS
  # A third run has nothing to do; one with another margin is refused before writing anything.
  again = pairs_generate.run(smoke_folder["config"], folder)
  assert again["written_by_this_run"] == {} and again["kept"] == len(kept)
  changed = load_config("configs/pairs_flux.py", "smoke")
  changed.filter.margin = 0.5
  with pytest.raises(ValueError, match="margin"):
    pairs_generate.run(changed, folder)
  assert json.load(open(os.path.join(folder, "config.json")))["filter"]["margin"] == 0.0


def test_smoke_rows_record_provenance_and_judge_scores(smoke_folder):
  folder, config = smoke_folder["folder"], smoke_folder["config"]
  kept = pairs.read_pairs(folder)
  dropped = pairs.read_pairs(os.path.join(folder, "dropped"))
  assert kept and dropped  # The random judge keeps some and drops some.
  for record in kept + dropped:
    s = record.source
    assert s["model"] == "synthetic:tiny-random" and s["num_steps"] == 2 and s["seed"] == 0
    assert s["noise"]["chosen"] == s["noise"]["rejected"] == 2 * s["prompt_index"]
    assert s["guidance"] == 1.0 and "cfg_scale" in s and s["perturber"] == "rules"
    assert record.prompt != record.perturbed_prompt and " -> " in record.relation_changed
    assert record.split == pairs_generate.split_of(record.prompt, config.test_fraction)
    judge = s["judge"]
    assert judge["name"] == "spatial_score" and judge["margin"] == 0.0
    assert (judge["chosen"] - judge["rejected"] > 0) == (record in kept)
    assert ("drop_reason" in s) == (record in dropped)
  page = open(os.path.join(folder, "review.html"), encoding="utf-8").read()
  for record in kept + dropped:
    assert f'id="{record.id}"' in page
  assert "dropped/images/" in page and "<mark>" in page


def test_smoke_folder_is_what_reward_train_reads(smoke_folder):
  # The two reads reward_train makes (jobs/reward_train.py), with the smoke reward config's fields.
  folder = smoke_folder["folder"]
  reward = load_config("configs/reward_synthetic.py", "smoke")
  it = loader.make_pairs_loader(
    folder,
    split=reward.data.train_split,
    batch_size=reward.train.batch_size,
    image_size=reward.data.image_size,
    seed=0,
  )
  batch = next(it)
  assert batch["chosen"].shape == (reward.train.batch_size, 32, 32, 3)
  test = evaluate.load_eval_pairs(
    folder, reward.data.eval_split, max_pairs=0, image_size=reward.data.image_size
  )
  assert len(test) == smoke_folder["stats"]["splits"]["test"] >= 1
  assert smoke_folder["stats"]["splits"]["train"] >= 1


def test_non_spatial_prompts_are_skipped_and_counted(tmp_path, monkeypatch):
  prompts = [
    "a red circle to the left of a blue star",
    "a bowl of soup",
    "a photo of a cat next to a dog",  # Not directional: no relation to change.
    "A dog is behind a fence.",
    "two people talking",
  ]
  (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
  generated = []

  def fake_generate(config, prompts, ids, todo, perturbations, kept, dropped):
    # Stands in for the models: the test is about what reaches them and how it is counted.
    generated.append(list(todo))
    for i in todo:
      row = perturbations[ids[i]]
      kept.add(
        id=ids[i],
        prompt=prompts[i],
        perturbed_prompt=row["perturbed_prompt"],
        relation_changed=row["relation_changed"],
        chosen_image=np.zeros((8, 8, 3), np.uint8),
        rejected_image=np.ones((8, 8, 3), np.uint8),
        source=dict(change_type=row["change_type"], model="fake"),
      )
    return collections.Counter(kept=len(todo))

  monkeypatch.setattr(pairs_generate, "_generate", fake_generate)
  config = load_config("configs/pairs_flux.py", "smoke")
  config.prompts = str(tmp_path / "prompts.txt")
  config.num_prompts = 0
  stats = pairs_generate.run(config, str(tmp_path / "out"))
  assert generated == [[0, 3]]
  assert stats["kept"] == 2 and stats["dropped"] == {"no_spatial_relation": 3}
  assert stats["change_type"] == {"depth": 1, "horizontal": 1}
  page = open(tmp_path / "out" / "review.html", encoding="utf-8").read()
  assert "a bowl of soup" in page and "no_spatial_relation" in page
  again = pairs_generate.run(config, str(tmp_path / "out"))  # Skips are remembered.
  assert generated == [[0, 3]] and again["perturbed_by_this_run"] == 0
  assert again["dropped"] == {"no_spatial_relation": 3}


def test_oracle_judge_refuses_foreign_prompts_before_loading_models(tmp_path):
  (tmp_path / "p.jsonl").write_text('{"prompt": "a cat to the left of a dog"}\n')
  config = load_config("configs/pairs_flux.py", "smoke")
  config.prompts = str(tmp_path / "p.jsonl")
  config.judge.name = "oracle"
  with pytest.raises(ValueError, match="prompt 0 of .*p.jsonl.*spatial_score"):
    pairs_generate.run(config, str(tmp_path / "out"))


def test_llm_perturber_is_off_by_default_and_names_an_unreachable_endpoint(tmp_path):
  config = load_config("configs/pairs_flux.py", "smoke")
  assert (
    config.perturb.method == "rules"
    and load_config("configs/pairs_flux.py").perturb.method == "rules"
  )
  with socket.socket() as s:  # A port nothing listens on.
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  config.perturb.method = "llm"
  config.perturb.llm.endpoint = f"http://127.0.0.1:{port}/v1"
  config.perturb.llm.model = "test-model"
  config.perturb.llm.timeout_s = 2.0
  config.perturb.llm.max_retries = 0
  url = f"http://127.0.0.1:{port}/v1/chat/completions"
  with pytest.raises(llm_perturb.LLMEndpointError, match=f"{url} is unreachable"):
    pairs_generate.run(config, str(tmp_path / "out"))
  assert open(tmp_path / "out" / "perturbations.jsonl").read() == ""
  assert open(tmp_path / "out" / "pairs.jsonl").read() == ""
  config.perturb.llm.endpoint = ""
  with pytest.raises(ValueError, match="config.perturb.llm.endpoint"):
    pairs_generate.run(config, str(tmp_path / "out2"))


def test_flux_pipeline_folder_makes_pairs(tmp_path, monkeypatch):
  # The real-world path on a tiny random diffusers FLUX folder (guidance embedding, VAE decode),
  # sharded FSDP over the 8 test devices as configs/pairs_flux.py does for FLUX.1-dev.
  import importlib.util

  path = os.path.join(os.path.dirname(__file__), "..", "diffusion", "tiny_flux_pipeline.py")
  spec = importlib.util.spec_from_file_location("tiny_flux_pipeline", path)
  tiny = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(tiny)
  tiny.diffusers_pipeline(guidance_embeds=True).save_pretrained(str(tmp_path / "flux"))
  prompts = ["a red cube left of a blue sphere", "the blue sphere above two green cats", "a cube"]
  (tmp_path / "p.jsonl").write_text("".join(json.dumps(dict(prompt=p)) + "\n" for p in prompts))

  def brightness_judge(config, mesh):  # Stands in for SpatialScore (tested in reward/).
    score = lambda images, _: (np.array([im.mean() for im in images]), None)  # noqa: E731
    return pairs_generate.Judge("spatial_score", "brightness", score)

  monkeypatch.setattr(pairs_generate, "make_judge", brightness_judge)
  config = load_config("configs/pairs_flux.py")
  assert config.mesh[1] == ["fsdp", -1]
  config.model.pipeline = str(tmp_path / "flux")
  config.prompts = str(tmp_path / "p.jsonl")
  config.data.image_size = 32
  config.model.max_sequence_length = 16
  config.model.dtype = config.model.param_dtype = "float32"
  config.sampling.num_steps = 2
  config.filter.margin = -1e9  # Keep every pair: this test is about generation.
  stats = pairs_generate.run(config, str(tmp_path / "out"))
  assert stats["kept"] == 2 and stats["dropped"] == {"no_spatial_relation": 1}
  for record in pairs.read_pairs(tmp_path / "out"):
    assert record.source["model"] == str(tmp_path / "flux")
    assert record.source["guidance"] == 3.5 and record.source["num_steps"] == 2
    chosen = pairs.load_rgb(tmp_path / "out" / record.chosen)
    rejected = pairs.load_rgb(tmp_path / "out" / record.rejected)
    assert chosen.shape == (32, 32, 3) and chosen.std() > 0
    assert (chosen != rejected).any()  # Same noise, different prompts.
    judge = record.source["judge"]
    assert judge["chosen"] == pytest.approx(chosen.mean(), abs=1e-3)
