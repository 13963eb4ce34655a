"""Job `pairs_generate`: adversarial preference pairs for real prompts, made with FLUX and judged.

The paper's construction for any prompt list: for each prompt (a text file, one per line, or jsonl
with a `prompt` field; without one, prompts of the synthetic scene grammar)

1. perturb: change exactly one spatial relation, with the rule-based `perturb.perturb_prompt` or,
   when `perturb.method='llm'`, an OpenAI-compatible chat endpoint (`llm_perturb`). Prompts
   without a spatial relation are skipped and counted.
2. generate: one image for the original prompt (chosen) and one for the perturbed prompt
   (rejected) with the configured generator (a diffusers FLUX folder, a flux_sft export, or a
   random tiny generator for smoke runs), batched and sharded over the mesh. Deterministic: the
   Euler ODE from noise drawn from (seed, prompt index); by default both images of a pair start
   from the same noise, so that they differ where their prompts differ.
3. judge: SpatialScore (or the scene oracle in the synthetic world) scores BOTH images against the
   ORIGINAL prompt; a pair is kept only when the chosen image beats the rejected one by more than
   `filter.margin`.

Writes into the workdir, itself a pairs folder (`reward_train` with `data.pairs=<workdir>`):

  pairs.jsonl, images/  the kept pairs (the `spatial_jax.data.pairs` format); each row's `source`
                        holds the model, seeds, steps, guidance, cfg scale, perturber, change type
                        and the judge's scores (`source.judge`)
  dropped/              a pairs folder of the pairs the judge dropped (`source.drop_reason`); for
                        review only, NOT training data (chosen there did not win)
  perturbations.jsonl   each prompt's perturbation, or why it has none: the resume log of step 1
                        (an LLM is asked once per prompt)
  stats.json            kept and dropped counts by reason, splits, change types, judge scores
  review.html           a static gallery of the kept and dropped pairs for a human pass
  generate.json         the settings that decide what a pair looks like; a rerun must match them

Resumable: a pair's id derives from its prompt's index and text; a rerun skips prompts already in
pairs.jsonl, dropped/ or (without a relation) perturbations.jsonl and makes the rest, so an
interrupted build continues without duplicates or gaps (`pairs.PairsWriter` writes rows whole).

Several processes (`jax.distributed`): process 0 perturbs, judges and writes the one folder;
every process takes part in sampling each call (its batch split over the whole mesh) and in a
judge that runs on the devices (SpatialScore). The pairs are those one process would write. A
crash of any process stops the others (jax's coordination service); rerunning the command
resumes from process 0's files.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import os
import re
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from absl import logging

from spatial_jax import metrics
from spatial_jax.data import pairs, perturb, scenes
from spatial_jax.data.prompts import read_prompts, synthetic_prompts

NO_RELATION = "no_spatial_relation"
PERTURB_FAILED = "perturb_failed"
JUDGE_MARGIN = "judge_margin"
JUDGE_NOT_FINITE = "judge_not_finite"
DROPPED_DIR = "dropped"
PERTURBATIONS_FILE = "perturbations.jsonl"
SETTINGS_FILE = "generate.json"
REVIEW_FILE = "review.html"
JUDGES = ("spatial_score", "oracle")
PERTURBERS = ("rules", "llm")

# ---------------------------------------------------------------------------------------------
# Pure pieces: ids, splits, the judge filter, describing a change.


def pair_id(index: int, prompt: str) -> str:
  """The id of prompt `index`; the text hash makes a changed prompt file give new ids."""
  return f"p{index:06d}-{hashlib.sha1(prompt.encode('utf-8')).hexdigest()[:8]}"


def split_of(prompt: str, test_fraction: float) -> str:
  """ "test" for about `test_fraction` of prompts, decided by the text alone: a repeated prompt
  always lands in the same split (no train/test leak), whatever the order or the batch."""
  u = int.from_bytes(hashlib.sha1(f"split:{prompt}".encode()).digest()[:8], "big") / 2.0**64
  return "test" if u < test_fraction else "train"


def judge_keep(chosen: Sequence[float], rejected: Sequence[float], margin: float) -> np.ndarray:
  """Whether each pair is kept: its chosen score beats its rejected score by MORE than `margin`.

  Both scores are the judge's on the original prompt. A non-finite score never keeps a pair.
  """
  c = np.asarray(chosen, np.float64)
  r = np.asarray(rejected, np.float64)
  if c.shape != r.shape or c.ndim != 1:
    raise ValueError(f"judge_keep needs two (N,) score arrays, got {c.shape} and {r.shape}")
  with np.errstate(invalid="ignore"):
    return np.isfinite(c) & np.isfinite(r) & (c - r > margin)


def drop_reason(chosen: float, rejected: float, margin: float) -> str | None:
  """None when the pair is kept (`judge_keep`), else why it is dropped."""
  if not (np.isfinite(chosen) and np.isfinite(rejected)):
    return JUDGE_NOT_FINITE
  return None if judge_keep([chosen], [rejected], margin)[0] else JUDGE_MARGIN


_TOKEN_RE = re.compile(r"[A-Za-z0-9]+(?:['’-][A-Za-z0-9]+)*|[^\sA-Za-z0-9]")
# Words that complete a relation phrase after its changed word ("left" -> "left of").
_RELATION_TAILS = frozenset({"of", "than"})
_RELATION_WORD_TYPES = {
  **dict.fromkeys(("left", "right"), "horizontal"),
  **dict.fromkeys(
    "above below top bottom over under higher lower beneath underneath atop".split(), "vertical"
  ),
  **dict.fromkeys(("front", "behind", "foreground", "background"), "depth"),
}


def describe_change(prompt: str, perturbed: str) -> str:
  """ "before -> after" for the span where two prompts differ, e.g. "left of -> right of"; a swap
  gives the whole clause ("a cat left of a dog -> a dog left of a cat")."""
  a, b = list(_TOKEN_RE.finditer(prompt)), list(_TOKEN_RE.finditer(perturbed))
  ta, tb = [m.group() for m in a], [m.group() for m in b]
  start = 0
  while start < min(len(ta), len(tb)) and ta[start] == tb[start]:
    start += 1
  end = 0  # Common suffix length, not overlapping the common prefix.
  while end < min(len(ta), len(tb)) - start and ta[-1 - end] == tb[-1 - end]:
    end += 1
  if start == len(ta) and start == len(tb):
    return ""
  if end and ta[-end].lower() in _RELATION_TAILS:
    end -= 1  # "right" -> "right of": the relation phrase reads whole.

  def span(matches: list[re.Match], text: str) -> str:
    stop = len(matches) - end
    return text[matches[start].start() : matches[stop - 1].end()] if stop > start else ""

  return f"{span(a, prompt)} -> {span(b, perturbed)}"


def relation_type(change: str) -> str:
  """ "horizontal", "vertical" or "depth" for the first relation word of a change, else "other"."""
  for token in _TOKEN_RE.findall(change.partition(" -> ")[0].lower()):
    if token in _RELATION_WORD_TYPES:
      return _RELATION_WORD_TYPES[token]
  return "other"


# ---------------------------------------------------------------------------------------------
# Step 1: perturbation.


@dataclasses.dataclass(frozen=True)
class Perturbation:
  """One prompt's perturbation: `perturbed_prompt` None means skipped, with `reason`."""

  perturbed_prompt: str | None
  relation_changed: str = ""
  reason: str | None = None
  detail: str = ""  # E.g. an LLM's unusable answer, for review.


