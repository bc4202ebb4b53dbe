"""Qwen3 decoders: the Llama decoder with per-head RMSNorm on queries and keys."""

from typing import TYPE_CHECKING

from ports.layers import DecoderConfig
from ports.llama import decoder_config

if TYPE_CHECKING:
    from transformers import PretrainedConfig

MODEL_TYPES = ("qwen3",)


def config_from_hf(hf: "PretrainedConfig") -> DecoderConfig:
    return decoder_config(hf, qk_norm=True, mlp_bias=False)

