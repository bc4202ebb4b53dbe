"""Convert a llama-architecture GGUF file (llama.cpp's format) into a Hugging Face model folder.

    convert_gguf("SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2/")

writes config.json, generation_config.json, model.safetensors (float32, de-quantized with the `gguf`
package in numpy) and the tokenizer files with the chat template, so that `AutoModelForCausalLM` and
`AutoTokenizer` load the folder as they would one from the hub. No torch is needed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from gguf.quants import dequantize
from safetensors.numpy import save_file

from ports.errors import CheckpointError, InputError, UnsupportedArchitectureError

_LAYER_KEYS = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_TOP_KEYS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp's token types: special tokens (<|im_start|>) and added words
# llama.cpp's byte-level BPE pre-tokenizers that differ from GPT-2's regex only by splitting digits apart.
_BPE_PRE_TOKENIZERS = {"default": False, "gpt2": False, "smollm": True}


def convert_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Write the Hugging Face folder `out_dir` (which must not exist yet) for the llama GGUF `gguf_path`.

    Atomic: everything is built in a temporary folder beside `out_dir` and renamed at the end.
    """
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if out_dir.exists():
        raise InputError(f"{out_dir} already exists: remove it or choose another output folder.")
    reader = _open(gguf_path)
    meta = {name: field.contents() for name, field in reader.fields.items()}
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise UnsupportedArchitectureError(
            f"{gguf_path} is a GGUF of architecture {arch!r}; only 'llama' GGUF files can be converted."
        )
    if meta.get("llama.rope.scaling.type", "none") != "none":
        raise UnsupportedArchitectureError(f"{gguf_path} uses RoPE scaling, which this converter does not carry over.")

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        config = _config(meta, gguf_path, tied="output.weight" not in {t.name for t in reader.tensors})
        tensors = _tensors(reader, config, gguf_path)
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        generation = {key: config[key] for key in ("bos_token_id", "eos_token_id", "pad_token_id") if key in config}
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        _tokenizer(meta, gguf_path).save_pretrained(tmp)
        os.replace(tmp, out_dir)
    except BaseException as error:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(error, OSError) and out_dir.exists():  # another process finished first
            raise InputError(f"{out_dir} appeared while converting {gguf_path}: remove it and retry.") from error
        raise
    return out_dir


def _open(gguf_path: Path):
    """The file's `GGUFReader`, or a CheckpointError saying what is wrong with the file."""
    if not gguf_path.is_file():
        raise CheckpointError(f"GGUF file {gguf_path} does not exist: check the path.")
    advice = "download it again (or delete the cached copy so it is fetched anew)"
    try:
        reader = gguf.GGUFReader(gguf_path)
    except Exception as error:  # the reader raises ValueError, struct/IndexError, ... on a bad header
        raise CheckpointError(
            f"{gguf_path} is not a readable GGUF file; it may be truncated or corrupt ({error}): {advice}."
        ) from error
    # gguf's reader notices a cut inside the tensor data only because the short slice fails to reshape: check sizes.
    size = gguf_path.stat().st_size
    for tensor in reader.tensors:
        if tensor.data_offset + tensor.n_bytes > size or tensor.data.nbytes != tensor.n_bytes:
            raise CheckpointError(
                f"{gguf_path} is truncated ({size} bytes; tensor {tensor.name} ends at byte "
                f"{tensor.data_offset + tensor.n_bytes}): {advice}."
            )
    return reader


