r"""Samples a prompt list from a generator (+ optional LoRA); in the synthetic world, with the
oracle's spatial accuracy of the samples (`metrics.json`, short and long prompts).

  # The flux_sft base generator and the GRPO-tuned one, on the same held-out prompts:
  python -m spatial_jax.main --config configs/sample.py --workdir workdirs/sample_base \
    --config.model.generator=workdirs/flux_sft/final
  python -m spatial_jax.main --config configs/sample.py --workdir workdirs/sample_grpo \
    --config.model.generator=workdirs/grpo/final
  # FLUX.1-dev with a GRPO LoRA, real prompts:
  python -m spatial_jax.main --config configs/sample.py --workdir workdirs/sample_dev \
    --config.model.pipeline=/data/FLUX.1-dev --config.model.lora=workdirs/grpo_dev/final/lora \
    --config.prompts=prompts.txt --config.data.image_size=1024 --config.sampling.num_steps=28 \
    --config.sampling.guidance=3.5
  python -m spatial_jax.main --config configs/sample.py:smoke --workdir /tmp/s
"""

from spatial_jax import configs_lib


def get_config(arg=None):
  arg = configs_lib.parse_arg(arg, smoke=False)
  config = configs_lib.base_config("sample")
  config.prompts = ""  # A prompt file (txt / jsonl); empty: the grammar's held-out prompts.
  config.num_prompts = 128  # Prompts taken (from the file's head, or drawn).
  config.images_per_prompt = 1
  config.batch_size = 32  # Images per compiled call.
  config.grid_prompts = 32  # Rows of grid.png.
  config.data = dict(image_size=32, synthetic=dict(min_objects=2, max_objects=4, max_relations=4))
  # A diffusers FLUX folder (`pipeline`) or a synthetic generator folder (`generator`); both
  # empty: a random tiny generator. `lora`: a diffusers LoRA folder applied on top.
  config.model = configs_lib.flux_model(lora="")
  # cfg_scale < 0: the generator's own (generator.json); guidance: FLUX.1-dev's embedding.
  config.sampling = dict(num_steps=20, guidance=1.0, cfg_scale=-1.0)
  if arg.smoke:
    config.num_prompts = 6
    config.images_per_prompt = 2
    config.batch_size = 8
    config.sampling.num_steps = 2
  return config
