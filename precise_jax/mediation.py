"""Causal diagnosis of safety behaviour: layer skipping, activation patching and attribution patching.

Every measurement reads the refusal logit score (`evaluate.refusal_logit_score`): the log-odds
log p(R) − log(1 − p(R)) of refusal-opening tokens R (e.g. `evaluate.refusal_token_ids(tokenizer)`) at the first
response position, the last column of a left-padded prompt batch. Layer skips also measure a refusal *rate* of
greedy generations under a judge (e.g. `evaluate.refusal_keyword_judge`).

- Skips (CARE's diagnosis, FredJDean/CARE `src/HookedLVLM_qwen.py`) rewrite the decoder through interceptors on
  the layer and its sub-modules: 'block' (layer output = its input), 'attn' ('official': the attention output is
  replaced by the attention's input, i.e. the normed hidden state; 'zero': no attention contribution) and 'mlp'
  ('official': the MLP output is replaced by the last non-skipped layer's MLP output; 'zero': no MLP contribution).
  Which layers are skipped is an array, so a sweep over layers compiles once.
- Activation patching writes a matched benign run's site values into the harmful run at chosen positions and
  reports the indirect effect IE = score(harmful, patched) − score(harmful).
- Attribution patching estimates the IE of patching every neuron (`mlp.act`) from one harmful forward and backward:
  ∂score/∂a · (a_benign − a_harmful).
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any, Callable, Iterable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.linen.module import InterceptorContext

from ports.errors import InputError
from ports.generate import HookInfo, decode, generate, intercept_sites
from ports.layers import KVCache
from ports.pretrained import Pretrained
from precise_jax.capture import available_sites, capture, model_inputs, row_info
from precise_jax.evaluate import refusal_logit_score
from precise_jax.sites import check_sites, site_name

Array = jax.Array
SKIPS = ("block", "attn", "mlp")
VARIANTS = ("official", "zero")
_LAYER = re.compile(r"layers_(\d+)")


# ----------------------------------------------------------------------------------------------------- scores


@functools.partial(jax.jit, static_argnames=("model", "hook"))
def _scores(model, hook, params, inputs, token_types, hook_params, refusal_ids):
    info = HookInfo.for_forward(inputs["attention_mask"], token_types)
    with intercept_sites(hook, hook_params, info):
        logits = model.apply({"params": params}, **inputs, logits_to_keep=1).logits[:, -1]
    return refusal_logit_score(logits, refusal_ids)  # [B]


def _split(batch: Mapping) -> tuple[dict, Array | None]:
    if "input_ids" not in batch:
        raise InputError(f"the batch has no 'input_ids' (keys: {sorted(batch)}); tokenize the prompts first")
    inputs = model_inputs({k: v for k, v in batch.items() if k not in ("row_valid", "ids")})
    if "attention_mask" not in inputs:
        inputs["attention_mask"] = jnp.ones(inputs["input_ids"].shape, jnp.int32)
    mask = np.asarray(inputs["attention_mask"]).astype(bool)
    if not mask[:, -1].all():
        raise InputError("the refusal score reads the last column: the batch must be left-padded (every row ending "
                         "with its last prompt token); tokenize with padding_side='left'")
    token_types = batch.get("token_types")
    return inputs, None if token_types is None else jnp.asarray(token_types)


def _token_ids(ids: Sequence[int], lm: Pretrained) -> Array:
    ids = np.asarray(list(ids), np.int64)
    vocab = _vocab_size(lm)
    if ids.ndim != 1 or len(ids) == 0 or ids.min() < 0 or ids.max() >= vocab:
        raise InputError(f"refusal_ids must be a non-empty list of token ids in [0, {vocab}), got {ids.tolist()[:8]}; "
                         "e.g. the first token of 'I', 'Sorry', 'As' in the model's tokenizer")
    return jnp.asarray(ids, jnp.int32)


def _vocab_size(lm: Pretrained) -> int:
    return int(lm.params["lm"]["embed_tokens"]["embedding"].shape[0])


def _num_layers(lm: Pretrained) -> int:
    return sum(1 for key in lm.params["lm"] if _LAYER.fullmatch(key))


# ----------------------------------------------------------------------------------------------------- skipping


def _lm_layer(path: tuple[str, ...], depth: int) -> int | None:
    """The layer index when `path` ends `depth` names after ('lm', 'layers_i'), else None."""
    head = path[len(path) - depth - 2:len(path) - depth] if len(path) >= depth + 2 else ()
    if len(head) == 2 and head[0] == "lm" and (m := _LAYER.fullmatch(head[1])):
        return int(m.group(1))
    return None


def _skip_interceptor(component: str, variant: str, skip: Array):
    """Rewrite skipped LM layers: skip [L] float, 1 where layer l is skipped."""
    target, depth = {"block": (None, 0), "attn": ("self_attn", 1), "mlp": ("mlp", 1)}[component]
    carried: dict = {}  # the official MLP skip forwards the last non-skipped layer's MLP output within this call

    def interceptor(next_fun: Callable[..., Any], args: tuple, kwargs: dict[str, Any],
                    context: InterceptorContext) -> Any:
        path = context.module.path
        layer = _lm_layer(path, depth) if context.method_name == "__call__" else None
        if layer is None or (target is not None and path[-1] != target):
            return next_fun(*args, **kwargs)
        out = next_fun(*args, **kwargs)
        on = skip[layer] > 0
        if component == "block":  # DecoderLayer returns (hidden, kv): the cache is still written, as in HF
            return jnp.where(on, args[0], out[0]), out[1]
        if component == "attn":  # Attention returns (output, kv); its first argument is the normed hidden state
            replacement = args[0] if variant == "official" else jnp.zeros_like(out[0])
            return jnp.where(on, replacement, out[0]), out[1]
        if variant == "zero":
            return jnp.where(on, jnp.zeros_like(out), out)
        last, have = carried.get("last"), carried.get("have", jnp.zeros((), bool))
        fallback = args[0] if last is None else jnp.where(have, last, args[0])  # no earlier kept layer: its input
        carried["last"] = out if last is None else jnp.where(on, last, out)
        carried["have"] = have | ~on
        return jnp.where(on, fallback, out)

    return interceptor


class _Skipping(nn.Module):
    """The model with some LM layers (or their attention / MLP) skipped; params = {'inner': ..., 'skip': [L]}."""

    inner: nn.Module
    component: str
    variant: str

    @nn.compact
    def __call__(self, *args, **kwargs):
        skip = self.get_variable("params", "skip")  # [L]
        with nn.intercept_methods(_skip_interceptor(self.component, self.variant, skip)):
            return self.inner(*args, **kwargs)

    @nn.nowrap
    def init_cache(self, batch: int, slots: int) -> KVCache:
        return self.inner.init_cache(batch, slots)

    @nn.nowrap
    def check_batch(self, inputs: Mapping[str, Any]) -> None:
        if hasattr(self.inner, "check_batch"):
            self.inner.check_batch(inputs)


_WRAPPERS: dict = {}


def skipped(lm: Pretrained, layers: Iterable[int], component: str = "block", variant: str = "official") -> Pretrained:
    """The same model with `layers` skipped (see the module docstring); use it with generate, forward_with, ...

    One wrapper per (model, component, variant) is reused, so sweeping over layers compiles once."""
    if component not in SKIPS:
        raise InputError(f"unknown skip {component!r}; choose one of {SKIPS}")
    if variant not in VARIANTS:
        raise InputError(f"unknown skip variant {variant!r}; choose one of {VARIANTS}")
    if component == "block":
        variant = "official"  # layer output = its input: there is nothing else to choose
    n = _num_layers(lm)
    layers = [int(l) for l in layers]
    if any(not 0 <= l < n for l in layers):
        raise InputError(f"skipped layers {layers} are outside the model's {n} layers [0, {n})")
    key = (lm.model, component, variant)
    if key not in _WRAPPERS:
        _WRAPPERS[key] = _Skipping(lm.model, component, variant)
    skip = np.zeros(n, np.float32)
    skip[layers] = 1.0
    return dataclasses.replace(lm, model=_WRAPPERS[key], params={"inner": lm.params, "skip": jnp.asarray(skip)})


@dataclasses.dataclass
class SkipEffects:
    """Refusal measurements with each set of layers skipped, and their change from the unskipped model."""

    skipped: list[tuple[int, ...]]  # [C] the layers of each configuration
    component: str
    variant: str
    clean_score: float  # mean refusal log-odds without skipping
    score: np.ndarray  # [C] mean refusal log-odds with the skip
    clean_rate: float | None = None  # refusal rate of greedy generations (when a judge was given)
    rate: np.ndarray | None = None  # [C]

    @property
    def delta_score(self) -> np.ndarray:
        return self.score - self.clean_score

    @property
    def delta_rate(self) -> np.ndarray | None:
        return None if self.rate is None else self.rate - self.clean_rate


def layer_skip_effects(
    lm: Pretrained,
    batches: Mapping | Iterable[Mapping],
    refusal_ids: Sequence[int],
    *,
    component: str = "block",
    variant: str = "official",
    span: int = 2,
    layers: Iterable[int] | None = None,
    judge: Callable[[list[str]], Sequence[bool]] | None = None,
    max_new_tokens: int = 32,
    decoder: Callable[[np.ndarray, np.ndarray], list[str]] | None = None,
) -> SkipEffects:
    """Skip `span` consecutive layers starting at each of `layers` (default all; CARE skips pairs l, l+1) and
    measure the mean refusal log-odds and, with `judge` (texts -> refused?), the refusal rate of greedy
    generations decoded by `decoder(tokens, lengths)` (default: the model's tokenizer)."""
    batches = [batches] if isinstance(batches, Mapping) else list(batches)
    if not batches:
        raise InputError("layer_skip_effects got no batches")
    n = _num_layers(lm)
    if not 1 <= span <= n:
        raise InputError(f"span must be in [1, {n}] (the number of consecutive layers skipped), got {span}")
    starts = list(range(n - span + 1)) if layers is None else [int(l) for l in layers]
    configs = [tuple(range(s, s + span)) for s in starts]
    if judge is not None and decoder is None:
        if lm.processor is None:
            raise InputError("the refusal rate decodes generations, but this model has no tokenizer; pass "
                             "decoder=fn(tokens, lengths) -> texts")
        decoder = functools.partial(decode, lm.processor)
    ids = _token_ids(refusal_ids, lm)

    def measure(model_lm: Pretrained) -> tuple[float, float | None]:
        scores, refused = [], []
        for batch in batches:
            inputs, token_types = _split(batch)
            valid, _ = row_info(batch)  # data-layer batches end with dummy rows
            scores.append(np.asarray(_scores(model_lm.model, None, model_lm.params, inputs, token_types, {},
                                             ids))[valid])
            if judge is not None and decoder is not None:  # a judge always has a decoder by now
                out = generate(model_lm, dict(batch), max_new_tokens=max_new_tokens)
                texts = decoder(np.asarray(out.tokens), np.asarray(out.lengths))
                refused.append(np.asarray(list(judge(texts)), bool)[valid])
        return float(np.concatenate(scores).mean()), (float(np.concatenate(refused).mean()) if refused else None)

    clean_score, clean_rate = measure(skipped(lm, [], component, variant))
    results = [measure(skipped(lm, config, component, variant)) for config in configs]
    return SkipEffects(
        skipped=configs, component=component, variant="official" if component == "block" else variant,
        clean_score=clean_score, score=np.asarray([s for s, _ in results]),
        clean_rate=clean_rate, rate=None if judge is None else np.asarray([r for _, r in results]),
    )


# ----------------------------------------------------------------------------------------------------- patching


def _positions(harmful: Mapping, benign: Mapping, positions) -> tuple[np.ndarray, np.ndarray]:
    """(harmful positions [B, P], benign positions [B, P]); default the last column of each (the last prompt token)."""
    b_h, t_h = np.asarray(harmful["input_ids"]).shape
    b_b, t_b = np.asarray(benign["input_ids"]).shape
    if b_h != b_b:
        raise InputError(f"patching pairs rows: the harmful batch has {b_h} rows and the benign one {b_b}")
    if not (row_info(harmful)[0].all() and row_info(benign)[0].all()):
        raise InputError("patching pairs rows: both batches must hold real examples only (no dummy padding rows); "
                         "make them with a batch size that divides the data, or drop the invalid rows")
    if positions is None:
        return np.full((b_h, 1), t_h - 1, np.int32), np.full((b_b, 1), t_b - 1, np.int32)
    pos_h, pos_b = (np.asarray(p, np.int32) for p in positions)
    if pos_h.ndim != 2 or pos_h.shape != pos_b.shape or pos_h.shape[0] != b_h:
        raise InputError(f"positions must be two [B={b_h}, P] integer arrays (harmful, benign), got {pos_h.shape} "
                         f"and {pos_b.shape}")
    if pos_h.min() < 0 or pos_h.max() >= t_h or pos_b.min() < 0 or pos_b.max() >= t_b:
        raise InputError(f"positions fall outside the batches' {t_h} (harmful) and {t_b} (benign) tokens")
    return pos_h, pos_b


def _gather(x: Array, pos: Array) -> Array:
    """x [B, T, W], pos [B, P] -> [B, P, W]."""
    return jnp.take_along_axis(x, pos[:, :, None], axis=1)


def _patch_hook(hook_params, site_path, x, info):
    """Blend the benign values into x at the patch positions: x ← x + mask (value − x); mask [W] or scalar."""
    p = hook_params["sites"].get(site_name(site_path))
    if p is None:
        return x
    rows = jnp.arange(x.shape[0])[:, None]
    pos = hook_params["positions"]
    current = x[rows, pos]  # [B, P, W]
    return x.at[rows, pos].set((current + p["mask"] * (p["value"] - current)).astype(x.dtype))


def _site_values(lm: Pretrained, batch: Mapping, sites: tuple[str, ...], pos: np.ndarray) -> dict[str, Array]:
    acts = capture(lm, batch, sites)
    return {name: _gather(acts[name], jnp.asarray(pos)) for name in sites}


def activation_patching(
    lm: Pretrained,
    harmful: Mapping,
    benign: Mapping,
    refusal_ids: Sequence[int],
    *,
    sites: Iterable[str] | None = None,
    positions: tuple[np.ndarray, np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """{site: IE [B]}: the change of the harmful rows' refusal log-odds when the site is patched, at the harmful
    positions, with the matched benign rows' values at the benign positions (default: both last prompt tokens).

    Sites default to every LM layer's mlp.out, attn.out and resid; all sites share one compilation."""
    if sites is None:
        sites = [f"lm.layers.{l}.{kind}" for l in range(_num_layers(lm)) for kind in ("mlp.out", "attn.out", "resid")]
    sites = tuple(sites)
    check_sites(sites, available_sites(lm))
    ids = _token_ids(refusal_ids, lm)
    pos_h, pos_b = _positions(harmful, benign, positions)
    inputs, token_types = _split(harmful)
    values = _site_values(lm, benign, sites, pos_b)

    def params(on: str | None) -> dict[str, Any]:
        return {"positions": jnp.asarray(pos_h),
                "sites": {s: {"value": values[s], "mask": jnp.float32(s == on)} for s in sites}}

    clean = _scores(lm.model, _patch_hook, lm.params, inputs, token_types, params(None), ids)
    return {s: np.asarray(_scores(lm.model, _patch_hook, lm.params, inputs, token_types, params(s), ids) - clean)
            for s in sites}


@functools.partial(jax.jit, static_argnames=("model",))
def _unit_scores(model, params, inputs, token_types, values, positions, masks, refusal_ids):
    """Mean refusal log-odds [C] with each of C unit sets patched; masks {site: [C, W]}."""

    def one(mask: Mapping[str, Array]) -> Array:
        hook_params = {"positions": positions,
                       "sites": {s: {"value": values[s], "mask": mask[s]} for s in values}}
        return jnp.mean(_scores(model, _patch_hook, params, inputs, token_types, hook_params, refusal_ids))

    return jax.vmap(one)(masks)


def neuron_patching(
    lm: Pretrained,
    harmful: Mapping,
    benign: Mapping,
    refusal_ids: Sequence[int],
    *,
    layers: Iterable[int] | None = None,
    positions: tuple[np.ndarray, np.ndarray] | None = None,
    chunk: int = 64,
) -> dict[str, np.ndarray]:
    """{lm.layers.l.mlp.act: [F]}: the exact change of the mean refusal log-odds when each neuron alone is patched
    from the benign rows (one forward per neuron, `chunk` neurons per call). The reference for attribution patching."""
    sites = _neuron_sites(lm, layers)
    ids = _token_ids(refusal_ids, lm)
    pos_h, pos_b = _positions(harmful, benign, positions)
    inputs, token_types = _split(harmful)
    values = _site_values(lm, benign, sites, pos_b)
    clean = float(np.mean(np.asarray(_scores(lm.model, None, lm.params, inputs, token_types, {}, ids))))
    widths = {s: values[s].shape[-1] for s in sites}
    units = [(s, i) for s in sites for i in range(widths[s])]
    effects = {s: np.zeros(widths[s]) for s in sites}
    for start in range(0, len(units), chunk):
        block = units[start:start + chunk]
        masks = {s: np.zeros((chunk, widths[s]), np.float32) for s in sites}  # padded chunks keep one shape
        for row, (s, i) in enumerate(block):
            masks[s][row, i] = 1.0
        scores = np.asarray(_unit_scores(lm.model, lm.params, inputs, token_types, values, jnp.asarray(pos_h),
                                         {s: jnp.asarray(m) for s, m in masks.items()}, ids))
        for row, (s, i) in enumerate(block):
            effects[s][i] = scores[row] - clean
    return effects


@functools.partial(jax.jit, static_argnames=("model",))
def _attribution(model, params, inputs, token_types, values, positions, refusal_ids):
    seen = {}

    def score(deltas: Mapping[str, Array]) -> tuple[Array, dict[str, Array]]:
        def hook(hook_params: Mapping[str, Array], site_path: tuple[str, ...], x: Array, info: HookInfo) -> Array:
            name = site_name(site_path)
            if name not in hook_params:
                return x
            rows = jnp.arange(x.shape[0])[:, None]
            seen[name] = x[rows, positions]  # the harmful activations, returned from this same trace
            return x.at[rows, positions].add(hook_params[name].astype(x.dtype))

        info = HookInfo.for_forward(inputs["attention_mask"], token_types)
        with intercept_sites(hook, deltas, info):
            logits = model.apply({"params": params}, **inputs, logits_to_keep=1).logits[:, -1]
        return jnp.mean(refusal_logit_score(logits, refusal_ids)), dict(seen)

    zeros = {s: jnp.zeros_like(v) for s, v in values.items()}
    (_, harmful), grads = jax.value_and_grad(score, has_aux=True)(zeros)
    return {s: jnp.einsum("bpw,bpw->w", grads[s], values[s] - harmful[s], precision=jax.lax.Precision.HIGHEST)
            for s in values}


def attribution_patching(
    lm: Pretrained,
    harmful: Mapping,
    benign: Mapping,
    refusal_ids: Sequence[int],
    *,
    layers: Iterable[int] | None = None,
    positions: tuple[np.ndarray, np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """{lm.layers.l.mlp.act: [F]}: first-order estimates of `neuron_patching` for every neuron at once,
    ∂score/∂a · (a_benign − a_harmful) summed over the patch positions, from one forward and one backward
    pass."""
    sites = _neuron_sites(lm, layers)
    ids = _token_ids(refusal_ids, lm)
    pos_h, pos_b = _positions(harmful, benign, positions)
    inputs, token_types = _split(harmful)
    out = _attribution(lm.model, lm.params, inputs, token_types, _site_values(lm, benign, sites, pos_b),
                       jnp.asarray(pos_h), ids)
    return {s: np.asarray(v) for s, v in out.items()}


def _neuron_sites(lm: Pretrained, layers: Iterable[int] | None) -> tuple[str, ...]:
    n = _num_layers(lm)
    layers = range(n) if layers is None else [int(l) for l in layers]
    if any(not 0 <= l < n for l in layers):
        raise InputError(f"layers {list(layers)} are outside the model's {n} layers [0, {n})")
    sites = tuple(f"lm.layers.{l}.mlp.act" for l in layers)
    check_sites(sites, available_sites(lm))
    return sites
