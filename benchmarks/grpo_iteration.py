"""One whole GRPO iteration, ours vs the same iteration written the PyTorch way (Flow-GRPO style).

Both sides run the same algorithm on the same FLUX architecture (the synthetic world's generator
by default), the same P prompts x G samples, SDE window, trained timesteps, top-k and minibatches:

1. rollout: G SDE samples per prompt from the LoRA policy, recording latents and log-probs;
2. reward: the same host function of the final latents on both sides (the images' decode and the
   reward model are benchmarked elsewhere; the prompts' text embeddings are inputs to both);
3. advantages: top-k / bottom-k per group, normalised by the kept samples;
4. train: per minibatch, every trained timestep recomputes its SDE step with gradients (clipped
   surrogate + beta * KL to the adapter-off reference), gradients accumulated over timesteps,
   one AdamW update.

Ours: `rl.loop`'s jitted phases (`jit_phases`, `rollout`'s trajectory, `minibatches`, `update`).
PyTorch: diffusers' `FluxTransformer2DModel` + a peft LoRA (`add_adapter`), eager, with
Flow-GRPO's SDE step with log-prob and its training loop (gradient accumulation over timesteps,
`disable_adapters()` for the reference), written here from the algorithm (grpo.md).

The figure is the median of the per-repeat ratios of whole iterations (alternating, `timing.compare`)
with the per-phase medians of each side.

  python benchmarks/grpo_iteration.py --repeats 10
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch

sys.path.insert(0, os.path.dirname(__file__))
from grpo_step import flux_sft_generator, jitted_policy  # noqa: E402  (benchmarks/)
from timing import compare, environment, warn_if_busy  # noqa: E402

from spatial_jax import sharding  # noqa: E402
from spatial_jax.configs_lib import load_config  # noqa: E402
from spatial_jax.models.flux import params as flux_params  # noqa: E402
from spatial_jax.rl import advantages, loop, steps  # noqa: E402


def host_reward(latents: np.ndarray) -> np.ndarray:
  """A cheap stand-in reward of the final latents (N, L, C), identical on both sides."""
  return np.tanh(latents[:, :, 0].mean(axis=1) - latents[:, :, 1].mean(axis=1)).astype(np.float32)


# --- The PyTorch side ---------------------------------------------------------------------------


def torch_sde_step(x, v, sigma, sigma_next, a, sigma_max, prev_sample=None, generator=None):
  """Flow-GRPO's `sde_step_with_logprob` (fp32), as `diffusion/sde.py` ports it."""
  x, v = x.float(), v.float()
  dt = sigma_next - sigma
  denominator = 1 - (sigma_max if sigma >= 1 else sigma)
  std = a * (sigma / denominator) ** 0.5
  mean = x * (1 + std**2 / (2 * sigma) * dt) + v * (1 + std**2 * (1 - sigma) / (2 * sigma)) * dt
  scale = std * (-dt) ** 0.5
  if prev_sample is None:
    prev_sample = mean + scale * torch.randn(x.shape, generator=generator)
  diff = prev_sample.detach() - mean
  log_prob = -(diff**2) / (2 * scale**2) - np.log(scale) - 0.5 * np.log(2 * np.pi)
  return prev_sample, log_prob.mean(dim=tuple(range(1, x.ndim))), mean, std