def rule_perturbation(prompt: str, seed: int) -> Perturbation:
  """The rule-based perturbation (`perturb.perturb_prompt`) with its change described."""
  perturbed = perturb.perturb_prompt(prompt, seed=seed)
  if perturbed is None:
    return Perturbation(None, reason=NO_RELATION)
  if perturbed == prompt:  # Defensive: a pair of equal prompts would teach nothing.
    return Perturbation(None, reason=PERTURB_FAILED, detail="unchanged")
  return Perturbation(perturbed, describe_change(prompt, perturbed))


def make_perturber(config: Any) -> tuple[str, Callable[[str, int], Perturbation]]:
  """(name recorded in each row, fn(prompt, seed) -> Perturbation) for `config.perturb`."""
  method = config.perturb.method
  if method == "rules":
    return "rules", rule_perturbation
  if method != "llm":
    raise ValueError(f"config.perturb.method={method!r}; use one of {PERTURBERS}")
  from spatial_jax.data import llm_perturb  # Only when asked for: it talks to the network.

  llm = llm_perturb.LLMPerturber.from_config(config.perturb.llm)

  def perturb_with_llm(prompt: str, seed: int) -> Perturbation:
    del seed  # The server samples; temperature 0 is as deterministic as it gets.
    try:
      answer = llm(prompt)
    except llm_perturb.LLMReplyError as e:
      return Perturbation(None, reason=PERTURB_FAILED, detail=str(e)[:500])
    if answer is None:
      return Perturbation(None, reason=NO_RELATION)
    perturbed, change = answer
    return Perturbation(perturbed, change or describe_change(prompt, perturbed))

  return llm.name, perturb_with_llm


