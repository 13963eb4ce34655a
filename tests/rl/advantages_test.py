"""Top-k group advantages against an independent numpy reference (grpo.md §1.5, §2.1, §4)."""

import functools

import jax
import numpy as np
import pytest

from spatial_jax.rl import advantages as adv_lib

EPS = 1e-4


def _np_advantages(rewards, k, stats, std, eps=EPS, clip=5.0):
  """Loop-per-group reference; ranks by Python's sort on (reward, index) to break ties."""
  rewards = np.asarray(rewards, np.float64)
  num_prompts, num_samples = rewards.shape
  mask = np.zeros(rewards.shape, bool)
  for p in range(num_prompts):
    order = sorted(range(num_samples), key=lambda i, p=p: (rewards[p, i], i))
    kept = order if k is None else order[:k] + order[num_samples - k :]
    mask[p, kept] = True
  stat_mask = mask if stats == "kept" else np.ones_like(mask)
  global_std = np.std(rewards[stat_mask])
  out = np.zeros_like(rewards)
  for p in range(num_prompts):
    group = rewards[p, stat_mask[p]]
    scale = np.std(group) if std == "group" else global_std
    out[p] = (rewards[p] - group.mean()) / (scale + eps)
  if clip is not None:
    out = np.clip(out, -clip, clip)
  return np.where(mask, out, 0.0), mask


@pytest.mark.parametrize("stats", ["kept", "group"])
@pytest.mark.parametrize("std", ["group", "global"])
@pytest.mark.parametrize("k", [None, 1, 3, 4])
def test_matches_numpy(stats, std, k):
  rewards = np.random.default_rng(0).normal(size=(5, 8)).astype(np.float32) * 3.0 + 1.0
  got, mask = adv_lib.topk_group_advantages(rewards, k, stats=stats, std=std)
  want, want_mask = _np_advantages(rewards, k, stats, std)
  np.testing.assert_array_equal(mask, want_mask)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("stats", ["kept", "group"])
def test_ties_match_numpy_and_are_disjoint(stats):
  # Integer rewards in {0, 1, 2} tie a lot; the all-equal row must still keep 2k distinct samples.
  rewards = np.random.default_rng(1).integers(0, 3, size=(6, 10)).astype(np.float32)
  rewards[0] = 1.0
  got, mask = adv_lib.topk_group_advantages(rewards, 3, stats=stats)
  want, want_mask = _np_advantages(rewards, 3, stats, "group")
  np.testing.assert_array_equal(mask, want_mask)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  # Ties break by index: lowest indices are "lowest", highest indices are "highest".
  np.testing.assert_array_equal(mask[0], [True] * 3 + [False] * 4 + [True] * 3)
  np.testing.assert_array_equal(got[0], np.zeros(10))


@pytest.mark.parametrize("std", ["group", "global"])
def test_k_none_is_flow_grpo_per_prompt_normalisation(std):
  rewards = np.random.default_rng(2).uniform(size=(4, 6)).astype(np.float64)
  scale = rewards.std(axis=1, keepdims=True) if std == "group" else rewards.std()
  want = (rewards - rewards.mean(axis=1, keepdims=True)) / (scale + EPS)
  for stats in ("kept", "group"):
    got, mask = adv_lib.topk_group_advantages(rewards, None, stats=stats, std=std)
    assert mask.all()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  # 2k == G keeps every sample as well.
  got, mask = adv_lib.topk_group_advantages(rewards, 3, std=std)
  assert mask.all()
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("k", [1, 2, 5])
def test_mask_keeps_exactly_2k_extremes_and_zeroes_the_rest(k):
  rewards = np.random.default_rng(3).normal(size=(7, 12)).astype(np.float32)
  got, mask = adv_lib.topk_group_advantages(rewards, k)
  assert mask.dtype == bool and mask.shape == rewards.shape
  np.testing.assert_array_equal(mask.sum(axis=1), np.full(7, 2 * k))
  np.testing.assert_array_equal(np.asarray(got)[~np.asarray(mask)], 0.0)
  # Every kept reward is >= every dropped reward above the median, and vice versa below it.
  order = np.argsort(rewards, axis=1)
  for p in range(7):
    assert set(np.flatnonzero(mask[p])) == set(order[p, :k]) | set(order[p, -k:])


def test_kept_statistics_on_a_hand_example():
  # Kept = {0, 1, 9, 10}: mean 5, std sqrt(((25 + 16 + 16 + 25) / 4)) = sqrt(20.5).
  rewards = np.array([[0.0, 1.0, 4.0, 5.0, 6.0, 9.0, 10.0]])
  got, _ = adv_lib.topk_group_advantages(rewards, 2, stats="kept", clip=None)
  s = np.sqrt(20.5) + EPS
  np.testing.assert_allclose(got[0], [-5 / s, -4 / s, 0, 0, 0, 4 / s, 5 / s], rtol=1e-6)
  # Normalise-then-select uses all 7: mean 5, std sqrt((25 + 16 + 1 + 0 + 1 + 16 + 25) / 7) = sqrt(12).
  got, _ = adv_lib.topk_group_advantages(rewards, 2, stats="group", clip=None)
  s = np.sqrt(12.0) + EPS
  np.testing.assert_allclose(got[0], [-5 / s, -4 / s, 0, 0, 0, 4 / s, 5 / s], rtol=1e-6)


