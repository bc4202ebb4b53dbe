"""Batched KV-cache decoding (greedy or temperature / top-p sampling), with a hook at every activation site.

`generate` runs one jitted function per (model, shapes, max_new_tokens, static options): the prefill over the whole
left-padded prompt, then a `lax.while_loop` that feeds one token per step through the cache and stops when every row
has produced a stop token. Interventions enter through `hook`, applied to every `Site` output by `intercept_sites`.
"""

from __future__ import annotations

import contextlib
import functools
import json
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Mapping

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax.linen.module import InterceptorContext
from numpy.typing import ArrayLike

from ports.errors import InputError
from ports.layers import Site, default_positions
from ports.processing import Processor

if TYPE_CHECKING:
    from ports.pretrained import Pretrained

Array = jax.Array

# Batch keys that describe the prompt rather than feed the model.
NOT_MODEL_INPUTS = ("token_types",)


@flax.struct.dataclass
class HookInfo:
    """What a hook knows about the current model call besides the activation itself."""

    positions: Array  # [B, T] int32: position of each token of this call (real tokens counted, pads 0)
    step: Array  # [] int32: tokens generated before this call (0 at prefill)
    token_types: Array | None = None  # [B, T]: the batch's token types at prefill; None at decode (responses)
    prefill: bool = flax.struct.field(pytree_node=False, default=True)

    @classmethod
    def for_forward(cls, attention_mask: Array, token_types: Array | None = None) -> "HookInfo":
        """The info of a plain (uncached) forward over a whole batch, as at prefill."""
        mask = jnp.asarray(attention_mask)
        return cls(positions=default_positions(mask, None), step=jnp.zeros((), jnp.int32),
                   token_types=None if token_types is None else jnp.asarray(token_types), prefill=True)


# hook(hook_params, site_path, x, info) -> x, e.g. site_path ('lm', 'layers_1', 'mlp', 'act').
Hook = Callable[[Any, tuple[str, ...], Array, HookInfo], Array]


@contextlib.contextmanager
def intercept_sites(hook: Hook | None, hook_params: Any, info: HookInfo) -> Iterator[None]:
    """Within the context, every `Site` output x of a linen model call becomes hook(hook_params, path, x, info)."""
    if hook is None:
        yield
        return

    def interceptor(next_fun: Callable[..., Any], args: tuple, kwargs: dict[str, Any],
                    context: InterceptorContext) -> Any:
        out = next_fun(*args, **kwargs)
        if isinstance(context.module, Site) and context.method_name == "__call__":
            return hook(hook_params, context.module.path, out, info)
        return out

    with nn.intercept_methods(interceptor):
        yield


@flax.struct.dataclass
class GenerationOutput:
    """Generated tokens; after a row's stop token its slots hold the pad id (the first stop token if no pad id)."""

    tokens: Array  # [B, N] int32
    lengths: Array  # [B] int32: generated tokens up to and including the stop token (N if none)
    logits: Array | None = None  # [B, N, V] float32 that chose each token, when asked; 0 for steps never run

    def text(self, processor: Processor) -> list[str]:
        """Decode each row's generated tokens (up to its length) with `skip_special_tokens=True`."""
        return decode(processor, self.tokens, self.lengths)


def decode(processor: Processor, tokens: ArrayLike, lengths: ArrayLike | None = None) -> list[str]:
    """Token rows (each cut at its length) -> strings, skipping special tokens; works with tokenizers and processors."""
    tokens = np.asarray(tokens)
    lengths = np.full(len(tokens), tokens.shape[1]) if lengths is None else np.asarray(lengths)
    rows = [row[:n].tolist() for row, n in zip(tokens, lengths)]
    return processor.batch_decode(rows, skip_special_tokens=True)


# ----------------------------------------------------------------------------------------------------- driver


