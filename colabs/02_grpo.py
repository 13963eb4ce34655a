# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # GRPO, phase by phase
#
# The paper fine-tunes FLUX.1-dev (+ LoRA) with **GRPO**, SpatialScore as the reward:
#
# - the deterministic flow ODE becomes an **SDE** (Euler-Maruyama), so every sampling step is
#   a Gaussian policy with a log-prob;
# - each prompt is sampled **G** times (a group); rewards are normalised within the group, and
#   only the **top-k and bottom-k** samples of each group get advantages (the paper: G = 24,
#   k = 6);
# - training recomputes each kept step's log-prob with the current LoRA and maximises a
#   PPO-style **clipped ratio** objective, with a KL term to the reference model (LoRA off).
#
# This notebook runs one GRPO iteration phase by phase in the synthetic world, with the same
# functions `spatial_jax/jobs/grpo.py` (the `grpo` job) wires together, then a few iterations in
# a loop. The policy is a tiny random FLUX generator (or a trained one, see `GENERATOR`), so
# its images are noise-like: the point is the mechanics, not the pictures.

# %% [markdown]
# ## Settings
#
# `SMOKE` (`SPATIAL_JAX_SMOKE=1`, set by the repository's tests) runs two iterations in
# seconds; without it the loop runs a few minutes on a CPU.
#
# `GENERATOR`: a synthetic generator folder written by `flux_sft` (e.g.
# `workdirs/quickstart/generator/final` after the quickstart); empty: a random tiny generator,
# trained on the dense `brightness` reward (a sanity reward that ignores the prompt, to see the
# machinery climb a reward). With a trained generator the oracle's graded verdict drives it.

# %%
import os

SMOKE = os.environ.get("SPATIAL_JAX_SMOKE", "0") not in ("", "0")
GENERATOR = ""
SPATIAL_SCORE = ""  # e.g. 01_spatial_score's "colab_workdirs/spatial_score/reward": also logged.
print(f"SMOKE={SMOKE}, generator {GENERATOR or 'random tiny'}")

# %% [markdown]
# ## Install
#
# In a clone: `pip install -e .`; in Colab, run
# `!git clone <repository URL> spatial_jax && pip install -e spatial_jax` and then
# `%cd spatial_jax` first (the repository root: `configs/` is read from there, and the package
# imports from it without restarting the runtime).

# %%
try:
  import spatial_jax
except ImportError:
  print(
    "spatial_jax is not installed. From a clone of the repository run `pip install -e .`; "
    "in Colab: `!git clone <repository URL> spatial_jax && pip install -e spatial_jax`, then "
    "`%cd spatial_jax`."
  )
  raise
print("spatial_jax from", os.path.dirname(spatial_jax.__file__))

# %%
import time

import jax
import matplotlib.pyplot as plt
import numpy as np
from flax import nnx
from IPython.display import display

from spatial_jax import configs_lib, sharding
from spatial_jax.diffusion import text_to_image
from spatial_jax.rl import loop
from spatial_jax.rl import rewards as rewards_lib
from spatial_jax.rl import steps as steps_lib

print("devices:", jax.devices())


def show(fig):
  """Displays a figure whatever the matplotlib backend."""
  display(fig)
  plt.close(fig)


# %% [markdown]
# ## The config
#
# `configs/grpo_synthetic.py` scales the paper's settings to a CPU: P prompts per step, G = 8
# samples each, top-2 and bottom-2 kept, a 10-step SDE rollout (3 under smoke), clip 1e-4,
# beta 0.01, lr 3e-4.

# %%
config = configs_lib.load_config("configs/grpo_synthetic.py", "smoke" if SMOKE else None)
config.model.generator = GENERATOR
config.reward.spatial_score = SPATIAL_SCORE
config.reward.tiny_spatial_score = False  # No random reward model in this notebook.
if GENERATOR:
  config.reward.train_on = "oracle_soft"
else:
  config.reward.train_on = "brightness"
  config.sampling.cfg_scale = 4.0  # The random generator has no default guidance.
if not SMOKE:
  config.train.steps = 8
g, t = config.grpo, config.train
P, G = g.prompts_per_step, g.group_size
print(f"P={P} prompts x G={G} samples, top/bottom k={g.topk}, {config.sampling.num_steps} steps")

# %% [markdown]
# ## Policy, rewards, prompts
#
# `load_text_to_image` builds the FLUX transformer and adds LoRA adapters; the trainable state is the
# LoRA params only (`nnx.split`). Every phase below is a pure function of these states.

# %%
mesh = sharding.make_mesh(config.mesh)
rules = sharding.resolve_rules(config.sharding_rules)
loop.check_config(config, sharding.batch_shard_count(mesh, rules))

policy = text_to_image.load_text_to_image(config, mesh, rules)
graphdef, trainable, frozen = nnx.split(policy.transformer, nnx.LoRAParam, ...)
count = lambda tree: sum(x.size for x in jax.tree.leaves(tree))  # noqa: E731
print(f"{policy.source}: {count(trainable):,} LoRA params on {count(frozen):,} frozen ones")

reward_fns = rewards_lib.make_rewards(config, mesh)
prompts = loop.prompt_source(config)
print("rewards:", list(reward_fns), "| trained on:", config.reward.train_on)

# %% [markdown]
# ## The jitted phases
#
# `rl.loop.jit_phases` jits what the job runs, with explicit shardings: the rollout samples
# with the SDE and records latents and log-probs (`steps.make_rollout` ->
# `diffusion.sde.sample_sde`); the train step recomputes the log-probs of the trained timesteps
# with the current LoRA and applies the clipped GRPO objective + KL (`steps.make_train_step` ->
# `rl.grpo.grpo_loss`).

