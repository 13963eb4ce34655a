r"""Adversarial spatial preference pairs for real prompts: perturb, generate with FLUX, judge.

Each prompt gets one spatial relation changed (rule-based, or an OpenAI-compatible chat endpoint
with `perturb.method=llm`), FLUX draws an image for the original and one for the perturbed prompt,
and SpatialScore judges both against the original prompt; pairs the original's image wins by more
than `filter.margin` are kept. The workdir becomes a pairs folder (`pairs.jsonl` + `images/`,
read by reward_train with `--config.data.pairs=<workdir>`) with `dropped/`, `stats.json` and
`review.html` for a human pass. Rerunning into the same workdir continues where it stopped.

Bring the weights and prompts yourself (nothing is downloaded): a local diffusers FLUX.1-dev
folder, a SpatialScore (`reward_train` workdir or export) and a prompt file (one per line, or
jsonl with a `prompt` field).

  python -m spatial_jax.main --config configs/pairs_flux.py --workdir /data/pairs_flux \
    --config.model.pipeline=/data/FLUX.1-dev --config.judge.spatial_score=/ckpt/spatial_score \
    --config.prompts=/data/spatial_prompts.txt
  # The paper's LLM perturbation through any OpenAI-compatible server (key from $OPENAI_API_KEY):
  ... --config.perturb.method=llm --config.perturb.llm.endpoint=http://localhost:8000/v1 \
    --config.perturb.llm.model=Qwen2.5-72B-Instruct
  # Synthetic world: a flux_sft generator judged by the scene oracle.
  python -m spatial_jax.main --config configs/pairs_flux.py:synthetic --workdir /tmp/pairs_syn \
    --config.model.generator=workdirs/flux_sft/final
  # Smoke (CPU, seconds): a random tiny generator judged by a random tiny SpatialScore.
  python -m spatial_jax.main --config configs/pairs_flux.py:smoke --workdir /tmp/pairs_smoke
"""

from spatial_jax import configs_lib


def get_config(arg=None):
  arg = configs_lib.parse_arg(arg, smoke=False, synthetic=False)
  config = configs_lib.base_config("pairs_generate")
  # FLUX.1-dev's parameters are split FSDP over all devices; the batch over data x fsdp.
  config.mesh = [["data", 1], ["fsdp", -1], ["tensor", 1]]
  config.prompts = ""  # Required for FLUX: a prompt file (txt, or jsonl with "prompt").
  config.num_prompts = 0  # Prompts taken from the file's head; 0: all.
  config.batch_size = 8  # Images per compiled call (half original, half perturbed).
  # Fraction of prompts in the "test" split, decided by a hash of the prompt text.
  config.test_fraction = 0.05
  config.perturb = dict(
    method="rules",  # "rules" (perturb.perturb_prompt, offline) or "llm".
    llm=dict(
      endpoint="",  # OpenAI-compatible base URL, e.g. http://localhost:8000/v1.
      model="",
      api_key_env="OPENAI_API_KEY",  # Environment variable holding the key ("" : none).
      timeout_s=60.0,
      temperature=0.0,
      max_retries=2,
    ),
  )
  config.data = dict(
    image_size=512,
    synthetic=dict(min_objects=2, max_objects=4, max_relations=4),  # Prompts without a file.
  )
  # `pipeline`: a diffusers FLUX folder (FLUX.1-dev); or `generator`: a synthetic generator
  # folder (flux_sft / grpo export); neither: a random tiny generator (smoke runs only).
  config.model = configs_lib.flux_model(dtype="bfloat16", param_dtype="bfloat16")
  # FLUX.1-dev guides through its distilled guidance embedding (3.5), without true CFG;
  # cfg_scale < 0 takes a synthetic generator's own. shared_noise: both images of a pair start
  # from the same noise, so they differ where the prompts do.
  config.sampling = dict(num_steps=28, guidance=3.5, cfg_scale=1.0, shared_noise=True)
  config.judge = dict(
    name="spatial_score",  # "spatial_score" or "oracle" (scene-grammar prompts only).
    spatial_score="",  # A reward_train workdir or a SpatialScore export.
    tiny_spatial_score=False,  # No path: a random tiny SpatialScore (smoke runs).
    batch_size=16,  # SpatialScore sequences per compiled call.
  )
  # Keep a pair when judge(original image) - judge(perturbed image) > margin, both on the
  # original prompt.
  config.filter = dict(margin=0.0)
  config.review = dict(max_pairs=500)  # Pairs per section of review.html; 0: all.
  config.log_every_secs = 30.0

  if arg.synthetic or arg.smoke:
    config.mesh = [["data", -1], ["fsdp", 1], ["tensor", 1]]  # Tiny models: data parallel.
    config.test_fraction = 0.1
    config.num_prompts = 256
    config.batch_size = 32
    config.data.image_size = 32
    config.model.dtype = "float32"
    config.model.param_dtype = "float32"
    config.sampling = dict(num_steps=20, guidance=1.0, cfg_scale=-1.0, shared_noise=True)
    config.judge.name = "oracle"
  if arg.smoke:
    config.num_prompts = 16
    config.batch_size = 8
    config.test_fraction = 0.4
    config.sampling.num_steps = 2
    # Random tiny images satisfy no relation, so the oracle would drop every pair; a random
    # SpatialScore keeps about half, through the same code path as a real checkpoint.
    config.judge.name = "spatial_score"
    config.judge.tiny_spatial_score = True
    config.judge.batch_size = 8
    config.review.max_pairs = 0
    config.log_every_secs = 5.0
  return config
