"""The synthetic world's generator components: a pixel codec and tiny frozen text encoders.

FLUX needs a VAE and two text encoders (T5 for the token states, CLIP for the pooled vector).
In the synthetic world none of them is trained:

- `PixelCodec` stands in for the VAE with the VAE's interface (`encode(...).mode()`, `decode`,
  `scale_latents` / `unscale_latents`). It is an exact, parameter-free space-to-depth: a 32x32x3
  image in [-1, 1] with `vae_scale_factor` 2 is a 16x16x12 latent, which `diffusion.pack` turns
  into 8x8 = 64 tokens of 48 features. The synthetic scenes are flat-coloured shapes on
  low-saturation backgrounds (blobs, gradients, stripes, with a fine grain), small enough that
  pixels are a workable "latent" for a tiny transformer, and an exact codec means every image
  the generator draws is judged by the oracle as drawn (no decoder blur, no VAE to train).
- `TextEncoders` are our `T5EncoderModel` and `CLIPTextModel` at tiny sizes, randomly
  initialised from a fixed seed and never trained, over the synthetic world's word-level
  tokenizer. Random frozen encoders suffice here because the generator's job is to *read* them,
  not theirs to understand: a random embedding gives every word its own direction, T5's relative
  position bias and CLIP's position embeddings (plus its causal mask) make the states depend on
  word order, and the layers are shallow enough not to wash either out. The transformer's
  context embedder and joint attention learn which directions mean "red", "circle" or "left of".
  (FLUX's own text ids are all zero, so word order reaches it only through the encoders.)
  A random T5 cannot bind a colour word to the relation that places it, though, so
  `build_prompt_encoder(t5_pretrained=...)` can read a T5 pretrained on the grammar instead
  (job `text_encoder_synthetic`, the stand-in for T5-XXL's language pretraining), through the
  same `t5.params.from_pretrained` a real T5 takes.
- `PromptEncoder` tokenizes prompts and returns `(prompt_embeds (B, T, D), pooled (B, P))` as
  diffusers' `FluxPipeline.encode_prompt` does: T5 states over the padded prompt without an
  attention mask, and CLIP's pooled output at the end-of-text token.

The encoders' weights are written next to an exported generator (`save_text_encoders`), so a
later job loads the exact weights instead of trusting that a seed reproduces them on another
jax / flax version.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from spatial_jax import fileio, hf
from spatial_jax.data import tokenizer as tokenizer_lib
from spatial_jax.models.clip import CLIPTextConfig, CLIPTextModel
from spatial_jax.models.t5 import T5Config, T5EncoderModel
from spatial_jax.models.t5 import params as t5_params

# --- The codec ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PixelCodecConfig:
  """The codec's settings, with the VAE config's field names where they mean the same thing."""

  downsample_factor: int = 2  # Image pixels per latent pixel along each axis.
  in_channels: int = 3
  # z -> (z - shift_factor) * scaling_factor, as the FLUX VAE's latents are normalised.
  scaling_factor: float = 1.0
  shift_factor: float = 0.0

  def __post_init__(self):
    if self.downsample_factor < 1:
      raise ValueError(
        f"PixelCodecConfig.downsample_factor must be >= 1, got {self.downsample_factor}"
      )
    if self.scaling_factor == 0:
      raise ValueError("PixelCodecConfig.scaling_factor must not be 0 (it is divided by).")

  @property
  def latent_channels(self) -> int:
    return self.in_channels * self.downsample_factor**2


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PointPosterior:
  """A posterior with all its mass on `mean` (the codec is deterministic): `mode()`, `mean` and
  `sample(key)` are the same latents, so code written for the VAE's posterior runs unchanged."""

  mean: jax.Array

  def mode(self) -> jax.Array:
    return self.mean

  def sample(self, key: jax.Array | None = None) -> jax.Array:
    del key  # No noise: the same latents as `mode()`.
    return self.mean


