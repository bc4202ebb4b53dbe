"""Pure-functional Flax (linen) ports of Hugging Face backbones; no safety logic lives here."""

from ports.errors import CheckpointError, InputError, PreciseJaxError, UnsupportedArchitectureError
from ports.generate import GenerationOutput, generate
from ports.pretrained import Pretrained, load_pretrained, save_pretrained

__all__ = [
    "CheckpointError",
    "GenerationOutput",
    "InputError",
    "PreciseJaxError",
    "Pretrained",
    "UnsupportedArchitectureError",
    "generate",
    "load_pretrained",
    "save_pretrained",
]
