"""Pure-functional Flax (linen) ports of Hugging Face backbones; no safety logic lives here."""

from ports.errors import CheckpointError, InputError, PreciseJaxError, UnsupportedArchitectureError
from ports.pretrained import Pretrained, load_pretrained, save_pretrained

__all__ = [
    "CheckpointError",
    "InputError",
    "PreciseJaxError",
    "Pretrained",
    "UnsupportedArchitectureError",
    "load_pretrained",
    "save_pretrained",
]
