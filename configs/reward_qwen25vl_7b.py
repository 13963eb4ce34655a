r"""SpatialScore as in the paper: Qwen2.5-VL-7B-Instruct + LoRA, Gaussian BT, lr 2e-6, batch 32.

Bring the weights and the data yourself (nothing is downloaded): a local
Qwen2.5-VL-7B-Instruct folder (config.json, safetensors, tokenizer, preprocessor
config), e.g. `huggingface-cli download Qwen/Qwen2.5-VL-7B-Instruct --local-dir
/data/Qwen2.5-VL-7B-Instruct` on a machine with internet, and a pairs folder (see
README, "The pairs format"). Parameters are sharded FSDP over all devices.

  python -m spatial_jax.main --config configs/reward_qwen25vl_7b.py --workdir /ckpt/spatialscore \
    --config.model.pretrained=/data/Qwen2.5-VL-7B-Instruct --config.data.pairs=/data/spatial_pairs

  # The same LoRA path on the tiny synthetic architecture, in seconds on a CPU:
  python -m spatial_jax.main --config configs/reward_qwen25vl_7b.py:smoke --workdir /tmp/r7
"""

from spatial_jax import configs_lib


def get_config(arg=None):
  arg = configs_lib.parse_arg(arg, smoke=False)
  config = configs_lib.load_config("configs/reward_synthetic.py")
  config.mesh = [["data", 1], ["fsdp", -1], ["tensor", 1]]

  config.data.pairs = ""  # Required: a pairs folder.
  config.data.image_size = 448  # 448x448 -> 256 image tokens, as HPSv3 uses.
  config.data.max_length = 512
  config.model.pretrained = ""  # Required: a local Qwen2.5-VL-7B-Instruct folder.
  config.model.preset = "qwen25vl_7b"
  config.model.vision = {}
  config.model.text = {}
  config.model.dtype = "bfloat16"
  config.model.param_dtype = "bfloat16"
  config.model.remat = True
  config.model.trainable = "lora"
  config.model.lora_rank = 64
  config.model.lora_alpha = 128
  config.model.head_hidden = 1024
  config.loss = "gaussian_mc"
  config.train.update(
    dict(steps=5000, batch_size=32, lr=2e-6, warmup_steps=250, checkpoint_every=500)
  )
  # The paper trains on (chosen, rejected) under the prompt alone; the synthetic world's
  # colour grounding needs one token per colour word, which Qwen's tokenizer does not give.
  config.train.update(dict(perturbed_pairs=False, grounding_weight=0.0))
  config.eval.update(dict(batch_size=16, max_pairs=2000))
  config.log_every_steps = 10
  config.eval_every_steps = 500

  if arg.smoke:
    smoke = configs_lib.load_config("configs/reward_synthetic.py", "smoke")
    config.mesh = smoke.mesh
    config.data = smoke.data
    config.model = smoke.model
    config.model.trainable = "lora"
    config.train = smoke.train
    config.train.lr = 1e-3
    config.eval = smoke.eval
    config.log_every_steps = smoke.log_every_steps
    config.eval_every_steps = smoke.eval_every_steps
  return config