def generate(
    lm: Pretrained,
    batch: Mapping[str, Any],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    stop_tokens: int | Iterable[int] | None = None,
    pad_token: int | None = None,
    rng: Array | None = None,
    hook: Hook | None = None,
    hook_params: Any = None,
    return_logits: bool = False,
) -> GenerationOutput:
    """Decode up to `max_new_tokens` per row of a left-padded batch: greedy at temperature 0, else temperature and
    top-p sampling (no top-k, unlike HF's default of 50). Stop / pad ids default to the checkpoint's generation config.
    Pass the same `hook` object to reuse the compilation; `hook_params` (a pytree of arrays) may change freely."""
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise InputError(f"generate: max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    greedy = temperature == 0
    if not greedy:
        if temperature < 0:
            raise InputError(f"generate: temperature must be >= 0 (0 means greedy), got {temperature}")
        if rng is None or not isinstance(rng, (jax.Array, np.ndarray)):
            raise InputError(
                f"generate: sampling (temperature > 0) needs an explicit PRNG key, got rng={rng!r}; pass "
                "rng=jax.random.key(seed), or temperature=0 for greedy decoding"
            )
    if not 0 < top_p <= 1:
        raise InputError(f"generate: top_p must be in (0, 1], got {top_p}")
    inputs, token_types = _model_inputs(batch)
    lm.model.check_batch(inputs)  # inside jit a VLM cannot compare its image tokens with its images
    stops, pad = _special_tokens(lm, stop_tokens, pad_token)
    return _generate(
        lm.model, hook, int(max_new_tokens), greedy, not greedy and top_p < 1, bool(return_logits),
        lm.params, inputs, token_types, hook_params, stops, pad,
        jnp.float32(temperature if not greedy else 1.0), jnp.float32(top_p),
        jax.random.key(0) if greedy else rng,  # greedy draws nothing; a fixed key keeps one compilation
    )


def _model_inputs(batch: Mapping[str, Any]) -> tuple[dict[str, Array], Array | None]:
    """Validate a batch and split it into model inputs and token types (which only hooks see)."""
    if "input_ids" not in batch:
        raise InputError(f"generate: the batch has no 'input_ids' (keys: {sorted(batch)}); tokenize the prompts first")
    ids = np.asarray(batch["input_ids"])
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
        raise InputError(f"generate: input_ids must be an integer array [batch, tokens], got {ids.dtype} {ids.shape}")
    mask = np.asarray(batch["attention_mask"]) if batch.get("attention_mask") is not None else np.ones_like(ids)
    if mask.shape != ids.shape:
        raise InputError(f"generate: attention_mask {mask.shape} and input_ids {ids.shape} differ in shape")
    mask = mask.astype(bool)
    # Decoding appends after the last column, so every row must end with a real token: pads on the left only.
    not_left = np.nonzero(np.any(mask[:, :-1] & ~mask[:, 1:], axis=1) | ~mask[:, -1])[0]
    if len(not_left):
        raise InputError(
            f"generate: rows {not_left[:8].tolist()} of the batch are not left-padded (or are empty); tokenize "
            "with padding_side='left' (e.g. tokenizer.padding_side = 'left') so each prompt ends in the last column"
        )
    inputs = {k: jnp.asarray(v) for k, v in batch.items() if k not in NOT_MODEL_INPUTS and v is not None}
    inputs["input_ids"] = jnp.asarray(ids, jnp.int32)
    inputs["attention_mask"] = jnp.asarray(mask, jnp.int32)
    token_types = batch.get("token_types")
    return inputs, None if token_types is None else jnp.asarray(token_types)


def _special_tokens(lm, stop_tokens, pad_token) -> tuple[Array, Array]:
    """Stop ids [n] and the pad id: explicit arguments, else generation_config.json, else config.json."""
    generation = {}
    if getattr(lm, "source", None) is not None and (lm.source / "generation_config.json").exists():
        generation = json.loads((lm.source / "generation_config.json").read_text())

    def lookup(key: str) -> Any:
        value = generation.get(key)
        return lm.hf_config.get(key) if value is None else value

    if stop_tokens is None:
        stop_tokens = lookup("eos_token_id")
    stops = [] if stop_tokens is None else [stop_tokens] if np.ndim(stop_tokens) == 0 else list(stop_tokens)
    stops = [int(s) for s in stops]
    if pad_token is None:
        pad_token = lookup("pad_token_id")
    if pad_token is None:
        # As Hugging Face does: without a pad id, finished rows repeat the first stop token.
        pad_token = stops[0] if stops else 0
    # -1 never matches a token; padding to a multiple of 8 keeps one compilation across stop sets.
    width = max(8, -(-len(stops) // 8) * 8)
    stops = stops + [-1] * (width - len(stops))
    return jnp.asarray(stops, jnp.int32), jnp.asarray(pad_token, jnp.int32)


# ----------------------------------------------------------------------------------------------------- jitted


def _choose(logits: Array, greedy: bool, nucleus: bool, temperature: Array, top_p: Array, key: Array) -> Array:
    """[B, V] float32 logits -> [B] int32 tokens: argmax, or a draw from softmax(logits / T) cut to top-p."""
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    scaled = logits / temperature
    if nucleus:
        # Hugging Face's rule: keep a token iff the tokens ranked above it hold less than top_p of the mass.
        ranked = -jnp.sort(-scaled, axis=-1)
        probs = jax.nn.softmax(ranked, axis=-1)
        keep = jnp.cumsum(probs, axis=-1) - probs < top_p
        cutoff = jnp.min(jnp.where(keep, ranked, jnp.inf), axis=-1, keepdims=True)
        scaled = jnp.where(scaled >= cutoff, scaled, -jnp.inf)
    return jax.random.categorical(key, scaled, axis=-1).astype(jnp.int32)


@functools.partial(
    jax.jit, static_argnames=("model", "hook", "max_new_tokens", "greedy", "nucleus", "return_logits")
)
def _generate(model, hook, max_new_tokens, greedy, nucleus, return_logits,
              params, inputs, token_types, hook_params, stops, pad, temperature, top_p, rng):
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    b, t = ids.shape
    # The last generated token is never fed back, so T + N - 1 slots hold everything the loop writes.
    cache = model.init_cache(b, t + max_new_tokens - 1)

    def choose(logits: Array, step: Array | int) -> Array:
        return _choose(logits, greedy, nucleus, temperature, top_p, jax.random.fold_in(rng, step))

    def record(state: tuple, logits: Array, step: Array | int) -> tuple:
        tokens, done, lengths, kept = state
        token = jnp.where(done, pad, choose(logits, step))
        tokens = tokens.at[:, step].set(token)
        lengths = jnp.where(done, lengths, step + 1)
        done = done | jnp.any(token[:, None] == stops[None, :], axis=-1)
        if return_logits:
            kept = kept.at[:, step].set(logits)
        return tokens, done, lengths, kept

    positions = inputs.get("position_ids")
    if positions is None or positions.ndim != 2:  # multimodal ports may take other position layouts
        positions = default_positions(mask, None)
    info = HookInfo(positions=positions, step=jnp.zeros((), jnp.int32), token_types=token_types, prefill=True)
    with intercept_sites(hook, hook_params, info):
        out = model.apply({"params": params}, **inputs, cache=cache, logits_to_keep=1)
    vocab = out.logits.shape[-1]
    state = (
        jnp.full((b, max_new_tokens), pad, jnp.int32),
        jnp.zeros((b,), bool),
        jnp.zeros((b,), jnp.int32),
        jnp.zeros((b, max_new_tokens, vocab), jnp.float32) if return_logits else None,
    )
    state = record(state, out.logits[:, -1], 0)

    def running(carry: tuple) -> Array:
        step, _, (_, done, _, _) = carry
        return (step < max_new_tokens) & ~jnp.all(done)

    def advance(carry: tuple) -> tuple:
        # Step s feeds token s - 1 and chooses token s; finished rows keep attending (mask 1), as in Hugging Face.
        step, cache, state = carry
        previous = jax.lax.dynamic_index_in_dim(state[0], step - 1, axis=1)  # [B, 1]
        ones = jnp.ones((b, 1), jnp.int32)
        info = HookInfo(positions=default_positions(ones, cache), step=step, prefill=False)
        with intercept_sites(hook, hook_params, info):
            out = model.apply({"params": params}, input_ids=previous, attention_mask=ones, cache=cache)
        return step + 1, out.cache, record(state, out.logits[:, -1], step)

    _, _, (tokens, _, lengths, kept) = jax.lax.while_loop(
        running, advance, (jnp.ones((), jnp.int32), out.cache, state)
    )
    return GenerationOutput(tokens=tokens, lengths=lengths, logits=kept)