class TorchGRPO:
  """The iteration as a PyTorch Flow-GRPO user runs it: eager, one sample batch per call."""

  def __init__(self, flux_config, lora_rank, lora_alpha, targets, inputs, config, sigmas):
    from diffusers import FluxTransformer2DModel  # noqa: PLC0415
    from peft import LoraConfig  # noqa: PLC0415

    torch.manual_seed(0)
    self.model = FluxTransformer2DModel(**flux_config.to_hf_config()).eval()
    self.model.requires_grad_(False)
    self.model.add_adapter(
      LoraConfig(r=lora_rank, lora_alpha=lora_alpha, target_modules=targets, init_lora_weights=True)
    )
    self.params = [p for n, p in self.model.named_parameters() if "lora_" in n]
    for p in self.params:
      p.requires_grad_(True)
    t = config.train
    self.opt = torch.optim.AdamW(self.params, lr=t.lr, weight_decay=t.weight_decay, eps=1e-8)
    self.inputs = {k: torch.from_numpy(np.asarray(v)) for k, v in inputs.items() if v is not None}
    self.config = config
    self.sigmas = [float(s) for s in sigmas]
    self.generator = torch.Generator().manual_seed(0)

  def velocity(self, x, sigma, rows):
    i = self.inputs
    b = x.shape[0]
    guidance = None if i.get("guidance") is None else i["guidance"][:b]
    return self.model(
      hidden_states=x,
      encoder_hidden_states=i["prompt_embeds"][rows],
      pooled_projections=i["pooled"][rows],
      timestep=torch.full((b,), sigma),
      img_ids=i["img_ids"],
      txt_ids=i["txt_ids"],
      guidance=guidance,
      return_dict=False,
    )[0]

  def rollout(self, noise, window):
    g = self.config.grpo
    x = torch.from_numpy(noise)
    rows = torch.arange(x.shape[0])
    latents, log_probs = [x], []
    with torch.no_grad():
      for j in range(len(self.sigmas) - 1):
        a = g.noise_level if window[0] <= j < window[1] else 0.0
        v = self.velocity(x, self.sigmas[j], rows)
        if a > 0:
          x, lp, _, _ = torch_sde_step(
            x, v, self.sigmas[j], self.sigmas[j + 1], a, self.sigmas[1], generator=self.generator
          )
        else:
          x, lp = x + v * (self.sigmas[j + 1] - self.sigmas[j]), torch.zeros(x.shape[0])
        latents.append(x)
        log_probs.append(lp)
    return torch.stack(latents), torch.stack(log_probs)

  def train(self, latents, log_probs, adv, kept, timesteps):
    g, t = self.config.grpo, self.config.train
    for idx in np.array_split(kept, t.num_minibatches):
      rows = torch.from_numpy(idx)
      a = torch.from_numpy(adv[idx])
      self.opt.zero_grad()
      for j in timesteps:
        x = latents[j, rows]
        v = self.velocity(x, self.sigmas[j], rows)
        _, log_prob, mean, std = torch_sde_step(
          x, v, self.sigmas[j], self.sigmas[j + 1], g.noise_level, self.sigmas[1],
          prev_sample=latents[j + 1, rows],
        )  # fmt: skip
        with torch.no_grad():
          self.model.disable_adapters()
          _, _, ref_mean, _ = torch_sde_step(
            x, self.velocity(x, self.sigmas[j], rows), self.sigmas[j], self.sigmas[j + 1],
            g.noise_level, self.sigmas[1], prev_sample=latents[j + 1, rows],
          )  # fmt: skip
          self.model.enable_adapters()
        ratio = torch.exp(log_prob - log_probs[j, rows])
        unclipped = -a * ratio
        clipped = -a * torch.clamp(ratio, 1 - g.clip_range, 1 + g.clip_range)
        policy_loss = torch.maximum(unclipped, clipped).mean()
        kl = ((mean - ref_mean) ** 2).mean(dim=tuple(range(1, mean.ndim))) / (2 * std**2)
        loss = (policy_loss + g.beta * kl.mean()) / len(timesteps)
        loss.backward()
      torch.nn.utils.clip_grad_norm_(self.params, t.grad_clip)
      self.opt.step()


