r"""Job `reproduce`: the paper's claims that the synthetic world can test, over seeds.

  python -m spatial_jax.main --config configs/reproduce_synthetic.py --workdir workdirs/reproduce
  python -m spatial_jax.main --config configs/reproduce_synthetic.py:smoke --workdir /tmp/rep

Per seed: the quickstart (pairs, text encoder, SpatialScore, base generator, GRPO driven by
SpatialScore), SpatialScore variants trained on the same pairs, every reward judged on one
held-out pairs folder with 1-3 relations changed, and Flow-GRPO* (the same GRPO driven by the
rule-based oracle on its short template prompts, as Flow-GRPO's GenEval reward). Then the top-k
ablation at G = 24 on `topk.seed`. Writes report.md, results.json and figures; rerunning the
command resumes (every finished run is kept, an interrupted one resumes from its checkpoints).
"""

from spatial_jax import configs_lib


def get_config(arg=None):
  arg = configs_lib.parse_arg(arg, smoke=False)
  smoke = "smoke" if arg.smoke else None
  config = configs_lib.base_config("reproduce")
  config.seeds = (0, 1, 2)
  config.quickstart = configs_lib.load_config("configs/quickstart.py", smoke)
  # One held-out folder for every reward: 1-3 relations reversed per pair (the paper's pairs
  # with 2-3 perturbations), short and long prompts, drawn from a seed no run trains on.
  config.eval_pairs = configs_lib.load_config("configs/data_synthetic.py", "size=32")
  config.eval_pairs.update(
    seed=1000, num_train=0, num_test=2000, max_changes=3, verify_with_oracle=False
  )
  # SpatialScore variants, each the quickstart's reward stage with these fields changed, trained
  # on the same pairs (reward/pairs of the seed's quickstart) unless they change `data`.
  config.reward_variants = dict(
    # The zero-shot judge: the same model trained on pairs whose rejected image shows another
    # scene (a generic image-text matching reward; no adversarial pairs). It builds its pairs.
    image_text=dict(data=dict(synthetic=dict(rejected="other_scene"))),
    # The scalar Bradley-Terry head: mu only, no sigma in the loss.
    scalar_bt=dict(loss="bt"),
    # A backbone of half the width (the paper: 3B vs 7B).
    half_width=dict(
      model=dict(
        vision=dict(hidden_size=32, intermediate_size=64, out_hidden_size=32),
        text=dict(
          hidden_size=32,
          intermediate_size=64,
          num_attention_heads=2,
          num_key_value_heads=2,
          mrope_section=(2, 3, 3),
        ),
        head_hidden=64,
      )
    ),
  )
  # Flow-GRPO*: the quickstart's GRPO stage with the oracle's fraction of satisfied relations (a
  # rule-based detector-style reward) driving it instead of SpatialScore, on the same short
  # template prompts.
  config.flow_grpo = dict(reward=dict(train_on="oracle"))
  # The top-k ablation: the quickstart's GRPO stage at G = 24 on one seed's models; `stats`
  # "kept" normalises the selected samples (select, then normalise: the paper), "group" the
  # whole group (normalise, then select).
  config.topk = dict(
    seed=0,
    group_size=24,
    runs=dict(
      all=dict(topk=0),
      k4=dict(topk=4),
      k6=dict(topk=6),
      k4_group_stats=dict(topk=4, stats="group"),
      k6_group_stats=dict(topk=6, stats="group"),
    ),
  )
  if arg.smoke:
    config.seeds = (0,)
    config.eval_pairs.update(num_test=24, gallery_pairs=4)
    config.topk.group_size = 12
  return config
