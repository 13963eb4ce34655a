"""CLIP's text tower (FLUX's `text_encoder`, CLIP-L) in Flax NNX, loaded from transformers
checkpoints; transformers 5 no longer ships a Flax CLIP (flux.md §13)."""

from spatial_jax.models.clip.config import CLIPTextConfig
from spatial_jax.models.clip.model import CLIPTextModel, CLIPTextOutput
from spatial_jax.models.clip.params import from_pretrained

__all__ = ["CLIPTextConfig", "CLIPTextModel", "CLIPTextOutput", "from_pretrained"]
