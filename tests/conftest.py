"""Fixtures shared across the test suite."""

import pytest


@pytest.fixture(scope="session")
def smollm2_dir():
    """The real SmolLM2-135M-Instruct as a Hugging Face folder (downloaded and converted once, then cached)."""
    from precise_jax.assets import smollm2_135m_instruct

    return smollm2_135m_instruct()
