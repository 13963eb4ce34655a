"""The SpatialScore service's wire formats: requests decoded and checked, answers encoded.

No JAX here: the server's HTTP layer and the client import it (the client needs numpy and PIL
only). Two request formats:

- JSON (the default): `{"prompts": [str, ...], "images": [base64 PNG or JPEG, ...]}` ->
  `{"mu": [float, ...], "sigma": [float, ...]}`.
- Flow-GRPO's reward-server protocol, only where the server allows pickle: a pickled dict
  `{"images": [JPEG/PNG bytes, ...], "prompts": [...]` (or `"meta_datas": [{"prompt": ...}, ...]`
  as GenEval's metadata carries them)`}` -> a pickled dict `{"scores": mu, "mu", "sigma"}`.
  Unpickling runs code chosen by the sender: never enable it beyond loopback or a trusted net.

Every check raises `RequestError(status, message)`, the message naming what is wrong, so the
server answers 4xx and keeps serving.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import io
import json
import pickle
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

JSON_TYPE = "application/json"
PICKLE_TYPE = "application/octet-stream"
_FORMATS = ("PNG", "JPEG")


class RequestError(ValueError):
  """A request the server refuses: `status` (4xx/5xx) and a message naming the problem."""

  def __init__(self, status: int, message: str):
    super().__init__(message)
    self.status = status
    self.message = message


@dataclasses.dataclass(frozen=True)
class Limits:
  """What one request may hold (`reward_serve`'s `config.limits`)."""

  max_images: int = 256
  max_prompt_chars: int = 2000
  max_request_bytes: int = 64 << 20
  max_image_bytes: int = 8 << 20
  max_image_side: int = 4096


def encode_image(image: Any, fmt: str = "PNG") -> bytes:
  """uint8 (H, W, 3) array or PIL image -> PNG (lossless, the default) or JPEG bytes."""
  if not isinstance(image, Image.Image):
    array = np.asarray(image)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[-1] != 3:
      raise ValueError(f"Expected a uint8 (H, W, 3) image, got {array.dtype} {array.shape}")
    image = Image.fromarray(array)
  buffer = io.BytesIO()
  image.convert("RGB").save(buffer, format=fmt)
  return buffer.getvalue()


def json_request(images: Sequence[Any], prompts: Sequence[str], fmt: str = "PNG") -> bytes:
  """The JSON body of a /score request."""
  encoded = [base64.b64encode(encode_image(im, fmt)).decode("ascii") for im in images]
  return json.dumps({"prompts": [str(p) for p in prompts], "images": encoded}).encode()


def decode_image(data: bytes, index: int, limits: Limits) -> np.ndarray:
  """PNG or JPEG bytes -> uint8 (H, W, 3); RequestError(400/413) naming images[index]."""
  if len(data) > limits.max_image_bytes:
    raise RequestError(
      413, f"images[{index}] is {len(data)} bytes > the limit of {limits.max_image_bytes}"
    )
  try:
    with Image.open(io.BytesIO(data)) as image:
      if image.format not in _FORMATS:
        raise RequestError(400, f"images[{index}] is {image.format}; send PNG or JPEG")
      if max(image.size) > limits.max_image_side:
        raise RequestError(
          413,
          f"images[{index}] is {image.size[0]}x{image.size[1]} px; the largest side allowed is "
          f"{limits.max_image_side}",
        )
      return np.asarray(image.convert("RGB"))
  except RequestError:
    raise
  except (OSError, ValueError, Image.DecompressionBombError) as e:
    raise RequestError(400, f"images[{index}] is not a readable PNG or JPEG: {e}") from e


def _check(images: Any, prompts: Any, limits: Limits) -> None:
  if not isinstance(images, list) or not isinstance(prompts, list):
    raise RequestError(400, '"images" and "prompts" must be lists')
  if not images:
    raise RequestError(400, "No images in the request")
  if len(images) != len(prompts):
    raise RequestError(400, f"{len(images)} images but {len(prompts)} prompts")
  if len(images) > limits.max_images:
    raise RequestError(413, f"{len(images)} images > the limit of {limits.max_images} a request")
  for i, prompt in enumerate(prompts):
    if not isinstance(prompt, str):
      raise RequestError(400, f"prompts[{i}] is a {type(prompt).__name__}, not a string")
    if not prompt.strip():
      raise RequestError(400, f"prompts[{i}] is empty")
    if len(prompt) > limits.max_prompt_chars:
      raise RequestError(
        413, f"prompts[{i}] has {len(prompt)} characters > the limit of {limits.max_prompt_chars}"
      )


def decode_json(body: bytes, limits: Limits) -> tuple[list[np.ndarray], list[str]]:
  """A JSON /score body -> (uint8 images, prompts)."""
  try:
    request = json.loads(body)
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise RequestError(400, f"The body is not valid JSON ({e}); truncated?") from e
  if not isinstance(request, dict) or not {"images", "prompts"} <= set(request):
    raise RequestError(400, 'Expected a JSON object with "images" and "prompts"')
  images, prompts = request["images"], request["prompts"]
  _check(images, prompts, limits)
  decoded = []
  for i, item in enumerate(images):
    if not isinstance(item, str):
      raise RequestError(400, f"images[{i}] must be a base64 string")
    try:
      data = base64.b64decode(item, validate=True)
    except (binascii.Error, ValueError) as e:
      raise RequestError(400, f"images[{i}] is not valid base64: {e}") from e
    decoded.append(decode_image(data, i, limits))
  return decoded, prompts


def decode_pickle(body: bytes, limits: Limits) -> tuple[list[np.ndarray], list[str]]:
  """A Flow-GRPO reward-server body -> (uint8 images, prompts). Unsafe on untrusted input."""
  try:
    request = pickle.loads(body)  # noqa: S301 -- only with config.allow_pickle (documented).
  except Exception as e:  # A truncated or foreign body raises anything pickle can.
    raise RequestError(400, f"The body is not a pickled dict ({type(e).__name__}: {e})") from e
  if not isinstance(request, dict) or "images" not in request:
    raise RequestError(400, 'Expected a pickled dict with "images" and "prompts" (or "meta_datas")')
  images, prompts = request["images"], request.get("prompts")
  if prompts is None:
    metas = request.get("meta_datas")
    if not isinstance(metas, list) or not all(isinstance(m, dict) and "prompt" in m for m in metas):
      raise RequestError(400, 'Give "prompts", or "meta_datas" with a "prompt" in each')
    prompts = [m["prompt"] for m in metas]
  images, prompts = list(images) if isinstance(images, tuple) else images, list(prompts)
  _check(images, prompts, limits)
  decoded = []
  for i, item in enumerate(images):
    if isinstance(item, bytes | bytearray):
      decoded.append(decode_image(bytes(item), i, limits))
    else:
      raise RequestError(400, f"images[{i}] must be JPEG or PNG bytes")
  return decoded, prompts


def json_answer(mu: np.ndarray, sigma: np.ndarray) -> bytes:
  return json.dumps({"mu": np.asarray(mu).tolist(), "sigma": np.asarray(sigma).tolist()}).encode()


def pickle_answer(mu: np.ndarray, sigma: np.ndarray) -> bytes:
  mu, sigma = np.asarray(mu, np.float32), np.asarray(sigma, np.float32)
  return pickle.dumps({"scores": mu.tolist(), "mu": mu.tolist(), "sigma": sigma.tolist()})