class JsonlLog:
  """An append-only JSON-lines file of objects keyed by `id`; each line is written whole and
  fsynced, and a torn last line (an interrupted write) is dropped on open."""

  def __init__(self, path: str):
    self.path = path
    self.rows: dict[str, dict[str, Any]] = {}
    if os.path.exists(path):
      with open(path, "rb") as f:
        data = f.read()
      lines = data.split(b"\n")
      if lines and lines[-1]:  # No final newline: keep the line only if it parses whole.
        try:
          json.loads(lines[-1])
          data += b"\n"
        except ValueError:
          logging.warning("%s: dropping a torn last line left by an interrupted write", path)
          data = data[: len(data) - len(lines[-1])]
        with open(path, "wb") as f:
          f.write(data)
          os.fsync(f.fileno())
      for number, line in enumerate(data.split(b"\n"), 1):
        if line.strip():
          try:
            row = json.loads(line)
          except ValueError as e:
            raise ValueError(f"{path}:{number}: malformed JSON ({e})") from None
          self.rows[row["id"]] = row
    self._file = open(path, "ab")

  def add(self, row: dict[str, Any]) -> None:
    self._file.write((json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8"))
    self._file.flush()
    os.fsync(self._file.fileno())
    self.rows[row["id"]] = row

  def close(self) -> None:
    self._file.close()

  def __enter__(self) -> JsonlLog:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def _perturb_seed(seed: int, pid: str) -> int:
  return int.from_bytes(hashlib.sha1(f"{seed}:{pid}".encode()).digest()[:4], "big")


def _perturb_pending(
  config: Any, prompts: list[str], ids: list[str], todo: list[int], log: JsonlLog
) -> int:
  """Perturbs the prompts of `todo` not yet in `log`; returns how many were asked."""
  missing = [i for i in todo if ids[i] not in log.rows]
  if not missing:
    return 0
  name, fn = make_perturber(config)
  progress = metrics.Progress(
    len(missing), every_secs=config.log_every_secs, name="perturb", unit="prompts"
  )
  for done, i in enumerate(missing, 1):
    seed = _perturb_seed(config.seed, ids[i])
    result = fn(prompts[i], seed)
    change = result.relation_changed
    log.add(
      dict(
        id=ids[i],
        index=i,
        prompt=prompts[i],
        perturber=name,
        perturb_seed=seed,
        perturbed_prompt=result.perturbed_prompt,
        relation_changed=change,
        change_type=relation_type(change) if result.perturbed_prompt else None,
        reason=result.reason,
        detail=result.detail,
      )
    )
    progress.update(done)
  return len(missing)


# ---------------------------------------------------------------------------------------------
# Steps 2 and 3: generation and the judge.


@dataclasses.dataclass
class Judge:
  """Scores images against prompts: `score(images, prompts) -> (mu, sigma or None)`."""

  name: str
  model: str
  score: Callable[[list[np.ndarray], list[str]], tuple[np.ndarray, np.ndarray | None]]
  on_mesh: bool = False  # Runs on the devices: every process of a multi-process run calls it.


def make_judge(config: Any, mesh: Any) -> Judge:
  """The judge `config.judge` names (SpatialScore or the scene oracle)."""
  j = config.judge
  if j.name == "oracle":
    from spatial_jax.data import oracle

    def oracle_score(images, prompts):
      scores = [oracle.score_prompt(im, p).fraction for im, p in zip(images, prompts, strict=True)]
      return np.asarray(scores, np.float32), None

    return Judge("oracle", "oracle", oracle_score)  # On the host: process 0 alone judges.
  if j.name != "spatial_score":
    raise ValueError(f"config.judge.name={j.name!r}; use one of {JUDGES}")
  from spatial_jax.reward.inference import SpatialScore  # Lazy: the Qwen stack.

  if j.spatial_score:
    model = SpatialScore.load(j.spatial_score, mesh=mesh, batch_size=j.batch_size)
    source = j.spatial_score
  elif j.tiny_spatial_score:
    from spatial_jax import configs_lib

    logging.warning("config.judge has no SpatialScore path: a random tiny one (smoke runs).")
    tiny = configs_lib.load_config("configs/reward_synthetic.py", "smoke")
    tiny.seed = config.seed
    model = SpatialScore.from_config(tiny, mesh=mesh, batch_size=j.batch_size)
    source = "spatial_score:tiny-random"
  else:
    raise ValueError(
      "config.judge.name='spatial_score' needs config.judge.spatial_score (a reward_train "
      "workdir or a SpatialScore export); in the synthetic world config.judge.name='oracle' works "
      "without one."
    )
  return Judge(
    "spatial_score", source, lambda images, prompts: model.score(images, prompts), on_mesh=True
  )


def _check_oracle_prompts(prompts: list[str], todo: list[int], where: str) -> None:
  """The oracle reads the scene grammar only: fail before any model loads, naming the prompt."""
  for i in todo:
    try:
      scenes.parse_prompt(prompts[i])
    except ValueError as e:
      raise ValueError(
        f"config.judge.name='oracle' reads prompts of the synthetic scene grammar only, but "
        f"prompt {i} of {where} is not one ({e}): {prompts[i]!r}. Use "
        "config.judge.name='spatial_score' for real prompts."
      ) from None


def _num_relations(prompt: str) -> int | None:
  """Relations of a scene-grammar prompt (reward_eval splits short / long by it), else None."""
  try:
    return len(scenes.parse_prompt(prompt).relations)
  except ValueError:
    return None


def _noise_index(index: int, rejected: bool, shared: bool) -> int:
  """The noise of an image is `normal(fold_in(key(seed), k))` with this k."""
  return 2 * index + (1 if rejected and not shared else 0)


def _generate(
  config: Any,
  prompts: list[str],
  ids: list[str],
  todo: list[int],
  perturbations: dict[str, dict[str, Any]],
  kept: pairs.PairsWriter | None,
  dropped: pairs.PairsWriter | None,
) -> collections.Counter:
  """Generates, judges and writes the pairs of `todo`; returns the written counts by outcome.

  Without writers (the other processes of a multi-process run) it takes part in the sampling
  (and a judge on the mesh) and writes nothing: process 0 holds every image and writes."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from spatial_jax import sharding
  from spatial_jax.diffusion import generator as generator_lib
  from spatial_jax.diffusion import text_to_image
  from spatial_jax.diffusion.schedule import FlowMatchSchedule

  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.resolve_rules(config.sharding_rules)
  policy = text_to_image.load_text_to_image(config, mesh, rules, add_lora=False)
  judge = make_judge(config, mesh)
  graphdef, state = nnx.split(policy.transformer)
  sigmas = FlowMatchSchedule().sigmas(config.sampling.num_steps, policy.geo.image_seq_len)
  # The ODE runs jitted; decoding stays outside that jit because a diffusers pipeline's decode
  # enters its own mesh (`jax.set_mesh`), which jax refuses inside a jit. It is jitted itself.
  sample = jax.jit(text_to_image.make_ode_sampler(graphdef, policy, jnp.asarray(sigmas)))
  decode = policy.decode
  # Every call has one padded size (one compiled program), split evenly over the batch shards.
  shards = sharding.batch_shard_count(mesh, rules)
  call_size = -(-max(2, config.batch_size) // shards) * shards
  per_call = call_size // 2
  shared = bool(config.sampling.shared_noise)
  base_key = jax.random.key(config.seed)
  margin = float(config.filter.margin)
  logging.info(
    "Generating %d pairs with %s (%d images per call over %d shards), judge %s",
    len(todo),
    policy.source,
    call_size,
    shards,
    judge.model,
  )

  def put(x):
    return sharding.place(x, sharding.data_sharding(mesh, rules, np.ndim(x)))

  written: collections.Counter = collections.Counter()
  progress = metrics.Progress(
    len(todo), every_secs=config.log_every_secs, name="pairs_generate", unit="pairs"
  )
  for first in range(0, len(todo), per_call):
    group = todo[first : first + per_call]
    rows = [perturbations[ids[i]] for i in group]
    texts = [prompts[i] for i in group] + [r["perturbed_prompt"] for r in rows]
    noise_ks = [_noise_index(i, False, shared) for i in group]
    noise_ks += [_noise_index(i, True, shared) for i in group]
    pad = call_size - len(texts)
    texts += [texts[-1]] * pad
    noise_ks += [noise_ks[-1]] * pad
    with sharding.use_mesh(mesh, rules):
      embeds, pooled = policy.encode(texts)
      noise = jnp.stack(
        [jax.random.normal(jax.random.fold_in(base_key, k), policy.latent_shape) for k in noise_ks]
      )
      latents = sample(state, nnx.State({}), put(embeds), put(pooled), put(noise))
    images = generator_lib.unit_to_uint8(decode(latents), policy.source)[: 2 * len(group)]
    chosen, rejected = images[: len(group)], images[len(group) :]
    originals = [prompts[i] for i in group]
    if kept is None:  # Another process: its part of the mesh's work only.
      if judge.on_mesh:
        judge.score(list(chosen) + list(rejected), originals + originals)
      continue
    mu, sigma = judge.score(list(chosen) + list(rejected), originals + originals)
    mu = np.asarray(mu, np.float64)
    for j, (i, row) in enumerate(zip(group, rows, strict=True)):
      score_c, score_r = float(mu[j]), float(mu[len(group) + j])
      verdict = dict(name=judge.name, model=judge.model, chosen=score_c, rejected=score_r)
      if sigma is not None:
        verdict.update(chosen_sigma=float(sigma[j]), rejected_sigma=float(sigma[len(group) + j]))
      verdict["margin"] = margin
      source = dict(
        generator="pairs_generate",
        model=policy.source,
        seed=int(config.seed),
        noise=dict(chosen=noise_ks[j], rejected=noise_ks[len(group) + j]),
        num_steps=int(config.sampling.num_steps),
        guidance=policy.guidance,
        cfg_scale=policy.cfg_scale,
        image_size=int(config.data.image_size),
        prompt_index=i,
        perturber=row["perturber"],
        perturb_seed=row["perturb_seed"],
        change_type=row["change_type"],
        judge=verdict,
      )
      relations = _num_relations(prompts[i])
      if relations is not None:
        source["num_relations"] = relations
      reason = drop_reason(score_c, score_r, margin)
      if reason is not None:
        source["drop_reason"] = reason
      writer = kept if reason is None else dropped
      writer.add(
        id=ids[i],
        prompt=prompts[i],
        perturbed_prompt=row["perturbed_prompt"],
        relation_changed=row["relation_changed"],
        chosen_image=chosen[j],
        rejected_image=rejected[j],
        split=split_of(prompts[i], config.test_fraction),
        source=source,
      )
      written["kept" if reason is None else reason] += 1
    progress.update(first + len(group))
  return written


# ---------------------------------------------------------------------------------------------
# Several processes: process 0 perturbs, judges and writes; every process samples its share.


def _share_todo(todo: list[int]) -> list[int]:
  """Process 0's prompts to generate, on every process (the others wait here while process 0
  perturbs: its files then hold every perturbation they read)."""
  import jax

  if jax.process_count() == 1:
    return todo
  from jax.experimental import multihost_utils

  n = int(multihost_utils.broadcast_one_to_all(np.int32(len(todo))))
  if n == 0:
    return []
  mine = np.asarray(todo if jax.process_index() == 0 else np.zeros(n), np.int32)
  return [int(i) for i in multihost_utils.broadcast_one_to_all(mine)]


def _follow(config: Any, workdir: str, prompts: list[str], ids: list[str]) -> dict[str, Any]:
  """A process other than 0: samples its part of every call of process 0's run."""
  import jax

  todo = _share_todo([])
  if todo:
    perturbations = {}
    with open(os.path.join(workdir, PERTURBATIONS_FILE), encoding="utf-8") as f:
      for line in f:
        if line.strip():
          row = json.loads(line)
          perturbations[row["id"]] = row
    _generate(config, prompts, ids, todo, perturbations, None, None)
  logging.info("Process %d sampled its share; process 0 writes %s", jax.process_index(), workdir)
  return {}


# ---------------------------------------------------------------------------------------------
# The job.


def load_prompts(config: Any) -> tuple[list[str], str]:
  """The prompt list (`config.prompts`, or drawn from the scene grammar) and where it is from."""
  if config.prompts:
    prompts = read_prompts(config.prompts)
    where = config.prompts
  elif config.model.pipeline:
    raise ValueError(
      "config.prompts is empty: set it to a prompt file (one per line, or jsonl with a 'prompt' "
      "field); the scene grammar's prompts are for the synthetic world only."
    )
  else:
    if config.num_prompts <= 0:
      raise ValueError("config.num_prompts must be > 0 when prompts are drawn from the grammar")
    prompts = synthetic_prompts(config.num_prompts, (config.seed, 2), **dict(config.data.synthetic))
    where = "the scene grammar"
  if config.num_prompts > 0:
    prompts = prompts[: config.num_prompts]
  return prompts, where


def _settings(config: Any) -> dict[str, Any]:
  """What decides how pair i looks; a rerun into the same folder must not change it."""
  m = config.model
  model = dict(pipeline=m.pipeline, generator=m.generator)
  if not m.pipeline and not m.generator:
    model["tiny"] = m.tiny.to_dict()
  settings = dict(
    prompts=config.prompts,
    seed=config.seed,
    test_fraction=config.test_fraction,
    perturb=config.perturb.method,
    llm_model=config.perturb.llm.model if config.perturb.method == "llm" else None,
    model=model,
    image_size=config.data.image_size,
    synthetic=config.data.synthetic.to_dict(),
    sampling=config.sampling.to_dict(),
    judge=dict(
      name=config.judge.name,
      spatial_score=config.judge.spatial_score,
      tiny_spatial_score=config.judge.tiny_spatial_score,
    ),
    margin=config.filter.margin,
  )
  return json.loads(json.dumps(settings))  # Tuples -> lists, as they read back.


def _check_settings(config: Any, workdir: str) -> None:
  settings = _settings(config)
  path = os.path.join(workdir, SETTINGS_FILE)
  if os.path.exists(path):
    with open(path) as f:
      recorded = json.load(f)
    differ = {k: (recorded.get(k), v) for k, v in settings.items() if recorded.get(k) != v}
    if differ:
      raise ValueError(
        f"{workdir} holds pairs made with other settings (recorded -> now: {differ}); use a new "
        f"workdir or the recorded values ({path})."
      )
  metrics.write_summary(workdir, settings, name=SETTINGS_FILE)


def _statistics(
  kept: list[pairs.PairRecord], dropped: list[pairs.PairRecord], log: JsonlLog
) -> dict[str, Any]:
  """Counts of everything in the folder (all runs), by outcome, split and change type."""
  info = lambda r: r.source if isinstance(r.source, dict) else {}  # noqa: E731
  reasons = collections.Counter(r["reason"] for r in log.rows.values() if not r["perturbed_prompt"])
  reasons.update(info(r).get("drop_reason", "unknown") for r in dropped)
  stats: dict[str, Any] = dict(
    prompts=len(log.rows),
    kept=len(kept),
    dropped=dict(sorted(reasons.items())),
    dropped_total=sum(reasons.values()),
    splits=dict(sorted(collections.Counter(r.split_name for r in kept).items())),
    change_type=dict(
      sorted(collections.Counter(str(info(r).get("change_type")) for r in kept).items())
    ),
  )
  verdicts = [(info(r).get("judge"), info(r).get("model")) for r in kept + dropped]
  verdicts = [(v, model) for v, model in verdicts if v]
  if verdicts:
    chosen = np.array([v["chosen"] for v, _ in verdicts], np.float64)
    rejected = np.array([v["rejected"] for v, _ in verdicts], np.float64)
    last, model = verdicts[-1]
    stats["model"] = model
    stats["judge"] = dict(
      name=last["name"],
      model=last["model"],
      margin=last["margin"],
      judged=len(verdicts),
      kept_fraction=len(kept) / len(verdicts),
      mean_chosen=float(np.nanmean(chosen)),
      mean_rejected=float(np.nanmean(rejected)),
      mean_chosen_minus_rejected=float(np.nanmean(chosen - rejected)),
    )
  return stats


def run(config: Any, workdir: str) -> dict[str, Any]:
  """Builds (or continues) the pairs folder in `workdir`; returns the statistics (stats.json)."""
  import jax

  if not 0.0 <= config.test_fraction < 1.0:
    raise ValueError(f"config.test_fraction must be in [0, 1), got {config.test_fraction}")
  if config.judge.name not in JUDGES:
    raise ValueError(f"config.judge.name={config.judge.name!r}; use one of {JUDGES}")
  if config.perturb.method not in PERTURBERS:
    raise ValueError(f"config.perturb.method={config.perturb.method!r}; use one of {PERTURBERS}")
  start = time.time()
  prompts, where = load_prompts(config)
  ids = [pair_id(i, p) for i, p in enumerate(prompts)]
  if jax.process_index() > 0:
    return _follow(config, workdir, prompts, ids)
  os.makedirs(workdir, exist_ok=True)
  _check_settings(config, workdir)  # Before anything is written into an existing folder.
  metrics.write_config_json(workdir, config)

  written: collections.Counter = collections.Counter()
  # The kept folder's writer is opened first: its lock keeps a second job out of the workdir.
  with (
    pairs.PairsWriter(workdir) as kept,
    pairs.PairsWriter(os.path.join(workdir, DROPPED_DIR)) as dropped,
    JsonlLog(os.path.join(workdir, PERTURBATIONS_FILE)) as log,
  ):
    todo = [i for i, pid in enumerate(ids) if not (kept.has(pid) or dropped.has(pid))]
    # Before any model loads: an unreachable LLM endpoint fails in seconds, not after minutes.
    asked = _perturb_pending(config, prompts, ids, todo, log)
    todo = [i for i in todo if log.rows[ids[i]]["perturbed_prompt"]]
    if todo and config.judge.name == "oracle":
      _check_oracle_prompts(prompts, todo, where)
    todo = _share_todo(todo)
    if todo:
      written = _generate(config, prompts, ids, todo, log.rows, kept, dropped)
    kept_records = pairs.read_pairs(workdir)
    dropped_records = pairs.read_pairs(os.path.join(workdir, DROPPED_DIR))
    stats = _statistics(kept_records, dropped_records, log)
    skipped = [r for r in log.rows.values() if not r["perturbed_prompt"]]

  from spatial_jax.data import review_html

  review_html.write_review(
    os.path.join(workdir, REVIEW_FILE),
    kept=kept_records,
    dropped=dropped_records,
    dropped_dir=DROPPED_DIR,
    skipped=skipped,
    stats=stats,
    max_pairs=config.review.max_pairs,
  )
  stats.update(
    prompts_selected=len(prompts),
    perturbed_by_this_run=asked,
    written_by_this_run=dict(sorted(written.items())),
    seconds=round(time.time() - start, 2),
  )
  metrics.write_summary(workdir, stats, name="stats.json")
  logging.info(
    "%s: %d pairs kept, dropped %s (this run wrote %s) in %.1f s",
    workdir,
    stats["kept"],
    stats["dropped"],
    dict(written),
    stats["seconds"],
  )
  return stats
