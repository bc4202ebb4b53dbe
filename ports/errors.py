"""The one exception family of precise-jax; every message says what was wrong, where, and what to do."""


class PreciseJaxError(Exception):
    """Base class of every error precise-jax raises on purpose."""


class CheckpointError(PreciseJaxError):
    """A model folder or weight file is missing, corrupt, incomplete or of the wrong shape."""


class UnsupportedArchitectureError(PreciseJaxError):
    """The checkpoint's architecture (model_type) has no port, or needs remote code."""


class InputError(PreciseJaxError):
    """A batch, prompt set, image or argument given by the user is unusable."""
