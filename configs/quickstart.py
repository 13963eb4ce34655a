r"""The synthetic world end to end: pairs -> SpatialScore -> text encoder -> base generator -> GRPO
on SpatialScore -> report.md.

  python -m spatial_jax.main --config configs/quickstart.py --workdir workdirs/quickstart
  python -m spatial_jax.main --config configs/quickstart.py:smoke --workdir /tmp/q

Each stage is a job with its own config section, taken from its own config file (override any
field, e.g. `--config.generator.train.steps=3000`); `<workdir>/report.md` collects what each
stage reached and took. Rerunning the command skips finished stages and resumes the current one.
"""

from spatial_jax import configs_lib


def get_config(arg=None):
  arg = configs_lib.parse_arg(arg, smoke=False)
  smoke = "smoke" if arg.smoke else None
  config = configs_lib.base_config("quickstart")
  config.data = configs_lib.load_config("configs/data_synthetic.py", "size=32")
  config.reward = configs_lib.load_config("configs/reward_synthetic.py", smoke)
  config.text_encoder = configs_lib.load_config("configs/text_encoder_synthetic.py", smoke)
  config.generator = configs_lib.load_config("configs/flux_sft_synthetic.py", smoke)
  # GRPO as the paper runs it: the stage's own SpatialScore is the reward, the prompts are fresh
  # grammar scenes at every step, and held-out fresh scenes are judged by the oracle only.
  config.grpo = configs_lib.load_config("configs/grpo_synthetic.py", smoke)
  # The stages' data: one pairs folder, from the data section (the stages build none).
  config.data.update(num_train=20_000, num_test=512, verify_with_oracle=False)
  config.grpo.reward.oracle = True  # Judges (eval) and is logged; it does not train.
  config.grpo.reward.tiny_spatial_score = False  # The trained one from reward/.
  config.grpo.reward.train_on = "spatial_score"
  # A CPU budget of ~40 minutes: SpatialScore shortened (reward_synthetic runs 2,200 steps).
  config.reward.train.steps = 1500
  config.reward.eval.max_pairs = 512
  config.reward.eval_every_steps = 250
  # The settings that move layouts within a CPU budget (README, GRPO): 16 samples per prompt
  # from one initial noise, the top-4 and bottom-4 kept, the first 4 of 10 steps stochastic.
  config.grpo.grpo.update(
    prompts_per_step=4, group_size=16, topk=4, same_initial_noise=True, sde_window=(0, 4)
  )
  config.grpo.train.update(steps=80, lr=1e-3, num_minibatches=1)
  config.grpo.eval.update(every_steps=20, num_prompts=128)
  if arg.smoke:
    config.reward.train.steps = 4
    config.reward.eval.max_pairs = 16
    config.reward.eval_every_steps = 2
    config.grpo.reward.tiny_spatial_score = False
    config.grpo.grpo.update(prompts_per_step=2, group_size=8, topk=2, sde_window=(0, 2))
    config.grpo.train.steps = 2
    config.grpo.eval.update(every_steps=0, num_prompts=4)
    config.data.update(num_train=96, num_test=32, gallery_pairs=8)
    config.grpo.sampling.cfg_scale = -1.0  # The generator's own (flux_sft's gallery setting).
  return config
