"""Qwen2 / Qwen2.5 decoders: the Llama decoder with q/k/v biases (no output bias)."""

from typing import TYPE_CHECKING

from ports.layers import DecoderConfig
from ports.llama import decoder_config

if TYPE_CHECKING:
    from transformers import PretrainedConfig

MODEL_TYPES = ("qwen2",)


def config_from_hf(hf: "PretrainedConfig") -> DecoderConfig:
    return decoder_config(hf, qkv_bias=True, out_bias=False, mlp_bias=False)

