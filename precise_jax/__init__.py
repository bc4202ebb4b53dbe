"""precise-jax: explain and repair the safety behaviour of (vision-)language models at the level of neurons."""

from ports.errors import CheckpointError, InputError, PreciseJaxError, UnsupportedArchitectureError
from precise_jax.capture import capture

__all__ = ["CheckpointError", "InputError", "PreciseJaxError", "UnsupportedArchitectureError", "capture"]