def _config(meta: dict, gguf_path: Path, tied: bool) -> dict:
    """config.json contents (a LlamaConfig) from the GGUF metadata."""
    from transformers import LlamaConfig

    def need(key: str) -> Any:
        if f"llama.{key}" not in meta:
            raise CheckpointError(f"{gguf_path} lacks the metadata key llama.{key}: the file is incomplete.")
        return meta[f"llama.{key}"]

    heads = int(need("attention.head_count"))
    hidden = int(need("embedding_length"))
    head_dim = meta.get("llama.attention.key_length", meta.get("llama.rope.dimension_count", hidden // heads))
    vocab = meta.get("llama.vocab_size", len(meta.get("tokenizer.ggml.tokens", ())))
    token_ids = {
        f"{name}_token_id": int(meta[f"tokenizer.ggml.{key}_token_id"])
        for name, key in (("bos", "bos"), ("eos", "eos"), ("pad", "padding"), ("unk", "unknown"))
        if f"tokenizer.ggml.{key}_token_id" in meta
    }
    config = LlamaConfig(
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(need("feed_forward_length")),
        num_hidden_layers=int(need("block_count")),
        num_attention_heads=heads,
        num_key_value_heads=int(meta.get("llama.attention.head_count_kv", heads)),
        head_dim=int(head_dim),
        rms_norm_eps=float(need("attention.layer_norm_rms_epsilon")),
        rope_theta=float(meta.get("llama.rope.freq_base", 10000.0)),
        max_position_embeddings=int(need("context_length")),
        tie_word_embeddings=tied,
        architectures=["LlamaForCausalLM"],
        dtype="float32",
        **token_ids,
    ).to_diff_dict()
    # The names transformers 4.x reads, for readers of config.json other than transformers 5.
    config.update(torch_dtype="float32", rope_theta=config["rope_parameters"]["rope_theta"])
    return config


def _tensors(reader, config: dict, gguf_path: Path) -> dict[str, np.ndarray]:
    """All weights as float32 arrays under Hugging Face names, Q/K rows back in HF's RoPE order."""
    tensors = {}
    for tensor in reader.tensors:
        name = _hf_name(tensor.name)
        if name is None:
            raise UnsupportedArchitectureError(
                f"{gguf_path} holds tensor {tensor.name!r}, which a Hugging Face LlamaForCausalLM has no place for."
            )
        shape = tuple(int(n) for n in reversed(tensor.shape))  # GGUF lists dimensions fastest-first
        weight = np.asarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32).reshape(shape)
        if name.endswith("q_proj.weight"):
            weight = _unpermute(weight, config["num_attention_heads"])
        elif name.endswith("k_proj.weight"):
            weight = _unpermute(weight, config["num_key_value_heads"])
        tensors[name] = np.ascontiguousarray(weight)

    expected = {"model.embed_tokens.weight", "model.norm.weight"}
    for i in range(config["num_hidden_layers"]):
        expected |= {f"model.layers.{i}.{key}.weight" for key in _LAYER_KEYS.values()}
    if not config["tie_word_embeddings"]:
        expected.add("lm_head.weight")
    if missing := sorted(expected - tensors.keys()):
        raise CheckpointError(f"{gguf_path} lacks {len(missing)} tensors, e.g. {missing[:3]}: the file is incomplete.")
    if extra := sorted(tensors.keys() - expected):
        raise CheckpointError(f"{gguf_path} has tensors beyond its block_count, e.g. {extra[:3]}: it is inconsistent.")
    return tensors


def _hf_name(gguf_name: str) -> str | None:
    """The Hugging Face key of a llama GGUF tensor name, or None for a tensor that has none."""
    if (match := re.fullmatch(r"blk\.(\d+)\.(\w+)\.weight", gguf_name)) and match[2] in _LAYER_KEYS:
        return f"model.layers.{match[1]}.{_LAYER_KEYS[match[2]]}.weight"
    if (match := re.fullmatch(r"(\w+)\.weight", gguf_name)) and match[1] in _TOP_KEYS:
        return f"{_TOP_KEYS[match[1]]}.weight"
    return None


def _unpermute(weight: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row order: per head it stores the rotary pairs interleaved (0, d/2, 1, d/2+1, ...)
    where Hugging Face keeps the two halves apart (rotate_half)."""
    rows = weight.shape[0]
    return weight.reshape(heads, rows // heads // 2, 2, -1).swapaxes(1, 2).reshape(weight.shape)


def _tokenizer(meta: dict, gguf_path: Path):
    """A transformers fast tokenizer rebuilt from the byte-level BPE vocabulary in the GGUF metadata.

    Built with `tokenizers` directly because transformers' own GGUF tokenizer loading imports torch.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    kind, pre = meta.get("tokenizer.ggml.model"), meta.get("tokenizer.ggml.pre", "default")
    if kind != "gpt2" or pre not in _BPE_PRE_TOKENIZERS:
        raise UnsupportedArchitectureError(
            f"{gguf_path} has tokenizer model {kind!r} with pre-tokenizer {pre!r}; only byte-level BPE "
            f"('gpt2') with pre-tokenizer {sorted(_BPE_PRE_TOKENIZERS)} is supported."
        )
    tokens, types = list(meta["tokenizer.ggml.tokens"]), list(meta.get("tokenizer.ggml.token_type", ()))
    merges = [tuple(merge.split(" ", 1)) for merge in meta.get("tokenizer.ggml.merges", ())]
    backend = Tokenizer(models.BPE(vocab={token: i for i, token in enumerate(tokens)}, merges=merges))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if _BPE_PRE_TOKENIZERS[pre]:
        byte_level = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    backend.pre_tokenizer = byte_level
    backend.decoder = decoders.ByteLevel()
    # llama.cpp matches both kinds whole in the text, so they must never be cut into byte pieces.
    control = [word for word, t in zip(tokens, types) if t == _CONTROL]
    user_defined = [word for word, t in zip(tokens, types) if t == _USER_DEFINED]
    backend.add_special_tokens([AddedToken(word, special=True, normalized=False) for word in control])
    backend.add_tokens([AddedToken(word, special=False, normalized=False) for word in user_defined])

    def token(key: str) -> str | None:
        index = meta.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[int(index)] if index is not None else None

    bos, eos = token("bos"), token("eos")
    added = [bos] if meta.get("tokenizer.ggml.add_bos_token") and bos else []
    appended = [eos] if meta.get("tokenizer.ggml.add_eos_token") and eos else []
    if added or appended:
        backend.post_processor = processors.TemplateProcessing(
            single=" ".join(added + ["$A"] + appended),
            special_tokens=[(t, tokens.index(t)) for t in dict.fromkeys(added + appended)],
        )
    kwargs = {"chat_template": meta["tokenizer.chat_template"]} if "tokenizer.chat_template" in meta else {}
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=bos,
        eos_token=eos,
        unk_token=token("unknown"),
        pad_token=token("padding"),
        model_max_length=int(meta.get("llama.context_length", 2048)),
        clean_up_tokenization_spaces=False,
        **kwargs,
    )