# %%
tx = steps_lib.make_optimizer(config)
with sharding.use_mesh(mesh, rules):
  opt_state = jax.jit(tx.init)(trainable)
phases = loop.jit_phases(graphdef, trainable, frozen, policy, tx, config, mesh, rules)
rng = jax.random.key(config.seed)
print("sigmas", np.round(np.asarray(phases.sigmas), 3), "| trained timesteps", phases.timesteps)


# %% [markdown]
# ## The phases of one step
#
# Each function is one phase of the job's loop (`jobs/grpo.py` calls the same `rl.loop`
# functions), in order.


# %%
def rollout_phase(step):
  """Prompts -> G SDE samples per prompt (no gradients) -> decoded uint8 images."""
  key = jax.random.fold_in(rng, step)
  return loop.rollout(phases, policy, trainable, frozen, prompts.train(step, P), key)


def reward_phase(roll):
  """Every reward on the decoded images; top-k group advantages of the trained one."""
  return loop.score(phases, roll, reward_fns, config)


def train_phase(step, roll, scored):
  """Optimizer updates on the kept samples, in `train.num_minibatches` minibatches."""
  global trainable, opt_state
  batches = loop.minibatches(phases, roll, scored, config, step)
  trainable, opt_state, aux = loop.update(phases, trainable, opt_state, frozen, batches)
  return loop.step_scalars(aux, scored)


def gallery(roll, scored, title):
  """One row per prompt group: its G samples, reward and advantage; kept ones framed."""
  reward = np.asarray(scored.reward)
  advantages, mask = np.asarray(scored.advantages), np.asarray(scored.mask)
  fig, axes = plt.subplots(P, G, figsize=(1.6 * G, 1.9 * P + 0.6), squeeze=False)
  for p in range(P):
    for j in range(G):
      axis = axes[p, j]
      axis.imshow(roll.images[p * G + j])
      axis.set_xticks([])
      axis.set_yticks([])
      color = ("tab:green" if advantages[p, j] > 0 else "tab:red") if mask[p, j] else "0.8"
      for spine in axis.spines.values():
        spine.set_edgecolor(color)
        spine.set_linewidth(3 if mask[p, j] else 1)
      axis.set_title(f"r {reward[p, j]:.3f}\nA {advantages[p, j]:+.2f}", fontsize=7)
    axes[p, 0].set_ylabel(roll.prompts[p][:40], fontsize=6)
  fig.suptitle(f"{title} (framed: kept top-k green / bottom-k red)", fontsize=9)
  fig.tight_layout()
  show(fig)


# %% [markdown]
# ## Step 1, phase by phase
#
# **Rollout.** `traj.latents` holds x at every sigma, `traj.log_probs` the Gaussian log-prob of
# each stochastic step (the last, sharp step is an ODE step: log-prob 0).

# %%
step = 1
with sharding.use_mesh(mesh, rules):
  roll = rollout_phase(step)
traj = roll.trajectory
print("prompts:", *roll.prompts, sep="\n  ")
print("latents", traj.latents.shape, "| log_probs", traj.log_probs.shape)
print("stochastic steps", np.asarray(traj.stochastic))
print("log-probs of sample 0 per step", np.round(np.asarray(traj.log_probs[:, 0]), 1))

# %% [markdown]
# **Rewards and advantages.** Per group: rewards normalised with the kept samples' statistics;
# the samples between the top-k and bottom-k get no advantage and are not trained.

# %%
scored = reward_phase(roll)
for name, values in scored.rewards.items():
  print(f"{name:>14}: mean {np.mean(values):.4f}, std {np.std(values):.4f}")
print("advantages (P, G):\n", np.round(np.asarray(scored.advantages), 2))
gallery(roll, scored, "Rollout of step 1")

# %% [markdown]
# **Training.** The kept samples' stored latents are scored again with the current LoRA (the
# first ratio is exactly 1) and the clipped objective + KL is differentiated.

# %%
with sharding.use_mesh(mesh, rules):
  step_scalars = train_phase(step, roll, scored)
history = [step_scalars]
for name, value in step_scalars.items():
  print(f"{name:>26}: {value:.6g}")

# %% [markdown]
# ## A few more iterations
#
# The same three phases in a loop (the compiled programs are reused).

# %%
for step in range(2, t.steps + 1):
  start = time.perf_counter()
  with sharding.use_mesh(mesh, rules):
    roll = rollout_phase(step)
    scored = reward_phase(roll)
    history.append(train_phase(step, roll, scored))
  last = history[-1]
  print(
    f"step {step}: reward {last[f'train/reward_{config.reward.train_on}']:.4f}, "
    f"loss {last['train/loss']:.3g}, kl {last['train/kl']:.3g}, "
    f"clipfrac {last['train/clipfrac']:.2f}, {time.perf_counter() - start:.1f} s"
  )
gallery(roll, scored, f"Rollout of step {step}")

# %%
series = f"train/reward_{config.reward.train_on}"
fig, axis = plt.subplots(figsize=(5, 3))
axis.plot(range(1, len(history) + 1), [h[series] for h in history], "o-")
axis.set_xlabel("step")
axis.set_ylabel(series)
show(fig)

# %% [markdown]
# ## Next
#
# The whole loop, with checkpoints, held-out evaluation (ODE samples scored by every reward),
# galleries and a LoRA export, is one command:
#
# ```bash
# python -m spatial_jax.main --config configs/grpo_synthetic.py --workdir workdirs/grpo \
#   --config.model.generator=workdirs/flux_sft/final \
#   --config.reward.spatial_score=workdirs/reward --config.reward.train_on=spatial_score
# ```
#
# `configs/grpo_flux_dev.py` carries the paper's settings for FLUX.1-dev.
