r"""SpatialScore as an HTTP reward service (job `reward_serve`; README "Reward service").

  python -m spatial_jax.main --config configs/reward_serve.py --workdir workdirs/serve \
    --config.model_path=workdirs/reward
  python -m spatial_jax.main --config configs/reward_serve.py:smoke --workdir /tmp/serve

`:smoke` serves an untrained tiny SpatialScore on a free port (see `<workdir>/server.json`).
"""

from spatial_jax import configs_lib


def get_config(arg=None):
  arg = configs_lib.parse_arg(arg, smoke=False)
  config = configs_lib.base_config("reward_serve")
  config.model_path = ""  # A reward_train workdir or a SpatialScore export.
  config.untrained_smoke_model = False
  config.host = "127.0.0.1"  # Loopback only; another address exposes the service (use a token).
  config.port = 8123  # 0: any free port (written to <workdir>/server.json).
  # Bearer token; empty: $SPATIAL_SCORE_TOKEN, or none. A token given here is recorded in
  # <workdir>/config.json: prefer the variable.
  config.token = ""
  # Flow-GRPO's pickled protocol. Unpickling runs code the sender chooses: loopback or a
  # trusted network only.
  config.allow_pickle = False
  # Rows per compiled scoring call: concurrent requests are packed into the smallest bucket
  # that holds them (one compile per bucket, at start). For accelerators; on a CPU one bucket
  # the size of a request serves more (BENCHMARKS.md).
  config.buckets = (8, 32, 128)
  config.max_queue = 64  # Requests waiting; beyond it the answer is 503 (retry).
  # How long a call waits for more requests to pack. 0: none (a lone client pays no wait);
  # requests that arrive while a call runs are packed into the next one anyway.
  config.max_wait_ms = 0.0
  config.request_timeout_s = 300.0
  config.serve_seconds = 0  # Stop after this long (0: until SIGTERM / Ctrl-C).
  config.limits = dict(
    max_images=256,
    max_prompt_chars=2000,
    max_request_bytes=64 << 20,
    max_image_bytes=8 << 20,
    max_image_side=4096,
  )
  if arg.smoke:
    config.untrained_smoke_model = True
    config.port = 0
    config.buckets = (4, 16)
  return config
