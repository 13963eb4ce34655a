"""T5 v1.1 encoder in Flax NNX (transformers `T5EncoderModel`, FLUX's `text_encoder_2`)."""

from spatial_jax.models.t5.config import T5Config
from spatial_jax.models.t5.model import T5EncoderModel
from spatial_jax.models.t5.params import from_pretrained

__all__ = ["T5Config", "T5EncoderModel", "from_pretrained"]
