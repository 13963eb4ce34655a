"""Tiny transformers Qwen2.5-VL references for parity tests (random weights, no download)."""

from __future__ import annotations

import json
import os

import numpy as np
import torch
from safetensors.torch import save_file
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

PAD, BOS, EOS = 2, 0, 1
IMAGE, VIDEO, VISION_START, VISION_END = 4, 5, 6, 7


def hf_config(
  *,
  merge: int = 2,
  patch: int = 4,
  window: int = 16,
  fullatt: tuple[int, ...] = (1,),
  depth: int = 2,
  tie: bool = True,
  kv_heads: int = 2,
  mrope_section: tuple[int, int, int] = (2, 2, 2),
  text_layers: int = 2,
) -> Qwen2_5_VLConfig:
  """A tiny config; the defaults equal `Qwen25VLConfig.tiny()`."""
  return Qwen2_5_VLConfig(
    text_config=dict(
      hidden_size=48,
      intermediate_size=96,
      num_hidden_layers=text_layers,
      num_attention_heads=4,
      num_key_value_heads=kv_heads,
      vocab_size=128,
      rms_norm_eps=1e-6,
      rope_parameters=dict(
        rope_type="default", mrope_section=list(mrope_section), rope_theta=10000.0
      ),
      bos_token_id=BOS,
      eos_token_id=EOS,
      pad_token_id=PAD,
    ),
    vision_config=dict(
      depth=depth,
      hidden_size=32,
      intermediate_size=48,
      num_heads=4,
      out_hidden_size=48,
      patch_size=patch,
      spatial_merge_size=merge,
      window_size=window,
      fullatt_block_indexes=list(fullatt),
    ),
    image_token_id=IMAGE,
    video_token_id=VIDEO,
    vision_start_token_id=VISION_START,
    vision_end_token_id=VISION_END,
    tie_word_embeddings=tie,
  )


def build(config: Qwen2_5_VLConfig, seed: int = 0) -> Qwen2_5_VLForConditionalGeneration:
  torch.manual_seed(seed)
  model = Qwen2_5_VLForConditionalGeneration(config).eval()
  # HF's init (std 0.02, unit norms, zero biases) makes attention nearly uniform, so a
  # wrong position or mask would hardly show. Unit-variance activations make it show.
  with torch.no_grad():
    for name, p in model.named_parameters():
      if p.ndim >= 2:
        fan_in = p[0].numel()
        p.normal_(0.0, 1.0 if "embed_tokens" in name else fan_in**-0.5)
      elif name.endswith("bias"):
        p.normal_(0.0, 0.1)
      else:  # norm scales
        p.uniform_(0.5, 1.5)
  return model


def save(model, directory: str, *, naming: str = "hub", shards: int = 1) -> str:
  """Saves like `save_pretrained`, with hub keys (`visual.*`, `model.*`) or transformers 5's
  module names (`model.visual.*`, `model.language_model.*`), optionally as a sharded index."""
  os.makedirs(directory, exist_ok=True)
  model.config.save_pretrained(directory)
  state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
  if model.config.tie_word_embeddings:
    state.pop("lm_head.weight", None)
  if naming == "hub":
    renamed = {}
    for key, value in state.items():
      if key.startswith("model.visual."):
        key = key[len("model.") :]
      elif key.startswith("model.language_model."):
        key = "model." + key[len("model.language_model.") :]
      renamed[key] = value
    state = renamed
  keys = sorted(state)
  if shards == 1:
    save_file(state, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
    return directory
  weight_map = {}
  for i, chunk in enumerate(np.array_split(np.array(keys, dtype=object), shards)):
    name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
    save_file(
      {k: state[k] for k in chunk}, os.path.join(directory, name), metadata={"format": "pt"}
    )
    weight_map.update(dict.fromkeys(chunk, name))
  with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {}, "weight_map": weight_map}, f)
  return directory


def batch(
  grids: list[list[int]], rows: list[list[int]], *, patch_dim: int, merge: int, padding: str, seed=0
):
  """Token rows with image placeholders expanded; `rows[r]` lists the images (indices into
  `grids`) of row r in order. Returns numpy input_ids, attention_mask, pixel_values, grid_thw."""
  rng = np.random.default_rng(seed)
  seqs = []
  order = []
  for r, images in enumerate(rows):
    seq = [BOS] + list(rng.integers(8, 128, size=3 + r))
    for i in images:
      seq += [VISION_START] + [IMAGE] * (int(np.prod(grids[i])) // merge**2) + [VISION_END]
      seq += list(rng.integers(8, 128, size=2 + i))
      order.append(i)
    seqs.append(seq)
  length = max(len(s) for s in seqs)
  ids = np.full((len(seqs), length), PAD, np.int64)
  mask = np.zeros((len(seqs), length), np.int64)
  for r, seq in enumerate(seqs):
    if padding == "left":
      ids[r, length - len(seq) :], mask[r, length - len(seq) :] = seq, 1
    else:
      ids[r, : len(seq)], mask[r, : len(seq)] = seq, 1
  grid_thw = np.array([grids[i] for i in order], np.int64)
  pixels = rng.normal(size=(int(sum(np.prod(g) for g in grid_thw)), patch_dim)).astype(np.float32)
  return ids, mask, pixels, grid_thw


def run(model, ids, mask, pixels, grid_thw):
  """Reference logits and last hidden state; mm_token_type_ids makes it use 3D positions."""
  with torch.no_grad():
    out = model.model(
      input_ids=torch.from_numpy(ids),
      attention_mask=torch.from_numpy(mask),
      pixel_values=None if pixels is None else torch.from_numpy(pixels),
      image_grid_thw=None if grid_thw is None else torch.from_numpy(grid_thw),
      mm_token_type_ids=torch.from_numpy((ids == IMAGE).astype(np.int64)),
    )
    hidden = out.last_hidden_state
    logits = model.lm_head(hidden)
  return logits.numpy(), hidden.numpy()
