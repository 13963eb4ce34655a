"""Qwen2.5-VL preprocessing: parity with transformers' image processor and prompt expansion."""

import json
import math
import re
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
import torch
import torch.nn.functional as F
import transformers
from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from transformers.models.qwen2_vl import image_processing_pil_qwen2_vl as hf_image

from spatial_jax.data import tokenizer as synthetic_tokenizer
from spatial_jax.models.qwen25vl import processor
from spatial_jax.models.qwen25vl.config import Qwen25VLConfig

TINY = Qwen25VLConfig.tiny()
# Ours is an exact re-implementation, so outputs are expected bit-equal; the bound only leaves
# room for a platform's float rounding.
ATOL = 1e-6


def _hf_image_processor(**kwargs):
  # transformers 5.24: `Qwen2VLImageProcessor` is the torchvision backend and only falls back to
  # this PIL class when torchvision is missing; name the PIL class so the reference is the same
  # with or without torchvision.
  return hf_image.Qwen2VLImageProcessorPil(**kwargs)


def _assert_same(ours, hf_processor, images):
  want = hf_processor(images, return_tensors="np")
  got = ours(images)
  np.testing.assert_array_equal(got["image_grid_thw"], want["image_grid_thw"])
  assert got["image_grid_thw"].dtype == np.int64
  assert got["pixel_values"].dtype == np.float32
  assert got["pixel_values"].shape == want["pixel_values"].shape
  np.testing.assert_allclose(got["pixel_values"], want["pixel_values"], rtol=0, atol=ATOL)
  return got


# -- smart_resize ----------------------------------------------------------------------------


def test_smart_resize_matches_transformers():
  rng = np.random.default_rng(0)
  sizes = [(1, 1), (7, 300), (28, 28), (100, 37), (448, 448), (512, 512), (1024, 1024)]
  sizes += [tuple(int(v) for v in rng.integers(1, 3000, 2)) for _ in range(300)]
  bounds = [(56 * 56, 28 * 28 * 1280), (200704, 200704), (3136, 12845056), (256, 81920), (64, 4096)]
  for height, width in sizes:
    if max(height, width) / min(height, width) > 200:
      continue
    for factor in (28, 8, 4):
      for min_pixels, max_pixels in bounds:
        args = (height, width, factor, min_pixels, max_pixels)
        assert processor.smart_resize(*args) == hf_image.smart_resize(*args), args


def test_smart_resize_reference_sizes():
  # qwen25vl_reward.md §3.6 (derived), default min/max and HPSv3's min = max = 256*28*28.
  assert processor.smart_resize(448, 448) == (448, 448)
  assert processor.smart_resize(512, 512) == (504, 504)
  assert processor.smart_resize(1024, 1024) == (980, 980)
  for side in (512, 1024):
    assert processor.smart_resize(side, side, 28, 200704, 200704) == (448, 448)


def test_smart_resize_rejects_extreme_aspect_ratio():
  with pytest.raises(ValueError, match="aspect ratio must be smaller than 200"):
    processor.smart_resize(10, 2010)
  with pytest.raises(ValueError, match="aspect ratio"):
    processor.ImageProcessor()([np.zeros((3, 700, 3), np.uint8)])
  assert processor.smart_resize(10, 2000)  # exactly 200 is allowed


# -- ImageProcessor ----------------------------------------------------------------------------


def test_module_imports_neither_torch_nor_transformers():
  # The package imports the JAX model too; the processor itself needs neither torch nor
  # transformers, so a data pipeline stays light.
  code = (
    "import sys, spatial_jax.models.qwen25vl.processor;"
    "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
  )
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "[]"


@pytest.mark.parametrize(
  "shape",
  [
    (448, 448),  # kept
    (512, 512),  # -> 504
    (1024, 1024),  # -> 980
    (300, 517),  # non-square
    (517, 300),
    (9, 13),  # tiny: upscaled to >= 56*56 px
    (1400, 1000),  # > max_pixels: downscaled
    (20, 900),  # 45:1
  ],
)
def test_image_processor_matches_transformers(shape):
  image = np.random.default_rng(sum(shape)).integers(0, 256, (*shape, 3), dtype=np.uint8)
  got = _assert_same(processor.ImageProcessor(), _hf_image_processor(), [image])
  t, gh, gw = got["image_grid_thw"][0]
  assert got["pixel_values"].shape == (t * gh * gw, 3 * 2 * 14 * 14)


