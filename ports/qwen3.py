"""Qwen3 decoders: the Llama decoder with per-head RMSNorm on queries and keys."""

from ports.layers import DecoderConfig
from ports.llama import decoder_config

MODEL_TYPES = ("qwen3",)


def config_from_hf(hf) -> DecoderConfig:
    return decoder_config(hf, qk_norm=True, mlp_bias=False)

