"""Qwen2.5-VL preprocessing: the image processor and the prompt builder (numpy + PIL, no torch).

Image path. This reproduces transformers 5.24's `Qwen2VLImageProcessorPil` (qwen25vl_reward.md §3.6)
bit for bit: the same `smart_resize`, the same PIL round trip (`to_pil_image` -> `Image.resize` ->
`np.array`), float64 rescale then a float32 cast, float32 normalisation, and the same patch layout.

Which transformers backend is "the" reference? In 5.24 the public name `Qwen2VLImageProcessor` is
the *torchvision* backend, and `AutoImageProcessor` picks torchvision whenever it is installed. Only
without torchvision does `Qwen2VLImageProcessor(...)` fall back to `Qwen2VLImageProcessorPil` (it
logs a warning saying so); this project's venv has no torchvision, so there both names give the PIL
path. We match the PIL path exactly because it is the portable, deterministic one. The torchvision
path resizes the uint8 tensor with `F.interpolate(mode="bicubic", antialias=True)`, a port of PIL's
resampler with different fixed-point rounding: after resizing, well under 1% of values differ by
one or two uint8 levels, i.e. up to 2 / 255 / min(std) ~= 0.030 in `pixel_values`; without a
resize (e.g. 448x448 in) the two agree to ~2e-7 (the tests measure this against that resize).

Prompt path. `build_prompt_ids` expands each image placeholder into `grid_t*grid_h*grid_w //
merge_size**2` copies with the same string substitution as `Qwen2_5_VLProcessor`, then tokenises
the expanded strings, so token ids equal the transformers processor's for the same tokenizer.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import PIL.Image

if TYPE_CHECKING:
  import transformers

  from spatial_jax.models.qwen25vl.config import VisionConfig

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Qwen2.5-VL special-token strings (qwen25vl_reward.md §3.5).
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
IMAGE_PAD = "<|image_pad|>"
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."

# The Qwen2-VL / Qwen2.5-VL `chat_template.json` (as published with the checkpoints; copied from
# public verbatim copies). Kept for reference and for the test that checks `chat_prompt` against it.
QWEN2_VL_CHAT_TEMPLATE = (
  "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
  "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
  "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
  "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
  "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
  "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
  "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture "
  "{{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
  "{% elif content['type'] == 'video' or 'video' in content %}"
  "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video "
  "{{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
  "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
  "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Synthetic-world token strings (spatial_jax.data.tokenizer; kept literal to avoid importing the
# scene grammar here).
SYNTHETIC_BOS = "<bos>"
SYNTHETIC_IMAGE = "<image>"
SYNTHETIC_REWARD = "<reward>"


def smart_resize(
  height: int,
  width: int,
  factor: int = 28,
  min_pixels: int = 56 * 56,
  max_pixels: int = 14 * 14 * 4 * 1280,
) -> tuple[int, int]:
  """Target (height, width): multiples of `factor`, area in [min, max], aspect ratio kept.

  Same arithmetic as transformers' `smart_resize` (Python `round` is banker's rounding; that is
  part of the reference behaviour, so it is kept).

  Raises:
    ValueError: if the aspect ratio exceeds 200.
  """
  if max(height, width) / min(height, width) > 200:
    raise ValueError(
      f"absolute aspect ratio must be smaller than 200, got {max(height, width) / min(height, width)}"
    )
  h_bar = round(height / factor) * factor
  w_bar = round(width / factor) * factor
  if h_bar * w_bar > max_pixels:
    beta = math.sqrt((height * width) / max_pixels)
    h_bar = max(factor, math.floor(height / beta / factor) * factor)
    w_bar = max(factor, math.floor(width / beta / factor) * factor)
  elif h_bar * w_bar < min_pixels:
    beta = math.sqrt(min_pixels / (height * width))
    h_bar = math.ceil(height * beta / factor) * factor
    w_bar = math.ceil(width * beta / factor) * factor
  return h_bar, w_bar


def _to_rgb_hwc(image: Any, do_convert_rgb: bool) -> np.ndarray:
  """An (H, W, C) array; with `do_convert_rgb`, 3 channels with alpha composited onto white."""
  if isinstance(image, PIL.Image.Image):
    if not do_convert_rgb:
      array = np.array(image)
    elif "A" in image.getbands() or image.info.get("transparency") is not None:
      # Palette / LA / RGBA images: transformers composites onto white rather than dropping alpha.
      rgba = image.convert("RGBA")
      white = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
      array = np.array(PIL.Image.alpha_composite(white, rgba).convert("RGB"))
    else:
      array = np.array(image.convert("RGB"))
    return array[..., None] if array.ndim == 2 else array

  array = np.asarray(image)
  if array.ndim == 2:  # transformers rejects bare 2-D arrays; we read them as grayscale.
    array = array[..., None]
  if array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
    raise ValueError(f"Expected an (H, W[, 1|3|4]) channels-last image, got shape {array.shape}")
  if not do_convert_rgb:
    return array
  if array.shape[-1] == 1:
    return np.repeat(array, 3, axis=-1)
  if array.shape[-1] == 4:
    # transformers.image_transforms.convert_to_rgb for arrays: blend in float64, round for ints.
    if np.issubdtype(array.dtype, np.floating) and (array.min() < 0.0 or array.max() > 1.0):
      raise ValueError(f"RGBA float image must lie in [0, 1], got [{array.min()}, {array.max()}]")
    white = 255 if np.issubdtype(array.dtype, np.integer) else 1.0
    alpha = array[..., 3:4] / white
    composite = alpha * array[..., :3] + (1 - alpha) * white
    return (
      np.round(composite).astype(array.dtype) if white == 255 else composite.astype(array.dtype)
    )
  return array


def _pil_resize(image: np.ndarray, height: int, width: int, resample: int) -> np.ndarray:
  """transformers.image_transforms.resize: PIL round trip, incl. its float <-> uint8 handling."""
  # Float images go through uint8 too: integral values in [0, 255] are cast as they are, values in
  # [0, 1] are scaled by 255 and *truncated*, and are scaled back by 1/255 afterwards.
  rescaled = False
  if image.dtype != np.uint8:
    if np.allclose(image, image.astype(int)):
      if image.min() < 0 or image.max() > 255:
        raise ValueError(f"Image values outside [0, 255]: [{image.min()}, {image.max()}]")
    elif image.min() >= 0 and image.max() <= 1:
      rescaled = True
      image = (image.astype(np.float64) * 255).astype(np.float32)
    else:
      raise ValueError(
        f"Float image must lie in [0, 1] or hold integers in [0, 255], got "
        f"[{image.min()}, {image.max()}]"
      )
  image = image.astype(np.uint8)
  pil = PIL.Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
  out = np.array(pil.resize((width, height), resample=resample, reducing_gap=None))
  if out.ndim == 2:
    out = out[..., None]
  if rescaled:
    out = (out.astype(np.float64) * (1 / 255)).astype(np.float32)
  return out


class ImageProcessor:
  """Qwen2-VL / Qwen2.5-VL image processor: resize, rescale, normalise, flatten to patches.

  Output rows are patches in 2x2-merge-block-major order (for each merged token, its
  `merge_size**2` patches row-major), each row the flattened (C, T, P, P) block with the single
  frame repeated `temporal_patch_size` times, exactly as the vision tower expects.
  """

  def __init__(
    self,
    *,
    do_resize: bool = True,
    patch_size: int = 14,
    temporal_patch_size: int = 2,
    merge_size: int = 2,
    min_pixels: int = 56 * 56,
    max_pixels: int = 28 * 28 * 1280,
    resample: int = PIL.Image.Resampling.BICUBIC,
    do_rescale: bool = True,
    rescale_factor: float = 1 / 255,
    do_normalize: bool = True,
    image_mean: Sequence[float] = OPENAI_CLIP_MEAN,
    image_std: Sequence[float] = OPENAI_CLIP_STD,
    do_convert_rgb: bool = True,
  ):
    self.do_resize = do_resize
    self.patch_size = patch_size
    self.temporal_patch_size = temporal_patch_size
    self.merge_size = merge_size
    self.min_pixels = min_pixels
    self.max_pixels = max_pixels
    self.resample = int(resample)
    self.do_rescale = do_rescale
    self.rescale_factor = rescale_factor
    self.do_normalize = do_normalize
    self.image_mean = tuple(float(m) for m in image_mean)
    self.image_std = tuple(float(s) for s in image_std)
    self.do_convert_rgb = do_convert_rgb

  @property
  def factor(self) -> int:
    """Side multiple of a resized image: one merged token spans `patch_size * merge_size` px."""
    return self.patch_size * self.merge_size

  def __repr__(self) -> str:
    fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
    return f"{type(self).__name__}({fields})"

  # -- Construction --------------------------------------------------------------------------

  @classmethod
  def from_dict(cls, config: Mapping[str, Any], **overrides: Any) -> ImageProcessor:
    """From a `preprocessor_config.json` dict; unknown keys (processor_class, ...) are ignored.

    `min_pixels` / `max_pixels` win over `size` (transformers' precedence); `size` may use either
    `{"shortest_edge", "longest_edge"}` (transformers >= 4.50) or `{"min_pixels", "max_pixels"}`
    (older saves).
    """
    kwargs: dict[str, Any] = {}
    size = config.get("size") or {}
    for dst, keys in (
      ("min_pixels", ("shortest_edge", "min_pixels")),
      ("max_pixels", ("longest_edge", "max_pixels")),
    ):
      for key in keys:
        if size.get(key) is not None:
          kwargs[dst] = size[key]
          break
      if config.get(dst) is not None:
        kwargs[dst] = config[dst]
    for key in (
      "do_resize",
      "patch_size",
      "temporal_patch_size",
      "merge_size",
      "resample",
      "do_rescale",
      "rescale_factor",
      "do_normalize",
      "image_mean",
      "image_std",
      "do_convert_rgb",
    ):
      if config.get(key) is not None:
        kwargs[key] = config[key]
    kwargs.update(overrides)
    return cls(**kwargs)

  @classmethod
  def from_pretrained(cls, directory: str | os.PathLike, **overrides: Any) -> ImageProcessor:
    """Reads `preprocessor_config.json` (or a 5.x `processor_config.json`'s image_processor)."""
    directory = os.fspath(directory)
    path = os.path.join(directory, "preprocessor_config.json")
    if os.path.exists(path):
      with open(path) as f:
        config = json.load(f)
    else:
      path = os.path.join(directory, "processor_config.json")
      if not os.path.exists(path):
        raise FileNotFoundError(
          f"No preprocessor_config.json or processor_config.json in {directory!r}"
        )
      with open(path) as f:
        config = json.load(f)
      config = config.get("image_processor", config)
    return cls.from_dict(config, **overrides)

  @classmethod
  def from_config(cls, vision: VisionConfig, **overrides: Any) -> ImageProcessor:
    """Matches a `VisionConfig`'s patching; pixel bounds scale with the patch size.

    Qwen's defaults are 4 merged tokens minimum (56*56 px) and 1280 maximum (28*28*1280 px). They
    are kept as *token* budgets, so a tiny config (patch 4, merge 2: 8 px per token) gets
    min 16*16 px and max 8*8*1280 px, and its small synthetic images are not upscaled.
    """
    factor = vision.patch_size * vision.spatial_merge_size
    kwargs = dict(
      patch_size=vision.patch_size,
      temporal_patch_size=vision.temporal_patch_size,
      merge_size=vision.spatial_merge_size,
      min_pixels=(2 * factor) ** 2,
      max_pixels=factor**2 * 1280,
    )
    kwargs.update(overrides)
    return cls(**kwargs)

  # -- Processing ----------------------------------------------------------------------------

  def resized_size(self, height: int, width: int) -> tuple[int, int]:
    """The (height, width) an input of this size is resized to."""
    if not self.do_resize:
      return height, width
    return smart_resize(height, width, self.factor, self.min_pixels, self.max_pixels)

  def grid_thw(self, height: int, width: int) -> tuple[int, int, int]:
    """`image_grid_thw` row of an input of this size (patch grid after resizing)."""
    h, w = self.resized_size(height, width)
    return 1, h // self.patch_size, w // self.patch_size

  def num_image_tokens(self, height: int, width: int) -> int:
    """Language-model placeholder tokens for an input of this size."""
    return math.prod(self.grid_thw(height, width)) // self.merge_size**2

  def _preprocess_one(self, image: Any) -> tuple[np.ndarray, tuple[int, int, int]]:
    array = _to_rgb_hwc(image, self.do_convert_rgb)
    if self.do_resize:
      h, w = self.resized_size(*array.shape[:2])
      array = _pil_resize(array, h, w, self.resample)
    if self.do_rescale:
      array = (array.astype(np.float64) * self.rescale_factor).astype(np.float32)
    if self.do_normalize:
      # Float32 unless the image is float64 already (transformers keeps the float dtype).
      if not np.issubdtype(array.dtype, np.floating):
        array = array.astype(np.float32)
      mean = np.asarray(self.image_mean, dtype=array.dtype)
      std = np.asarray(self.image_std, dtype=array.dtype)
      if mean.shape[0] != array.shape[-1]:
        raise ValueError(f"{mean.shape[0]} mean values for {array.shape[-1]} channels")
      array = (array - mean) / std
    return self._patchify(np.asarray(array, dtype=np.float32))

  def _patchify(self, image: np.ndarray) -> tuple[np.ndarray, tuple[int, int, int]]:
    height, width, channels = image.shape
    p, m, t = self.patch_size, self.merge_size, self.temporal_patch_size
    if height % (p * m) or width % (p * m):
      raise ValueError(f"Image {height}x{width} is not a multiple of patch*merge = {p * m}")
    grid_h, grid_w = height // p, width // p
    # (H, W, C) -> (gh/m, m, p, gw/m, m, p, C) -> (gh/m, gw/m, m, m, C, p, p): merge-block major,
    # then each patch flattened channel-major, matching the tower's Conv3d weight layout.
    patches = image.reshape(grid_h // m, m, p, grid_w // m, m, p, channels)
    patches = patches.transpose(0, 3, 1, 4, 6, 2, 5)
    # A still image is one frame; the temporal patch needs `t` frames, so the frame is repeated.
    patches = np.broadcast_to(patches[:, :, :, :, :, None], (*patches.shape[:5], t, p, p))
    return patches.reshape(grid_h * grid_w, channels * t * p * p), (1, grid_h, grid_w)

  def __call__(self, images: Any) -> dict[str, np.ndarray]:
    """Preprocesses a list of images (PIL images or channels-last arrays; one image allowed).

    Arrays may be uint8, integer-valued floats in [0, 255], or floats in [0, 1] (transformers'
    PIL path quantises those to uint8 for resizing and, with `do_rescale=True`, still multiplies
    them by `rescale_factor`: pass `do_rescale=False` for [0, 1] floats).

    Returns:
      {"pixel_values": float32 (sum of t*h*w over images, C*T*P*P),
       "image_grid_thw": int64 (num_images, 3)}.
    """
    if isinstance(images, PIL.Image.Image) or (
      isinstance(images, np.ndarray) and images.ndim in (2, 3)
    ):
      images = [images]
    if len(images) == 0:
      raise ValueError("No images given")
    # A batch may hold one image object several times (a reward pair's images appear under
    # the prompt and the perturbed prompt): each distinct object is processed once.
    done: dict[int, tuple[np.ndarray, tuple[int, int, int]]] = {}
    for image in images:
      if id(image) not in done:
        done[id(image)] = self._preprocess_one(image)
    patches, grids = zip(*(done[id(image)] for image in images), strict=True)
    return {
      "pixel_values": np.concatenate(patches, axis=0),
      "image_grid_thw": np.asarray(grids, dtype=np.int64),
    }


# -- Prompts ---------------------------------------------------------------------------------


def chat_prompt(
  user_text: str,
  *,
  system: str | None = DEFAULT_SYSTEM_PROMPT,
  num_images: int = 1,
  add_generation_prompt: bool = True,
) -> str:
  """The Qwen2.5-VL chat-template string of one user turn: images first, then the text.

  Equals `apply_chat_template([{"role": "user", "content": [{"type": "image"}] * num_images +
  [{"type": "text", "text": user_text}]}], add_generation_prompt=True)` with the official template
  (which inserts the default system turn); a non-default `system` equals passing a system message
  first. `system=None` drops the system turn (not something the official template produces).
  """
  prompt = "" if system is None else f"{IM_START}system\n{system}{IM_END}\n"
  images = f"{VISION_START}{IMAGE_PAD}{VISION_END}" * num_images
  prompt += f"{IM_START}user\n{images}{user_text}{IM_END}\n"
  if add_generation_prompt:
    prompt += f"{IM_START}assistant\n"
  return prompt


def synthetic_prompt(text: str, num_images: int = 1, *, reward_token: bool = False) -> str:
  """Synthetic-world sequence format: `"<bos> <image> {text}"` (+ `" <reward>"`).

  One `<image>` per image, each later expanded to its merged-token count by `build_prompt_ids`.
  The synthetic tokenizer splits on whitespace and matches special tokens first, so the spaces
  only aid readability. `reward_token=True` appends `<reward>` last, where an HPSv3-style reward
  head pools its score.
  """
  parts = [SYNTHETIC_BOS, *([SYNTHETIC_IMAGE] * num_images), text]
  if reward_token:
    parts.append(SYNTHETIC_REWARD)
  return " ".join(part for part in parts if part)


def expand_image_tokens(
  texts: Sequence[str], image_grid_thw: Any, *, merge_size: int, image_token: str
) -> list[str]:
  """Replaces the i-th placeholder (counted across the batch) with image i's token count.

  Raises:
    ValueError: if the number of placeholders differs from the number of images.
  """
  grids = np.asarray(image_grid_thw, dtype=np.int64).reshape(-1, 3)
  counts = [text.count(image_token) for text in texts]
  if sum(counts) != len(grids):
    raise ValueError(
      f"{sum(counts)} {image_token!r} placeholders in the texts but {len(grids)} images "
      f"(per text: {counts})"
    )
  num_tokens = [int(np.prod(grid)) // merge_size**2 for grid in grids]
  expanded, index = [], 0
  for text in texts:
    pieces = text.split(image_token)
    out = [pieces[0]]
    for piece in pieces[1:]:
      out.append(image_token * num_tokens[index])
      out.append(piece)
      index += 1
    expanded.append("".join(out))
  return expanded


def build_prompt_ids(
  tokenizer: transformers.PreTrainedTokenizerBase,
  texts: Sequence[str],
  image_grid_thw: Any,
  *,
  merge_size: int,
  image_token: str,
  padding_side: str = "right",
  max_length: int | None = None,
  pad_token_id: int | None = None,
  add_special_tokens: bool = False,
  return_mm_token_type_ids: bool = False,
) -> dict[str, np.ndarray]:
  """Tokenises prompts with each image placeholder expanded, and pads them into a batch.

  Args:
    tokenizer: any Hugging Face tokenizer (the real Qwen one or the synthetic word-level one).
    texts: prompts, each holding one `image_token` per image it shows; images are assigned to
      placeholders in order across the batch (as in `Qwen2_5_VLProcessor`).
    image_grid_thw: (num_images, 3) grid rows from `ImageProcessor`.
    merge_size: spatial merge size (tokens per image = t*h*w // merge_size**2).
    image_token: placeholder string: `"<|image_pad|>"` (Qwen) or `"<image>"` (synthetic).
    padding_side: "right" or "left".
    max_length: pad every row to this length instead of to the longest row. Rows are never
      truncated (that could cut image tokens): a longer row raises.
    pad_token_id: overrides `tokenizer.pad_token_id`.
    add_special_tokens: forwarded to the tokenizer. Off because the templates above spell out
      every special token; the Qwen and synthetic tokenizers add none either way, so this matches
      the transformers processor (which leaves the tokenizer default on).
    return_mm_token_type_ids: also return `mm_token_type_ids` (1 at image tokens), which
      transformers 5.24's model needs for 3-D M-RoPE positions (qwen25vl_reward.md §1.4b).

  Returns:
    {"input_ids", "attention_mask"[, "mm_token_type_ids"]}: int32 arrays (batch, length).
  """
  if padding_side not in ("left", "right"):
    raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
  image_token_id = tokenizer.convert_tokens_to_ids(image_token)
  if image_token_id is None or image_token_id == tokenizer.unk_token_id:
    raise ValueError(f"{image_token!r} is not a token of this tokenizer")
  expanded = expand_image_tokens(
    texts, image_grid_thw, merge_size=merge_size, image_token=image_token
  )
  rows = tokenizer(expanded, add_special_tokens=add_special_tokens)["input_ids"]
  length = max(len(row) for row in rows)
  if max_length is not None:
    if length > max_length:
      raise ValueError(f"A prompt has {length} tokens, more than max_length={max_length}")
    length = max_length
  pad = tokenizer.pad_token_id if pad_token_id is None else pad_token_id
  if pad is None and any(len(row) < length for row in rows):
    raise ValueError("The tokenizer has no pad token; pass pad_token_id")
  input_ids = np.full((len(rows), length), pad if pad is not None else 0, dtype=np.int32)
  attention_mask = np.zeros((len(rows), length), dtype=np.int32)
  for i, row in enumerate(rows):
    span = slice(0, len(row)) if padding_side == "right" else slice(length - len(row), length)
    input_ids[i, span] = row
    attention_mask[i, span] = 1
  out = {"input_ids": input_ids, "attention_mask": attention_mask}
  if return_mm_token_type_ids:
    out["mm_token_type_ids"] = ((input_ids == image_token_id) & (attention_mask == 1)).astype(
      np.int32
    )
  return out