def test_clip():
  # One outlier in 11 samples reaches (10 - 10/11) / std = sqrt(10) ~ 3.16 standard deviations.
  rewards = np.zeros((2, 11), np.float32)
  rewards[:, 0] = 10.0
  rewards[1] *= -1.0
  got, _ = adv_lib.topk_group_advantages(rewards, None, clip=1.5)
  np.testing.assert_allclose(got[:, 0], [1.5, -1.5])
  unclipped, _ = adv_lib.topk_group_advantages(rewards, None, clip=None)
  np.testing.assert_allclose(
    unclipped[0, 0], np.sqrt(10.0) * (1 - 1e-4 / np.std(rewards[0])), rtol=1e-4
  )
  np.testing.assert_allclose(got[:, 1:], unclipped[:, 1:])


def test_invalid_arguments():
  rewards = np.zeros((2, 8))
  with pytest.raises(ValueError, match="2 \\* k <= G"):
    adv_lib.topk_group_advantages(rewards, 5)
  with pytest.raises(ValueError, match="1 <= k"):
    adv_lib.topk_group_advantages(rewards, 0)
  with pytest.raises(ValueError, match="stats"):
    adv_lib.topk_group_advantages(rewards, 2, stats="all")
  with pytest.raises(ValueError, match="std"):
    adv_lib.topk_group_advantages(rewards, 2, std="batch")
  with pytest.raises(ValueError, match="shape"):
    adv_lib.topk_group_advantages(np.zeros(8), 2)


def test_jit_matches_eager():
  rewards = np.random.default_rng(4).normal(size=(3, 24)).astype(np.float32)
  fn = jax.jit(
    functools.partial(adv_lib.topk_group_advantages, stats="kept", std="global"),
    static_argnums=1,
  )
  got, mask = fn(rewards, 6)
  want, want_mask = adv_lib.topk_group_advantages(rewards, 6, stats="kept", std="global")
  np.testing.assert_array_equal(mask, want_mask)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_group_pair_agreement_counts_ordered_pairs_within_groups():
  gold = np.array([[1.0, 0.0, 0.0, 0.5], [1.0, 1.0, 1.0, 1.0]])
  # Group 0 orders 5 pairs: (0,1) (0,2) (0,3) (3,1) (3,2). The proxy gets (0,1), (0,3) and (3,1)
  # right, ties (0,2) and reverses (3,2). Group 1 has no ordered pair.
  proxy = np.array([[5.0, 1.0, 5.0, 2.0], [9.0, 0.0, 5.0, 1.0]])
  agreement, pairs = adv_lib.group_pair_agreement(proxy, gold)
  assert int(pairs) == 5
  np.testing.assert_allclose(float(agreement), 3 / 5)
  brute = [
    (proxy[g, i] > proxy[g, j])
    for g in range(2)
    for i in range(4)
    for j in range(4)
    if gold[g, i] > gold[g, j]
  ]
  np.testing.assert_allclose(float(agreement), np.mean(brute))
  assert float(adv_lib.group_pair_agreement(gold, gold)[0]) == 1.0
  # Only the pairs whose worse sample is marked: here samples 1 and 2, i.e. (0,1) (0,2) (3,1)
  # (3,2), of which the proxy gets (0,1) and (3,1) right.
  worse = np.array([[False, True, True, False], [True] * 4])
  agreement, pairs = adv_lib.group_pair_agreement(proxy, gold, worse)
  assert int(pairs) == 4 and float(agreement) == 0.5
  assert np.isnan(float(adv_lib.group_pair_agreement(proxy[1:], gold[1:])[0]))


@pytest.mark.parametrize("aggregate", ["advantage", "sum"])
def test_aggregate_rewards_matches_numpy(aggregate):
  rng = np.random.default_rng(11)
  rewards = {
    "spatial_score": rng.normal(-3.0, 2.0, size=(3, 8)),
    "objects": rng.integers(0, 3, size=(3, 8)) / 2.0,
  }
  rewards["objects"][1] = 1.0  # A group where a reward ties: it contributes 0 there.
  weights = {"spatial_score": 1.0, "objects": 0.5}
  got = adv_lib.aggregate_rewards(rewards, weights, aggregate)
  want = np.zeros((3, 8))
  for name, w in weights.items():
    r = rewards[name]
    if aggregate == "advantage":
      r = (r - r.mean(axis=1, keepdims=True)) / (r.std(axis=1, keepdims=True) + EPS)
    want += w * r
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  if aggregate == "advantage":  # Scale-free: a reward x 10 changes nothing.
    scaled = dict(rewards, spatial_score=10 * rewards["spatial_score"])
    np.testing.assert_allclose(
      adv_lib.aggregate_rewards(scaled, weights, aggregate), got, rtol=1e-4, atol=1e-4
    )
  with pytest.raises(ValueError, match="aggregate"):
    adv_lib.aggregate_rewards(rewards, weights, "mean")
  with pytest.raises(ValueError, match="oracle"):
    adv_lib.aggregate_rewards(rewards, {"oracle": 1.0}, aggregate)
