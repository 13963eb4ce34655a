"""EvalResult's breakdowns: short vs long prompts, one vs several relations changed."""

import numpy as np

from spatial_jax.reward.evaluate import EvalResult


def _result(correct, long_prompt, num_changes, relation_type=None):
  n = len(correct)
  return EvalResult(
    mu_chosen=np.where(correct, 1.0, 0.0),
    mu_rejected=np.full(n, 0.5),
    sigma_chosen=np.ones(n),
    sigma_rejected=np.ones(n),
    relation_type=relation_type or ["horizontal"] * n,
    long_prompt=np.array(long_prompt, bool),
    num_changes=None if num_changes is None else np.array(num_changes),
  )


def test_accuracy_by_number_of_changes_and_prompt_length():
  correct = [True, False, True, True, False, True]
  out = _result(correct, [0, 0, 1, 1, 1, 1], [1, 1, 1, 2, 3, 0]).scalars()
  assert out["accuracy"] == 4 / 6
  assert out["accuracy_short"] == 0.5 and out["accuracy_long"] == 0.75
  # Pairs 0-2 change one relation, 3-4 two or three; the recoloured one (count 0) is in neither.
  assert out["accuracy_one_change"] == 2 / 3 and out["accuracy_changes_2_3"] == 0.5


def test_no_change_breakdown_when_every_pair_changes_one_relation():
  for counts in ([1, 1, 1], None):
    out = _result([True, False, True], [0, 1, 1], counts).scalars()
    assert not any(k.startswith(("accuracy_one", "accuracy_changes")) for k in out)