def torch_topk_advantages(rewards: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
  """Top-k and bottom-k of each group, normalised by the kept samples' mean and std."""
  order = np.argsort(rewards, axis=1)
  mask = np.zeros_like(rewards, bool)
  np.put_along_axis(mask, order[:, :k], True, axis=1)
  np.put_along_axis(mask, order[:, -k:], True, axis=1)
  r = np.where(mask, rewards, np.nan)
  adv = (rewards - np.nanmean(r, axis=1, keepdims=True)) / (
    np.nanstd(r, axis=1, keepdims=True) + 1e-4
  )
  return np.where(mask, np.clip(adv, -5, 5), 0.0).astype(np.float32), mask


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--prompts", type=int, default=2, help="P prompts per iteration")
  parser.add_argument("--group", type=int, default=8, help="G samples per prompt")
  parser.add_argument("--topk", type=int, default=2)
  parser.add_argument("--steps", type=int, default=10, help="sampling steps")
  parser.add_argument("--window", type=int, nargs=2, default=(0, 4), help="SDE steps [a, b)")
  parser.add_argument("--attention", default="", help="ours: model.attention_impl (''; XLA)")
  parser.add_argument("--repeats", type=int, default=10)
  args = parser.parse_args()
  warn_if_busy()
  torch.manual_seed(0)

  config = load_config("configs/grpo_synthetic.py")
  config.model.tiny = flux_sft_generator()
  config.model.attention_impl = args.attention
  config.sampling.update(num_steps=args.steps, cfg_scale=1.0, sde_window=tuple(args.window))
  config.grpo.update(
    prompts_per_step=args.prompts, group_size=args.group, topk=args.topk, same_initial_noise=True
  )
  config.train.num_minibatches = 1
  mesh, rules, pol, (_, trainable, frozen), tx, phases = jitted_policy(config)
  n = args.prompts * args.group
  rng = np.random.default_rng(0)
  fc = pol.transformer.config
  text_len = pol.geo.txt_ids.shape[0]
  embeds = rng.standard_normal((n, text_len, fc.joint_attention_dim)).astype(np.float32)
  pooled = rng.standard_normal((n, fc.pooled_projection_dim)).astype(np.float32)
  with sharding.use_mesh(mesh, rules):
    opt_state = jax.jit(tx.init)(trainable)
  state = [trainable, opt_state]  # The train step donates them: each call takes the last.
  ours_phase = {k: [] for k in ("rollout", "reward", "advantages", "train")}

  def ours_iteration():
    with sharding.use_mesh(mesh, rules):
      t0 = time.perf_counter()
      e, p = phases.put(embeds), phases.put(pooled)
      traj = phases.rollout(state[0], frozen, e, p, jax.random.key(0))
      final = np.asarray(phases.final(traj.latents))
      t1 = time.perf_counter()
      rewards = jnp.asarray(host_reward(final).reshape(args.prompts, args.group))
      t2 = time.perf_counter()
      adv, mask = advantages.topk_group_advantages(rewards, args.topk)
      jax.block_until_ready(adv)
      t3 = time.perf_counter()
      roll = loop.Rollout([""] * args.prompts, [""] * n, e, p, traj, np.zeros((n, 1, 1, 3)))
      scored = loop.Scored(rewards={}, reward=rewards, advantages=adv, mask=mask)
      batches = loop.minibatches(phases, roll, scored, config, step=0)
      state[:] = loop.update(phases, *state, frozen, batches)[:2]
      t4 = time.perf_counter()
    for name, seconds in zip(ours_phase, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
      ours_phase[name].append(seconds)

  # Our adapters' module-path patterns; peft full-matches a string target against the same
  # diffusers module names.
  targets = "|".join(f"(?:{t})" for t in flux_params.lora_targets(config.lora.single_mlp))
  inputs = dict(
    prompt_embeds=embeds,
    pooled=pooled,
    img_ids=pol.geo.img_ids,
    txt_ids=np.asarray(pol.geo.txt_ids),
    guidance=np.full((n,), pol.guidance, np.float32) if fc.guidance_embeds else None,
  )
  ref = TorchGRPO(
    fc, config.lora.rank, config.lora.alpha, targets, inputs, config, np.asarray(phases.sigmas)
  )
  timesteps = phases.timesteps
  window = steps.sde_window(config, args.steps)
  ref_phase = {k: [] for k in ours_phase}
  noise = np.repeat(
    rng.standard_normal((args.prompts, *pol.latent_shape)).astype(np.float32), args.group, axis=0
  )

  def torch_iteration():
    t0 = time.perf_counter()
    latents, log_probs = ref.rollout(noise, window)
    t1 = time.perf_counter()
    rewards = host_reward(latents[-1].numpy()).reshape(args.prompts, args.group)
    t2 = time.perf_counter()
    adv, mask = torch_topk_advantages(rewards, args.topk)
    t3 = time.perf_counter()
    ref.train(latents, log_probs, adv.reshape(-1), np.flatnonzero(mask.reshape(-1)), timesteps)
    t4 = time.perf_counter()
    for name, seconds in zip(ref_phase, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
      ref_phase[name].append(seconds)

  result = dict(
    prompts=args.prompts,
    group=args.group,
    topk=args.topk,
    sampling_steps=args.steps,
    sde_window=list(window),
    trained_timesteps=len(timesteps),
    lora=dict(rank=config.lora.rank, targets=targets),
    adapted_modules_pytorch=len(ref.params) // 2,
    attention=args.attention or "xla",
    repeats=args.repeats,
    environment=environment(torch),
    date=time.strftime("%Y-%m-%d"),
    iteration=compare(ours_iteration, torch_iteration, args.repeats),
  )
  # Per-phase medians over the timed repeats (the warm-up call, which compiles ours, dropped).
  result["phases_s"] = {
    name: dict(
      ours=float(f"{statistics.median(ours_phase[name][1:]):.4g}"),
      pytorch=float(f"{statistics.median(ref_phase[name][1:]):.4g}"),
    )
    for name in ours_phase
  }
  print(json.dumps(result, indent=2))


if __name__ == "__main__":
  main()