def test_image_processor_input_kinds_and_mixed_batch():
  rng = np.random.default_rng(1)
  rgba = rng.integers(0, 256, (90, 130, 4), dtype=np.uint8)
  rgba[..., 3] = rng.integers(0, 256, (90, 130))  # partly transparent: composited onto white
  images = [
    rng.integers(0, 256, (60, 70, 3), dtype=np.uint8),
    PIL.Image.fromarray(rng.integers(0, 256, (120, 64, 3), dtype=np.uint8)),
    PIL.Image.fromarray(rng.integers(0, 256, (90, 70), dtype=np.uint8), mode="L"),
    PIL.Image.fromarray(rgba, mode="RGBA"),
    rgba,  # RGBA array
    rng.integers(0, 256, (50, 80, 1), dtype=np.uint8),  # 1-channel array
    rng.random((77, 50, 3)).astype(np.float32),  # floats in [0, 1]
    rng.integers(0, 256, (40, 90, 3)).astype(np.float64),  # integral floats
  ]
  hf = _hf_image_processor()
  ours = processor.ImageProcessor()
  got = _assert_same(ours, hf, images)
  # The batch is the concatenation of the single-image results, in order.
  singles = [ours([image])["pixel_values"] for image in images]
  np.testing.assert_array_equal(got["pixel_values"], np.concatenate(singles))
  # An image object given several times (a reward pair's rows) is processed once, same result.
  repeated = ours([images[0], images[1], images[0]])["pixel_values"]
  np.testing.assert_array_equal(repeated, np.concatenate([singles[0], singles[1], singles[0]]))
  # A 2-D array (transformers rejects it) is read as grayscale, like its (H, W, 1) form.
  gray = rng.integers(0, 256, (50, 80), dtype=np.uint8)
  np.testing.assert_array_equal(ours(gray)["pixel_values"], ours([gray[..., None]])["pixel_values"])


def test_image_processor_options_match_transformers():
  rng = np.random.default_rng(2)
  images = [rng.random((63, 45, 3)).astype(np.float32), rng.random((30, 100, 3)).astype(np.float32)]
  kwargs = dict(do_rescale=False, min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 16)
  _assert_same(processor.ImageProcessor(**kwargs), _hf_image_processor(**kwargs), images)
  kwargs = dict(
    do_normalize=False,
    resample=PIL.Image.Resampling.BILINEAR,
    image_mean=(0.5, 0.5, 0.5),
    temporal_patch_size=1,
  )
  uint8 = [(image * 255).astype(np.uint8) for image in images]
  _assert_same(processor.ImageProcessor(**kwargs), _hf_image_processor(**kwargs), uint8)


def test_image_processor_tiny_config_matches_transformers():
  ours = processor.ImageProcessor.from_config(TINY.vision)
  assert (ours.patch_size, ours.merge_size, ours.temporal_patch_size) == (4, 2, 2)
  assert (ours.min_pixels, ours.max_pixels) == (16 * 16, 8 * 8 * 1280)
  hf = _hf_image_processor(patch_size=4, merge_size=2, min_pixels=256, max_pixels=81920)
  rng = np.random.default_rng(3)
  images = [rng.integers(0, 256, shape, dtype=np.uint8) for shape in [(32, 40, 3), (9, 7, 3)]]
  images.append(rng.integers(0, 256, (700, 500, 3), dtype=np.uint8))  # downscaled
  got = _assert_same(ours, hf, images)
  # The synthetic world's 32x40 images are kept as they are: 8x10 patches, 20 LLM tokens.
  np.testing.assert_array_equal(got["image_grid_thw"][0], [1, 8, 10])
  assert ours.num_image_tokens(32, 40) == 20
  assert got["pixel_values"].shape[1] == TINY.vision.patch_dim


