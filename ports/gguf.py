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

import numpy as np

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
_CONTROL_TOKEN = 3  # llama.cpp's token type for special tokens such as <|im_start|>
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
    if any(key.startswith("llama.rope.scaling.") for key in meta):
        raise UnsupportedArchitectureError(f"{gguf_path} uses RoPE scaling, which this converter does not carry over.")

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        config = _config(meta, gguf_path, tied="output.weight" not in {t.name for t in reader.tensors})
        tensors = _tensors(reader, config, gguf_path)
        from safetensors.numpy import save_file

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
    import gguf

    if not gguf_path.is_file():
        raise CheckpointError(f"GGUF file {gguf_path} does not exist: check the path.")
    advice = "download it again (or delete the cached copy so it is fetched anew)"
    try:
        reader = gguf.GGUFReader(gguf_path)
    except Exception as error:  # the reader raises ValueError, struct/IndexError, ... on a bad header
        raise CheckpointError(f"{gguf_path} is not a readable GGUF file ({error}): {advice}.") from error
    # The tensor data is memory-mapped lazily, so a file cut inside it is only seen by checking sizes.
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

    def need(key):
        if f"llama.{key}" not in meta:
            raise CheckpointError(f"{gguf_path} lacks the metadata key llama.{key}: the file is incomplete.")
        return meta[f"llama.{key}"]

    heads = int(need("attention.head_count"))
    hidden = int(need("embedding_length"))
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
        head_dim=int(meta.get("llama.rope.dimension_count", hidden // heads)),
        rms_norm_eps=float(need("attention.layer_norm_rms_epsilon")),
        rope_theta=float(meta.get("llama.rope.freq_base", 10000.0)),
        max_position_embeddings=int(need("context_length")),
        tie_word_embeddings=tied,
        architectures=["LlamaForCausalLM"],
        dtype="float32",
        **token_ids,
    ).to_dict()
    config["torch_dtype"] = "float32"  # the name transformers 4.x reads
    return config


def _tensors(reader, config: dict, gguf_path: Path) -> dict[str, np.ndarray]:
    """All weights as float32 arrays under Hugging Face names, Q/K rows back in HF's RoPE order."""
    from gguf.quants import dequantize

    tensors = {}
    for tensor in reader.tensors:
        match = re.fullmatch(r"blk\.(\d+)\.(\w+)\.weight", tensor.name) or re.fullmatch(r"(\w+)\.weight", tensor.name)
        if match and match.lastindex == 2 and match[2] in _LAYER_KEYS:
            name = f"model.layers.{match[1]}.{_LAYER_KEYS[match[2]]}.weight"
        elif match and match.lastindex == 1 and match[1] in _TOP_KEYS:
            name = f"{_TOP_KEYS[match[1]]}.weight"
        else:
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
    expected |= {f"model.layers.{i}.{key}.weight" for i in range(config["num_hidden_layers"]) for key in _LAYER_KEYS.values()}
    if not config["tie_word_embeddings"]:
        expected.add("lm_head.weight")
    if missing := sorted(expected - tensors.keys()):
        raise CheckpointError(f"{gguf_path} lacks {len(missing)} tensors, e.g. {missing[:3]}: the file is incomplete.")
    if extra := sorted(tensors.keys() - expected):
        raise CheckpointError(f"{gguf_path} has tensors beyond its block_count, e.g. {extra[:3]}: the file is inconsistent.")
    return tensors


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
    backend.add_special_tokens(
        [AddedToken(token, special=True, normalized=False) for token, t in zip(tokens, types) if t == _CONTROL_TOKEN]
    )

    def token(key):
        index = meta.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[int(index)] if index is not None else None

    bos, eos = token("bos"), token("eos")
    add_bos, add_eos = bool(meta.get("tokenizer.ggml.add_bos_token")), bool(meta.get("tokenizer.ggml.add_eos_token"))
    if (add_bos and bos) or (add_eos and eos):
        template = " ".join([bos] * (add_bos and bos is not None) + ["$A"] + [eos] * (add_eos and eos is not None))
        special = [(t, tokens.index(t)) for t in {bos, eos} if t is not None]
        backend.post_processor = processors.TemplateProcessing(single=template, special_tokens=special)
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
