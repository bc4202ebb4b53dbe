"""The Llama family (Llama 2/3/3.1, Mistral, SmolLM2): config translation and the decoder's weight table.

Qwen2 and Qwen3 use the same decoder and table with other switches (see qwen2.py, qwen3.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ports.layers import DecoderConfig, RopeConfig
from ports.weights import LINEAR, Rule, mirrored

if TYPE_CHECKING:
    from transformers import PretrainedConfig

MODEL_TYPES = ("llama", "mistral")

_HF, _PORT = "model.layers.{i}", "lm/layers_{i}"
DECODER_RULES = [
    Rule("model.embed_tokens.weight", "lm/embed_tokens/embedding"),
    Rule("model.norm.weight", "lm/norm/weight"),
    Rule("lm_head.weight", "lm_head/kernel", LINEAR),
    *mirrored(_HF, _PORT, linears=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                                   "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
              norms=("input_layernorm", "post_attention_layernorm", "self_attn.q_norm", "self_attn.k_norm")),
    Rule(f"{_HF}.self_attn.rotary_emb.inv_freq", None),  # old checkpoints saved the rotary buffer
]


def weight_rules(config: DecoderConfig) -> list[Rule]:
    if config.tie_word_embeddings:
        # Some tied checkpoints still carry a copy of the embedding as lm_head.weight; the port shares it.
        return [r if r.hf != "lm_head.weight" else Rule(r.hf, None) for r in DECODER_RULES]
    return DECODER_RULES


def decoder_config(hf: PretrainedConfig, **switches: bool) -> DecoderConfig:
    """DecoderConfig from a transformers config object; `switches` set what the family fixes (biases, qk norm)."""
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    layer_types = getattr(hf, "layer_types", None)
    window = getattr(hf, "sliding_window", None)
    if layer_types is not None:
        windows = tuple(window if t == "sliding_attention" else None for t in layer_types)
    else:
        windows = (window,) * hf.num_hidden_layers if window is not None else ()
    fields = dict(
        model_type=hf.model_type,
        vocab_size=hf.vocab_size,
        hidden_size=hf.hidden_size,
        intermediate_size=hf.intermediate_size,
        num_layers=hf.num_hidden_layers,
        num_heads=hf.num_attention_heads,
        num_kv_heads=hf.num_key_value_heads or hf.num_attention_heads,
        head_dim=head_dim,
        rope=RopeConfig.from_hf(dict(hf.rope_parameters or {}), head_dim, hf.max_position_embeddings),
        rms_norm_eps=hf.rms_norm_eps,
        hidden_act=hf.hidden_act,
        qkv_bias=bool(getattr(hf, "attention_bias", False)),
        out_bias=bool(getattr(hf, "attention_bias", False)),
        mlp_bias=bool(getattr(hf, "mlp_bias", False)),
        tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
        sliding_windows=windows if any(w is not None for w in windows) else (),
    )
    fields.update(switches)
    return DecoderConfig(**fields)


def config_from_hf(hf: PretrainedConfig) -> DecoderConfig:
    return decoder_config(hf)