class PixelCodec(nnx.Module):
  """The VAE stand-in: an exact space-to-depth of NHWC images in [-1, 1] (no parameters).

  `encode(x).mode()` is (B, H/f, W/f, C*f*f) with feature index `(dy * f + dx) * C + c` for the
  pixel at (f*i + dy, f*j + dx); `decode` is its exact inverse.
  """

  def __init__(self, config: PixelCodecConfig | None = None):
    self.config = config or PixelCodecConfig()

  @property
  def vae_scale_factor(self) -> int:
    """diffusers pipelines' name for the downsampling factor."""
    return self.config.downsample_factor

  @property
  def latent_channels(self) -> int:
    return self.config.latent_channels

  def encode(self, images: jax.Array) -> PointPosterior:
    """(B, H, W, C) in [-1, 1] -> the (point) posterior over (B, H/f, W/f, C*f*f) latents."""
    f, c = self.config.downsample_factor, self.config.in_channels
    b, h, w, channels = images.shape
    if channels != c or h % f or w % f:
      raise ValueError(
        f"PixelCodec.encode: images of shape {images.shape} must be (B, H, W, {c}) with H and "
        f"W divisible by downsample_factor={f}."
      )
    x = images.reshape(b, h // f, f, w // f, f, c).transpose(0, 1, 3, 2, 4, 5)
    return PointPosterior(x.reshape(b, h // f, w // f, f * f * c))

  def decode(self, latents: jax.Array) -> jax.Array:
    """(B, h, w, C*f*f) unscaled latents -> (B, h*f, w*f, C) images (not clipped)."""
    f, c = self.config.downsample_factor, self.config.in_channels
    b, h, w, channels = latents.shape
    if channels != f * f * c:
      raise ValueError(
        f"PixelCodec.decode: latents of shape {latents.shape} must have {f * f * c} channels."
      )
    x = latents.reshape(b, h, w, f, f, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h * f, w * f, c)

  def scale_latents(self, z: jax.Array) -> jax.Array:
    return (z - self.config.shift_factor) * self.config.scaling_factor

  def unscale_latents(self, z: jax.Array) -> jax.Array:
    return z / self.config.scaling_factor + self.config.shift_factor


# --- Text encoders --------------------------------------------------------------------------------


def _vocab_size() -> int:
  return len(tokenizer_lib.vocabulary())


def _token_id(token: str) -> int:
  return tokenizer_lib.vocabulary().index(token)


def t5_config(**overrides: Any) -> T5Config:
  """A tiny T5 v1.1 (gated GELU) over the synthetic vocabulary."""
  fields = dict(
    vocab_size=_vocab_size(),
    d_model=64,
    d_kv=16,
    d_ff=128,
    num_layers=2,
    num_heads=4,
    feed_forward_proj="gated-gelu",
  )
  return T5Config(**{**fields, **overrides})


def clip_config(max_length: int, **overrides: Any) -> CLIPTextConfig:
  """A tiny CLIP text tower over the synthetic vocabulary, pooled at its `<eos>` token."""
  fields = dict(
    vocab_size=_vocab_size(),
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=max_length,
    # Not 2: that legacy value selects argmax pooling, which assumes CLIP's largest-id EOS.
    eos_token_id=_token_id(tokenizer_lib.EOS),
  )
  return CLIPTextConfig(**{**fields, **overrides})


class TextEncoders(nnx.Module):
  """T5 (token states) + CLIP (pooled vector), as FLUX's `text_encoder_2` and `text_encoder`."""

  def __init__(self, t5: T5Config, clip: CLIPTextConfig, *, seed: int):
    # One key per encoder, so changing one encoder's size does not redraw the other.
    key = jax.random.key(seed)
    self.t5 = T5EncoderModel(t5, rngs=nnx.Rngs(params=jax.random.fold_in(key, 0)))
    self.clip = CLIPTextModel(clip, rngs=nnx.Rngs(params=jax.random.fold_in(key, 1)))

  def __call__(self, t5_ids: jax.Array, clip_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(B, T) ids each -> (T5 states (B, T, d_model), CLIP pooled (B, hidden_size))."""
    return self.t5(t5_ids), self.clip(clip_ids).pooler_output


def tokenize(
  prompts: Sequence[str], max_length: int, *, bos: bool, tokenizer: Any = None
) -> np.ndarray:
  """(B, max_length) int32 ids: [`<bos>`] words `<eos>` then `<pad>`, truncated to fit.

  T5 sees `words <eos>` (its tokenizer appends `</s>`), CLIP `<bos> words <eos>` (its
  tokenizer's start/end of text); both padded to a fixed length, as FLUX pads to 512 / 77.
  """
  tok = tokenizer or tokenizer_lib.build_tokenizer()
  specials = 2 if bos else 1
  if max_length <= specials:
    raise ValueError(f"max_length={max_length} leaves no room for words.")
  pad, bos_id, eos_id = (
    _token_id(t) for t in (tokenizer_lib.PAD, tokenizer_lib.BOS, tokenizer_lib.EOS)
  )
  ids = np.full((len(prompts), max_length), pad, np.int32)
  for row, encoding in enumerate(tok.encode_batch([str(p) for p in prompts])):
    words = encoding.ids
    if len(words) > max_length - specials:
      logging.warning(
        "Prompt of %d tokens truncated to %d: %r", len(words), max_length - specials, prompts[row]
      )
      words = words[: max_length - specials]
    sequence = ([bos_id] if bos else []) + list(words) + [eos_id]
    ids[row, : len(sequence)] = sequence
  return ids


class SyntheticTokenizer:
  """`tokenize` behind a Hugging Face tokenizer's call convention, so `FluxPipeline` takes it as
  `tokenizer` (CLIP: `bos=True`) or `tokenizer_2` (T5: `bos=False`)."""

  def __init__(self, model_max_length: int, *, bos: bool):
    self.model_max_length = model_max_length
    self.bos = bos
    self._tokenizer = tokenizer_lib.build_tokenizer()

  def __call__(
    self,
    prompts: str | Sequence[str],
    padding: str = "max_length",
    max_length: int | None = None,
    truncation: bool = True,
    return_tensors: str | None = "np",
  ) -> dict[str, np.ndarray]:
    if padding != "max_length" or not truncation or return_tensors not in ("np", None):
      raise NotImplementedError(
        "SyntheticTokenizer pads to max_length and truncates, returning numpy arrays only."
      )
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    ids = tokenize(
      prompts, max_length or self.model_max_length, bos=self.bos, tokenizer=self._tokenizer
    )
    return {
      "input_ids": ids,
      "attention_mask": (ids != _token_id(tokenizer_lib.PAD)).astype(np.int32),
    }


@functools.partial(jax.jit, static_argnums=(0,))
def _encode_pooled(graphdef: nnx.GraphDef, state: nnx.State, clip_ids: jax.Array):
  return nnx.merge(graphdef, state).clip(clip_ids).pooler_output


@functools.partial(jax.jit, static_argnums=(0,))
def _encode(graphdef: nnx.GraphDef, state: nnx.State, t5_ids: jax.Array, clip_ids: jax.Array):
  # Module level, keyed by the graphdef: encoders of the same structure share one compile.
  return nnx.merge(graphdef, state)(t5_ids, clip_ids)


class PromptEncoder:
  """Prompts -> `(prompt_embeds (B, T, D), pooled (B, P))`: FluxPipeline.encode_prompt for the
  synthetic world (T5 states without an attention mask; CLIP pooled at `<eos>`).

  The encoders run under one `jax.jit`; their outputs are plain arrays on the default device (or
  wherever the caller's jit places them when `encode_ids` is called inside one).
  """

  def __init__(
    self,
    encoders: TextEncoders,
    max_length: int,
    *,
    seed: int | None = None,
    t5_pretrained: str | None = None,
  ):
    if encoders.clip.config.max_position_embeddings < max_length:
      raise ValueError(
        f"max_length={max_length} exceeds CLIP's max_position_embeddings "
        f"{encoders.clip.config.max_position_embeddings}."
      )
    self.encoders = encoders
    self.max_length = max_length
    self.seed = seed
    self.t5_pretrained = t5_pretrained or None  # Where the T5 weights came from (provenance).
    self.tokenizer = SyntheticTokenizer(max_length, bos=True)  # CLIP's.
    self.tokenizer_2 = SyntheticTokenizer(max_length, bos=False)  # T5's.
    self._graphdef, self._state = nnx.split(encoders)

  @property
  def joint_attention_dim(self) -> int:
    """The width of `prompt_embeds`: FluxConfig.joint_attention_dim must equal it."""
    return self.encoders.t5.config.d_model

  @property
  def pooled_projection_dim(self) -> int:
    """The width of `pooled`: FluxConfig.pooled_projection_dim must equal it."""
    return self.encoders.clip.config.hidden_size

  def set_t5_params(self, state: nnx.State) -> None:
    """Gives T5 new weights (flux_sft's `text.t5_trainable`) for the encodings that follow."""
    nnx.update(self.encoders.t5, state)
    self._graphdef, self._state = nnx.split(self.encoders)

  def tokenize(self, prompts: Sequence[str]) -> dict[str, np.ndarray]:
    return dict(
      t5_ids=self.tokenizer_2(prompts)["input_ids"], clip_ids=self.tokenizer(prompts)["input_ids"]
    )

  def encode_ids(self, t5_ids: Any, clip_ids: Any) -> tuple[jax.Array, jax.Array]:
    return _encode(self._graphdef, self._state, jnp.asarray(t5_ids), jnp.asarray(clip_ids))

  def encode_pooled(self, clip_ids: Any) -> jax.Array:
    """CLIP's pooled vector alone (a caller that runs T5 itself)."""
    return _encode_pooled(self._graphdef, self._state, jnp.asarray(clip_ids))

  def __call__(self, prompts: Sequence[str]) -> tuple[jax.Array, jax.Array]:
    ids = self.tokenize(prompts)
    return self.encode_ids(ids["t5_ids"], ids["clip_ids"])

  encode_prompt = __call__

  def pipeline_components(self) -> dict[str, Any]:
    """The text components of a `FluxPipeline(...)`: encoders, tokenizers, T5 length."""
    return dict(
      text_encoder=self.encoders.clip,
      tokenizer=self.tokenizer,
      text_encoder_2=self.encoders.t5,
      tokenizer_2=self.tokenizer_2,
      max_sequence_length=self.max_length,
    )

  def to_json(self) -> dict[str, Any]:
    """The encoders' architecture and prompt length (`load_text_encoders` rebuilds from it)."""
    t5, clip = self.encoders.t5.config, self.encoders.clip.config
    return dict(
      max_length=self.max_length,
      seed=self.seed,
      t5_pretrained=self.t5_pretrained,
      t5={k: v for k, v in dataclasses.asdict(t5).items() if k not in ("dtype", "param_dtype")},
      clip={k: v for k, v in dataclasses.asdict(clip).items() if k not in ("dtype", "param_dtype")},
    )


def build_prompt_encoder(
  *,
  seed: int = 0,
  max_length: int = 80,
  t5: dict[str, Any] | None = None,
  clip: dict[str, Any] | None = None,
  t5_pretrained: str | os.PathLike = "",
) -> PromptEncoder:
  """The frozen synthetic encoders from a seed: the same seed and sizes give the same weights.

  80 tokens hold the longest prompt of the grammar (76 words) plus `<bos>` and `<eos>`.

  With `t5_pretrained` (a folder `text_encoder_synthetic` wrote: a transformers T5 encoder and
  the synthetic tokenizer), T5 is read from it with `t5.params.from_pretrained`, as a real
  T5 is, and its sizes replace `t5`; CLIP stays the random one of `seed`.
  """
  pretrained = load_pretrained_t5(t5_pretrained, max_length) if t5_pretrained else None
  t5_cfg = pretrained.config if pretrained else t5_config(**(t5 or {}))
  clip_cfg = clip_config(max_length, **(clip or {}))
  # Unsharded (no mesh needed: they are tiny, and jit replicates them where used).
  with nnx.use_eager_sharding(False):
    abstract = nnx.eval_shape(lambda: TextEncoders(t5_cfg, clip_cfg, seed=seed))
    encoders = nnx.merge(nnx.graphdef(abstract), _init_state(t5_cfg, clip_cfg, seed))
  if pretrained is not None:
    encoders.t5 = pretrained  # CLIP's weights come from its own key: the same as without.
  return PromptEncoder(encoders, max_length, seed=seed, t5_pretrained=os.fspath(t5_pretrained))


def load_pretrained_t5(directory: str | os.PathLike, max_length: int) -> T5EncoderModel:
  """A T5 encoder folder for the synthetic tokenizer (`text_encoder_synthetic`'s `final/`).

  Raises:
    FileNotFoundError: the folder lacks config.json / weights / tokenizer files.
    ValueError: its vocabulary or its trained prompt length (tokenizer_config.json's
      `model_max_length`) differ from the synthetic tokenizer's and `max_length`.
  """
  directory = os.fspath(directory)
  tokenizer_path = os.path.join(directory, "tokenizer.json")
  config_path = os.path.join(directory, "tokenizer_config.json")
  for path in (tokenizer_path, config_path):
    if not os.path.exists(path):
      raise FileNotFoundError(
        f"T5 folder {directory!r} has no {os.path.basename(path)}: config.text.t5_pretrained "
        "must be a folder text_encoder_synthetic wrote (its final/), with the tokenizer."
      )
  with open(tokenizer_path) as f:
    vocab = json.load(f).get("model", {}).get("vocab")
  expected = {token: index for index, token in enumerate(tokenizer_lib.vocabulary())}
  if vocab != expected:
    raise ValueError(
      f"{tokenizer_path}: its vocabulary ({len(vocab or {})} tokens) is not the synthetic "
      f"tokenizer's ({len(expected)} tokens, same ids): the T5 was trained on other token ids."
    )
  with open(config_path) as f:
    trained_length = json.load(f).get("model_max_length")
  if trained_length != max_length:
    raise ValueError(
      f"{config_path}: the T5 was trained on prompts padded to model_max_length="
      f"{trained_length}, but config.text.max_length={max_length}; without an attention mask "
      "its states depend on the padding, so the two must be equal."
    )
  model = t5_params.from_pretrained(directory)
  if model.config.vocab_size != len(expected):
    raise ValueError(
      f"{directory}/config.json: vocab_size={model.config.vocab_size}, but the synthetic "
      f"tokenizer has {len(expected)} tokens."
    )
  logging.info("Read the pretrained T5 encoder %s (%s)", directory, model.config)
  return model


@functools.partial(jax.jit, static_argnums=(0, 1))
def _init_state(t5: T5Config, clip: CLIPTextConfig, seed: int) -> nnx.State:
  """The encoders' weights in one compiled call rather than op by op (seconds faster); keyed by
  the (hashable) configs, so building encoders of the same sizes again (any seed) reuses it."""
  return nnx.state(TextEncoders(t5, clip, seed=seed))


# Files of a saved encoder pair.
ENCODERS_CONFIG = "text_encoders.json"
ENCODERS_WEIGHTS = "text_encoders.safetensors"


def _flat_params(module: nnx.Module) -> dict[str, nnx.Variable]:
  state = nnx.state(module, nnx.Param)
  return {".".join(str(p) for p in path): v for path, v in nnx.to_flat_state(state)}


def save_text_encoders(encoder: PromptEncoder, directory: str | os.PathLike) -> None:
  """Writes the encoders' weights (our parameter paths) and config into `directory`."""
  os.makedirs(directory, exist_ok=True)
  tensors = {
    k: np.asarray(jax.device_get(v[...])) for k, v in _flat_params(encoder.encoders).items()
  }
  hf.save_safetensors(tensors, os.path.join(directory, ENCODERS_WEIGHTS), {"format": "flax"})
  text = json.dumps(encoder.to_json(), indent=2, sort_keys=True) + "\n"
  fileio.write_atomic(os.path.join(directory, ENCODERS_CONFIG), text.encode())


def load_text_encoders(directory: str | os.PathLike) -> PromptEncoder:
  """Reads what `save_text_encoders` wrote; the weights come from the file, not the seed."""
  config_path = os.path.join(directory, ENCODERS_CONFIG)
  if not os.path.exists(config_path):
    raise FileNotFoundError(f"No {ENCODERS_CONFIG} in {directory!r} (see save_text_encoders).")
  with open(config_path) as f:
    saved = json.load(f)
  t5 = T5Config(**saved["t5"])
  clip = CLIPTextConfig(**saved["clip"])
  with nnx.use_eager_sharding(False):
    encoders = nnx.eval_shape(lambda: TextEncoders(t5, clip, seed=0))
  tensors = hf.SafetensorsFolder(os.path.join(directory, ENCODERS_WEIGHTS))
  params = _flat_params(encoders)
  if missing := sorted(set(params) - set(tensors.keys())):
    raise ValueError(f"{directory}/{ENCODERS_WEIGHTS} lacks {missing[:10]}")
  if extra := sorted(set(tensors.keys()) - set(params)):
    raise ValueError(f"{directory}/{ENCODERS_WEIGHTS} has unexpected {extra[:10]}")
  for name, variable in params.items():
    value = tensors.read(name)
    if value.shape != variable.shape:
      raise ValueError(
        f"{directory}/{ENCODERS_WEIGHTS}: {name} is {value.shape}, not {variable.shape}"
      )
    variable.set_value(jnp.asarray(value, variable.dtype))
  return PromptEncoder(
    encoders,
    saved["max_length"],
    seed=saved.get("seed"),
    t5_pretrained=saved.get("t5_pretrained"),
  )