def test_patch_layout_is_merge_block_major():
  p, m, t = 2, 2, 3
  ours = processor.ImageProcessor(
    patch_size=p,
    merge_size=m,
    temporal_patch_size=t,
    do_resize=False,
    do_rescale=False,
    do_normalize=False,
  )
  image = np.arange(8 * 12 * 3, dtype=np.uint8).reshape(8, 12, 3)
  out = ours([image])
  np.testing.assert_array_equal(out["image_grid_thw"], [[1, 4, 6]])
  rows = out["pixel_values"]
  grid_w = 6
  for bi in range(4 // m):
    for bj in range(grid_w // m):
      for mi in range(m):
        for mj in range(m):
          row = ((bi * (grid_w // m) + bj) * m + mi) * m + mj
          y, x = (bi * m + mi) * p, (bj * m + mj) * p
          patch = image[y : y + p, x : x + p].transpose(2, 0, 1).astype(np.float32)  # (C, p, p)
          want = np.broadcast_to(patch[:, None], (3, t, p, p)).reshape(-1)
          np.testing.assert_array_equal(rows[row], want)
  with pytest.raises(ValueError, match="not a multiple"):
    ours([np.zeros((6, 12, 3), np.uint8)])


def test_from_pretrained_matches_transformers(tmp_path):
  rng = np.random.default_rng(4)
  images = [rng.integers(0, 256, (300, 200, 3), dtype=np.uint8)]
  configs = [
    # transformers >= 4.50 form.
    {"size": {"shortest_edge": 3136, "longest_edge": 40000}, "patch_size": 14},
    # The released Qwen2.5-VL form: min/max_pixels (they win over `size`).
    {
      "min_pixels": 3136,
      "max_pixels": 28 * 28 * 64,
      "size": {"shortest_edge": 100, "longest_edge": 200},
      "image_mean": [0.5, 0.5, 0.5],
      "image_std": [0.5, 0.5, 0.5],
      "image_processor_type": "Qwen2VLImageProcessor",
      "processor_class": "Qwen2_5_VLProcessor",
    },
  ]
  for index, config in enumerate(configs):
    directory = tmp_path / str(index)
    directory.mkdir()
    (directory / "preprocessor_config.json").write_text(json.dumps(config))
    ours = processor.ImageProcessor.from_pretrained(directory)
    hf = hf_image.Qwen2VLImageProcessorPil.from_pretrained(str(directory))
    assert (ours.min_pixels, ours.max_pixels) == (hf.size.shortest_edge, hf.size.longest_edge)
    _assert_same(ours, hf, images)
  # Older saves put min/max_pixels inside `size`; 5.x processor_config.json nests the dict.
  directory = tmp_path / "nested"
  directory.mkdir()
  nested = {"image_processor": {"size": {"min_pixels": 1000, "max_pixels": 5000}}}
  (directory / "processor_config.json").write_text(json.dumps(nested))
  ours = processor.ImageProcessor.from_pretrained(directory, merge_size=1)
  assert (ours.min_pixels, ours.max_pixels, ours.merge_size) == (1000, 5000, 1)


def test_torchvision_backend_tolerance():
  """Transformers' default backend when torchvision is installed, emulated with its resize.

  torchvision's `resize` on a CPU uint8 tensor with BICUBIC calls `F.interpolate(uint8,
  mode="bicubic", antialias=True)` directly; the backend then fuses rescale into normalise.
  """
  rng = np.random.default_rng(5)
  ours = processor.ImageProcessor()
  mean = torch.tensor(processor.OPENAI_CLIP_MEAN) * 255
  std = torch.tensor(processor.OPENAI_CLIP_STD) * 255
  for shape in [(448, 448), (512, 512), (300, 517), (37, 61)]:
    image = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
    height, width = ours.resized_size(*shape)
    x = torch.from_numpy(image).permute(2, 0, 1)[None].contiguous()
    x = F.interpolate(x, size=(height, width), mode="bicubic", antialias=True, align_corners=False)
    x = (x[0].to(torch.float32) - mean[:, None, None]) / std[:, None, None]
    fast, _ = ours._patchify(x.permute(1, 2, 0).numpy())
    diff = np.abs(ours([image])["pixel_values"] - fast)
    if (height, width) == shape:
      assert diff.max() < 1e-6
    else:
      # At most 2 uint8 levels, in under 2% of values (measured: <= 0.030, < 1%).
      assert diff.max() <= 2 / 255 / min(processor.OPENAI_CLIP_STD) + 1e-5
      assert (diff > 1e-5).mean() < 0.02


# -- Prompts ---------------------------------------------------------------------------------

QWEN_SPECIALS = {
  "<|endoftext|>": 151643,
  "<|im_start|>": 151644,
  "<|im_end|>": 151645,
  "<|vision_start|>": 151652,
  "<|vision_end|>": 151653,
  "<|image_pad|>": 151655,
  "<|video_pad|>": 151656,
}
# GPT-style pieces: newlines, words with their leading space, punctuation.
_PIECE = Regex(r"\n| ?[A-Za-z0-9]+|[^\sA-Za-z0-9]| ")


def _qwen_like_tokenizer(texts, known=None):
  """A WordLevel stand-in for Qwen's tokenizer: Qwen's special-token ids, GPT-style pieces."""
  pre = pre_tokenizers.Split(_PIECE, behavior="isolated")
  vocab = dict(QWEN_SPECIALS) | dict(known or {}) | {"<unk>": 0}
  split = "|".join(re.escape(token) for token in QWEN_SPECIALS)
  for text in texts:
    for chunk in re.split(split, text):
      for piece, _ in pre.pre_tokenize_str(chunk):
        vocab.setdefault(piece, 1000 + len(vocab))
  tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
  tok.pre_tokenizer = pre
  tok.add_special_tokens(list(QWEN_SPECIALS))
  return transformers.PreTrainedTokenizerFast(
    tokenizer_object=tok, pad_token="<|endoftext|>", unk_token="<unk>"
  )


def test_chat_prompt_matches_official_template():
  tok = _qwen_like_tokenizer([])
  for num_images in (0, 1, 2):
    content = [{"type": "image"}] * num_images + [{"type": "text", "text": "Is the cat left?"}]
    for system in (None, "Judge spatial accuracy."):
      messages = [{"role": "user", "content": content}]
      if system is not None:
        messages.insert(0, {"role": "system", "content": system})
      want = tok.apply_chat_template(
        messages,
        chat_template=processor.QWEN2_VL_CHAT_TEMPLATE,
        tokenize=False,
        add_generation_prompt=True,
      )
      got = processor.chat_prompt(
        "Is the cat left?",
        num_images=num_images,
        system=processor.DEFAULT_SYSTEM_PROMPT if system is None else system,
      )
      assert got == want
  assert processor.chat_prompt("x", system=None) == (
    "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>x<|im_end|>\n"
    "<|im_start|>assistant\n"
  )


def test_chat_prompt_reproduces_integration_test_prefix_ids():
  # qwen25vl_reward.md §3.5. The ids of the ordinary pieces are Qwen's BPE ids; with a tokenizer
  # that splits like Qwen's, the template's layout must give exactly this prefix.
  known = {
    "system": 8948,
    "\n": 198,
    "You": 2610,
    " are": 525,
    " a": 264,
    " helpful": 10950,
    " assistant": 17847,
    ".": 13,
    "user": 872,
  }
  prompt = processor.chat_prompt("Describe this image.")
  tok = _qwen_like_tokenizer([prompt], known)
  ids = processor.build_prompt_ids(
    tok, [prompt], [[1, 4, 4]], merge_size=2, image_token=processor.IMAGE_PAD
  )["input_ids"][0]
  want = [151644, 8948, 198, 2610, 525, 264, 10950, 17847, 13, 151645, 198, 151644, 872, 198]
  assert ids[:14].tolist() == want
  assert ids[14:20].tolist() == [151652, 151655, 151655, 151655, 151655, 151653]


class _OfflineQwen25VLProcessor(transformers.Qwen2_5_VLProcessor):
  """Builds without a video processor: 5.24's video processors need torchvision.

  Only `ProcessorMixin`'s type check of the (unused) `video_processor=None` is skipped; the text
  expansion and tokenisation are transformers' own.
  """

  def check_argument_for_proper_class(self, argument_name, argument):
    if argument_name == "video_processor" and argument is None:
      return None
    return super().check_argument_for_proper_class(argument_name, argument)


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_build_prompt_ids_matches_transformers_processor(padding_side):
  rng = np.random.default_rng(6)
  images = [rng.integers(0, 256, shape, dtype=np.uint8) for shape in [(20, 30, 3), (40, 16, 3)]]
  images.append(rng.integers(0, 256, (33, 33, 3), dtype=np.uint8))
  texts = [
    processor.chat_prompt("Is the red cube left of the ball?", num_images=2),
    processor.chat_prompt("A ball.", system="Rate it."),
  ]
  tok = _qwen_like_tokenizer(texts)
  tok.padding_side = padding_side
  kwargs = dict(patch_size=4, merge_size=2, min_pixels=8 * 8, max_pixels=64 * 64)
  hf = _OfflineQwen25VLProcessor(image_processor=_hf_image_processor(**kwargs), tokenizer=tok)
  want = hf(text=texts, images=images, padding=True, return_tensors="np")
  grid = processor.ImageProcessor(**kwargs)(images)["image_grid_thw"]
  np.testing.assert_array_equal(grid, want["image_grid_thw"])
  got = processor.build_prompt_ids(
    tok,
    texts,
    grid,
    merge_size=2,
    image_token=processor.IMAGE_PAD,
    padding_side=padding_side,
    return_mm_token_type_ids=True,
  )
  for key in ("input_ids", "attention_mask", "mm_token_type_ids"):
    np.testing.assert_array_equal(got[key], want[key], err_msg=key)
  # Row 0 shows images 0 and 1, row 1 image 2.
  per_image = [math.prod(g) // 4 for g in grid.tolist()]
  counts = (got["input_ids"] == QWEN_SPECIALS["<|image_pad|>"]).sum(axis=1)
  assert counts.tolist() == [per_image[0] + per_image[1], per_image[2]]


@pytest.fixture(scope="module")
def synthetic_tok(tmp_path_factory):
  directory = tmp_path_factory.mktemp("tokenizer")
  synthetic_tokenizer.save_tokenizer(directory)
  return synthetic_tokenizer.load_tokenizer(directory)


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_build_prompt_ids_synthetic(synthetic_tok, padding_side):
  image_id = synthetic_tok.convert_tokens_to_ids("<image>")
  assert image_id == TINY.image_token_id == 4
  ours = processor.ImageProcessor.from_config(TINY.vision)
  rng = np.random.default_rng(7)
  images = [rng.integers(0, 256, shape, dtype=np.uint8) for shape in [(32, 40, 3), (16, 24, 3)]]
  grid = ours(images)["image_grid_thw"]
  texts = [
    processor.synthetic_prompt("a red circle left of a blue square."),
    processor.synthetic_prompt("a square.", reward_token=True),
  ]
  assert texts[1] == "<bos> <image> a square. <reward>"
  out = processor.build_prompt_ids(
    synthetic_tok,
    texts,
    grid,
    merge_size=TINY.vision.spatial_merge_size,
    image_token="<image>",
    padding_side=padding_side,
  )
  ids, mask = out["input_ids"], out["attention_mask"]
  assert ids.dtype == mask.dtype == np.int32
  assert (ids == image_id).sum(axis=1).tolist() == [20, 6]  # 8x10 and 4x6 patches / 4
  text_lengths = [len(synthetic_tok(t)["input_ids"]) for t in texts]
  lengths = [n - 1 + k for n, k in zip(text_lengths, [20, 6], strict=True)]
  assert mask.sum(axis=1).tolist() == lengths
  assert ids.shape == (2, max(lengths))
  for row in range(2):
    valid = ids[row][mask[row] == 1]
    assert (ids[row][mask[row] == 0] == synthetic_tok.pad_token_id).all()
    # Left padding puts the pads first, right padding last; real tokens stay contiguous.
    first = np.flatnonzero(mask[row])[0]
    assert first == (0 if padding_side == "right" else ids.shape[1] - lengths[row])
    assert valid[0] == synthetic_tok.bos_token_id
    # The image tokens sit right after <bos>, and the text decodes back unchanged.
    assert (valid[1 : 1 + (valid == image_id).sum()] == image_id).all()
    rest = valid[valid != image_id][1:]
    assert synthetic_tok.decode(rest) == texts[row].replace("<bos> <image> ", "")


def test_build_prompt_ids_multiple_images_and_errors(synthetic_tok):
  grid = np.array([[1, 4, 4], [1, 2, 6], [1, 2, 2]])
  texts = [processor.synthetic_prompt("a circle.", num_images=2), "<bos> <image>"]
  out = processor.build_prompt_ids(
    synthetic_tok, texts, grid, merge_size=2, image_token="<image>", max_length=40
  )
  assert out["input_ids"].shape == (2, 40)
  assert (out["input_ids"] == 4).sum(axis=1).tolist() == [4 + 3, 1]
  assert out["attention_mask"].sum(axis=1).tolist() == [1 + 7 + 3, 2]
  with pytest.raises(ValueError, match="max_length"):
    processor.build_prompt_ids(
      synthetic_tok, texts, grid, merge_size=2, image_token="<image>", max_length=5
    )
  with pytest.raises(ValueError, match="3 '<image>' placeholders .* but 2 images"):
    processor.build_prompt_ids(synthetic_tok, texts, grid[:2], merge_size=2, image_token="<image>")
  with pytest.raises(ValueError, match="not a token"):
    processor.build_prompt_ids(
      synthetic_tok, texts, grid, merge_size=2, image_token="<|image_pad|>"
    )
