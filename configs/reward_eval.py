r"""Pairwise accuracy of a SpatialScore model on a pairs folder; writes `<workdir>/eval.json`.

`model_path` is a reward_train workdir, a `SpatialScore.export` folder, or the synthetic world's
reference points "oracle" (the pixel oracle: accuracy 1.0) and "untrained" (a fresh model: ~0.5).
`pairs` defaults to the training workdir's own `pairs/` folder.

  python -m spatial_jax.main --config configs/reward_eval.py --workdir workdirs/reward_eval \
    --config.model_path=workdirs/reward --config.pairs=workdirs/pairs
  python -m spatial_jax.main --config configs/reward_eval.py:smoke --workdir /tmp/re \
    --config.model_path=/tmp/r
  python -m spatial_jax.main --config configs/reward_eval.py:smoke --workdir /tmp/re_oracle \
    --config.model_path=oracle --config.pairs=/tmp/r/pairs
"""

from spatial_jax import configs_lib


def get_config(arg=None):
  arg = configs_lib.parse_arg(arg, smoke=False)
  config = configs_lib.base_config("reward_eval")
  config.model_path = ""  # Workdir, export folder, "oracle" or "untrained".
  config.pairs = ""  # A pairs folder; empty: `<model_path>/pairs`.
  config.split = "test"
  config.max_pairs = 0  # 0: every pair of the split.
  config.batch_size = 32  # Pairs per compiled call (2x sequences: chosen and rejected).
  if arg.smoke:
    config.max_pairs = 16
    config.batch_size = 8
  return config
