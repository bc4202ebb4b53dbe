"""Precise Shield stage D: supervised fine-tuning on reply tokens, restricted to safety neurons or not.

Modes (one jitted step each; the trained tree and optimizer state are arguments and are donated):

- `masked`: the full parameter tree, updates restricted to the neurons' weights by `masking.neuron_masked`;
- `lean`: only `masking.NeuronDeltas` train, the base parameters are frozen inputs, optimizer state (float32)
  exists for the deltas only;
- `full`: every parameter (the unrestricted baseline);
- `lora`: `lora.LoraAdapters` on the MLP projections (or `lora_targets`), the parameter-efficient baseline;
- `random`: masked mode on `neurons.random_like(set, seed)`, the same count per layer (the control).

The loss is the mean next-token negative log-likelihood of the reply tokens (token type RESPONSE), each predicted
from the previous position; only those positions meet the LM head, in chunks (`reply_nll`), so no [B, T, V] logits
exist. The data order is a pure function of (seed, epoch), so a checkpoint (trained tree,
optimizer state, step, loss history) resumes a killed run bit for bit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.linen.module import InterceptorContext
from tqdm.auto import tqdm

from ports.errors import CheckpointError, InputError
from ports.layers import CausalLM
from ports.pretrained import Pretrained
from ports.processing import TokenType
from precise_jax.capture import model_inputs
from precise_jax.data import Example, make_batches
from precise_jax.distributed import place_batch
from precise_jax.lora import TARGETS as LORA_TARGETS, LoraAdapters
from precise_jax.masking import MATRICES, NeuronDeltas, neuron_masked, trainable_count
from precise_jax.neurons import NeuronSet, check_for_model, random_like

MODES = ("masked", "lean", "full", "lora", "random")
NEURON_MODES = ("masked", "lean", "random")
OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("constant", "cosine")
# Settings that do not change what a run computes: a checkpoint written under other values still resumes.
_NOT_IN_FINGERPRINT = ("checkpoint_every", "keep_checkpoints")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """What to train and how. `steps` defaults to `epochs` passes over the examples."""

    mode: str = "masked"
    steps: int | None = None
    epochs: int = 1
    batch_size: int = 8
    learning_rate: float = 2e-5
    optimizer: str = "adamw"  # "sgd" (plain, no momentum) exists for exact mode-equivalence checks
    weight_decay: float = 0.01  # decoupled; on matrices only (ndim >= 2), never on norms or biases
    max_grad_norm: float | None = 1.0  # clip by global norm; None: no clipping
    warmup_steps: int = 0  # linear warm-up from 0
    schedule: str = "constant"  # after warm-up: "constant" or "cosine" decay to 0 at the last step
    seed: int = 0  # data order, LoRA initialisation, the random neuron set
    matrices: tuple[str, ...] = MATRICES  # neuron modes: which of gate/up/down train
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = LORA_TARGETS
    system: str | None = None  # system turn of the chat template
    max_length: int | None = None  # longest example in tokens (default: the model's context)
    buckets: tuple[int, ...] | None = None  # padded lengths (default 64, 128, 256, ...); each compiles once
    checkpoint_every: int = 0  # steps between checkpoints (0: only at the end, when a folder is given)
    keep_checkpoints: int = 2

    def __post_init__(self):
        for name in ("matrices", "lora_targets", "buckets"):
            value = getattr(self, name)
            object.__setattr__(self, name, None if value is None else tuple(value))
        checks = [
            (self.mode in MODES, f"mode must be one of {MODES}, got {self.mode!r}"),
            (self.optimizer in OPTIMIZERS, f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}"),
            (self.schedule in SCHEDULES, f"schedule must be one of {SCHEDULES}, got {self.schedule!r}"),
            (self.steps is None or self.steps >= 1, f"steps must be at least 1, got {self.steps}"),
            (self.epochs >= 1, f"epochs must be at least 1, got {self.epochs}"),
            (self.batch_size >= 1, f"batch_size must be at least 1, got {self.batch_size}"),
            (self.learning_rate > 0, f"learning_rate must be positive, got {self.learning_rate}"),
            (self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}"),
            (self.max_grad_norm is None or self.max_grad_norm > 0,
             f"max_grad_norm must be positive or None, got {self.max_grad_norm}"),
            (self.warmup_steps >= 0, f"warmup_steps must be >= 0, got {self.warmup_steps}"),
            (self.checkpoint_every >= 0, f"checkpoint_every must be >= 0, got {self.checkpoint_every}"),
            (self.keep_checkpoints >= 1, f"keep_checkpoints must be at least 1, got {self.keep_checkpoints}"),
        ]
        for ok, message in checks:
            if not ok:
                raise InputError(f"TrainConfig: {message}")


@dataclasses.dataclass(frozen=True)
class Validation:
    """Checkpoint choice by a stated rule. Every `every` steps and at the last one, `measure(model)` gives the
    refusal rates {"harmful_refusal", "benign_refusal"} on a validation split (never the held-out prompts).
    Training stops at the first check with harmful refusal >= `min_harmful_refusal` and benign refusal <=
    `max_benign_refusal`; if none meets both, the check with the largest harmful - benign margin is kept (the
    earliest among equals)."""

    measure: Callable[[Pretrained], Mapping[str, float]]
    every: int
    min_harmful_refusal: float = 0.9
    max_benign_refusal: float = 0.1

    def __post_init__(self):
        if self.every < 1:
            raise InputError(f"Validation.every must be at least 1 step, got {self.every}")

    def meets_targets(self, rates: Mapping[str, float]) -> bool:
        return (rates["harmful_refusal"] >= self.min_harmful_refusal
                and rates["benign_refusal"] <= self.max_benign_refusal)

    @staticmethod
    def margin(rates: Mapping[str, float]) -> float:
        return rates["harmful_refusal"] - rates["benign_refusal"]


@dataclasses.dataclass
class TrainResult:
    """A finished run: the aligned model (merged, ready for `ports.save_pretrained`) and what it took."""

    model: Pretrained
    losses: list[float]  # one per step from step 1, restored steps included
    trainable: int  # parameters the mode trains
    total: int  # parameters of the model
    neurons: NeuronSet | None  # the set trained (the random one in random mode)
    trained: Any  # what the optimizer updated: the full tree, the neuron deltas or the LoRA adapters
    seconds: float  # wall time of this call's steps (compilation included)
    checks: list[dict] = dataclasses.field(default_factory=list)  # validation: {"step", rates...} per check
    chosen_step: int | None = None  # the step whose parameters `model` holds, when a Validation chose it

    @property
    def fraction(self) -> float:
        return self.trainable / self.total


# ----------------------------------------------------------------------------------------------------- loss


def response_loss(logits: jax.Array, input_ids: jax.Array, token_types: jax.Array) -> jax.Array:
    """Mean next-token NLL of reply tokens: logits [B, T, V] at t-1 predict input_ids [B, T] at t.

    The reference formula; training computes the same value by `reply_nll` without [B, T, V] logits.
    """
    weights = (token_types[:, 1:] == TokenType.RESPONSE).astype(jnp.float32)  # [B, T-1]
    logits = logits[:, :-1].astype(jnp.float32)
    picked = jnp.take_along_axis(logits, input_ids[:, 1:, None].astype(jnp.int32), axis=-1)[..., 0]
    nll = jax.nn.logsumexp(logits, axis=-1) - picked  # [B, T-1], without a [B, T, V] log-softmax buffer
    return jnp.sum(nll * weights) / jnp.maximum(jnp.sum(weights), 1.0)


# Logit entries per chunk of the cross-entropy (128 MiB in float32): what bounds the loss's memory, whatever the
# batch; with several chunks each is rematerialised in the backward pass rather than stored.
LOSS_CHUNK_ELEMENTS = 2**25


def reply_nll(head: Callable, hidden: jax.Array, input_ids: jax.Array, token_types: jax.Array,
              vocab_size: int) -> jax.Array:
    """`response_loss` from the final hidden states [B, T, D], without [B, T, V] logits.

    The reply-predicting positions are packed first, then the LM head (`head`: [1, N, D] -> [1, N, V]) runs on
    chunks of at most LOSS_CHUNK_ELEMENTS logits; chunks past the last reply position are skipped at run time, so
    the head's work follows the number of reply tokens, and no shape depends on it (no recompilation).
    """
    d = hidden.shape[-1]
    is_reply = (token_types[:, 1:] == TokenType.RESPONSE).reshape(-1)  # [B*(T-1)]
    n, count = is_reply.shape[0], jnp.sum(is_reply)
    index = jnp.nonzero(is_reply, size=n, fill_value=0)[0]  # reply positions first, then repeats of 0 (weight 0)
    rows = min(_floor_pow2(max(LOSS_CHUNK_ELEMENTS // vocab_size, 1)), 1 << (n - 1).bit_length())
    chunks = -(-n // rows)
    pad = chunks * rows - n
    states = jnp.pad(hidden[:, :-1].reshape(-1, d)[index], ((0, pad), (0, 0))).reshape(chunks, rows, d)
    targets = jnp.pad(input_ids[:, 1:].reshape(-1).astype(jnp.int32)[index], (0, pad)).reshape(chunks, rows)
    weights = (jnp.arange(chunks * rows) < count).astype(jnp.float32).reshape(chunks, rows)

    def chunk_nll(h: jax.Array, y: jax.Array, w: jax.Array) -> jax.Array:
        logits = head(h[None])[0].astype(jnp.float32)  # [rows, V]
        picked = jnp.take_along_axis(logits, y[:, None], axis=-1)[:, 0]
        return (jax.nn.logsumexp(logits, axis=-1) - picked) * w

    if chunks == 1:
        nll = chunk_nll(states[0], targets[0], weights[0])
    else:
        def chunk_or_skip(chunk: tuple[jax.Array, jax.Array, jax.Array, jax.Array]) -> jax.Array:
            h, y, w, first = chunk
            return jax.lax.cond(first < count, chunk_nll, lambda h, y, w: jnp.zeros_like(w), h, y, w)

        nll = jax.lax.map(jax.checkpoint(chunk_or_skip), (states, targets, weights, jnp.arange(chunks) * rows))
    return jnp.sum(nll) / jnp.maximum(count, 1).astype(jnp.float32)


def _floor_pow2(x: int) -> int:
    return 1 << (x.bit_length() - 1)


def _final_hidden_states(next_fun, args, kwargs, context):
    """Interceptor: the model's own `head` returns its input, so `.logits` holds the final hidden states [B, T, D]
    (every port, vision-language ones included, ends in `CausalLM.head`)."""
    if context.method_name == "head" and isinstance(context.module, CausalLM) and not context.module.path:
        return args[0]
    return next_fun(*args, **kwargs)


# ----------------------------------------------------------------------------------------------------- optimizer


def _decay_mask(tree):
    # Decoupled weight decay on matrices only: norms and biases are not pulled toward 0 (the usual AdamW recipe).
    return jax.tree_util.tree_map(lambda x: x.ndim >= 2, tree)


def learning_rate_schedule(config: TrainConfig, total_steps: int) -> optax.Schedule:
    """Linear warm-up from 0 over `warmup_steps`, then constant or cosine decay to 0 at `total_steps`."""
    lr, warmup = config.learning_rate, min(config.warmup_steps, total_steps)
    if config.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(total_steps, warmup + 1), 0.0)
    if warmup == 0:
        return optax.constant_schedule(lr)
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), optax.constant_schedule(lr)], [warmup])


def base_optimizer(config: TrainConfig, total_steps: int) -> optax.GradientTransformation:
    """Clipping by global norm, then AdamW (or SGD with decoupled decay), both on the learning-rate schedule."""
    lr = learning_rate_schedule(config, total_steps)
    if config.optimizer == "adamw":
        core = optax.adamw(lr, weight_decay=config.weight_decay, mask=_decay_mask)
    else:
        core = optax.chain(optax.add_decayed_weights(config.weight_decay, _decay_mask), optax.sgd(lr))
    return core if config.max_grad_norm is None else optax.chain(optax.clip_by_global_norm(config.max_grad_norm), core)


# ----------------------------------------------------------------------------------------------------- modes


@dataclasses.dataclass(frozen=True)
class Plan:
    """How one mode trains: the initial trained tree, the frozen inputs, and how both make the model's weights."""

    trained: Any
    frozen: Any  # None when the trained tree is the whole model
    optimizer: optax.GradientTransformation
    weights: Callable  # (trained, frozen) -> (params for model.apply, interceptor or None)
    decay_params: Callable  # (trained, frozen) -> the tree weight decay acts on (same structure as trained)
    export: Callable  # (trained, frozen) -> full parameters
    count: int
    neurons: NeuronSet | None


def _whole_tree(params, optimizer, count, neurons) -> Plan:
    # A copy: the step donates the trained tree, and the caller's lm.params must stay valid.
    return Plan(jax.tree_util.tree_map(jnp.copy, params), None, optimizer, lambda t, f: (t, None),
                lambda t, f: t, lambda t, f: t, count, neurons)


def _lm_only(interceptor):
    """Restrict an interceptor to the language model: vision towers also have layers_{i}/mlp/gate_proj modules."""

    def intercept(next_fun: Callable[..., Any], args: tuple, kwargs: dict[str, Any],
                  context: InterceptorContext) -> Any:
        if context.module.path[:1] != ("lm",):
            return next_fun(*args, **kwargs)
        return interceptor(next_fun, args, kwargs, context)

    return intercept


def make_plan(lm: Pretrained, neurons: NeuronSet | None, config: TrainConfig, total_steps: int) -> Plan:
    """The mode's trained tree, optimizer (its schedule spans `total_steps`) and weight assembly; checks neurons."""
    params, base = lm.params, base_optimizer(config, total_steps)
    if config.mode in NEURON_MODES:
        shape = _mlp_shape(params)
        if neurons is None:
            raise InputError(f"mode {config.mode!r} trains the weights of a neuron set; pass neurons=NeuronSet(...) "
                             "(from neurons.select_safety_neurons), or use mode 'full' or 'lora'")
        check_for_model(neurons, lm.model_id, shape["layers"], shape["d_ff"])
        if config.mode == "random":
            neurons = random_like(neurons, config.seed)
        if config.mode == "lean":
            lean = NeuronDeltas(neurons, config.matrices)
            deltas = lean.init(params)
            # Weight decay acts on base + delta, as masked mode decays the whole entry: both modes then agree.
            return Plan(deltas, params, base, lambda t, f: (f, _lm_only(lean.interceptor(t))),
                        lambda t, f: lean.selected(f, t), lambda t, f: lean.merge(f, t), _size(deltas),
                        neurons)
        count = trainable_count(neurons, shape["d"], config.matrices, gate_up_bias=shape["bias"])
        return _whole_tree(params, neuron_masked(base, params, neurons, config.matrices), count, neurons)
    if config.mode == "full":
        return _whole_tree(params, base, _size(params), None)
    adapters = LoraAdapters(config.lora_rank, config.lora_alpha, config.lora_targets)
    return Plan(adapters.init(params, jax.random.key(config.seed)), params, base,
                lambda t, f: (f, adapters.interceptor(t)), lambda t, f: t, lambda t, f: adapters.merge(f, t),
                adapters.count(params), None)


def _apply_updates(params, updates):
    # Not optax.apply_updates: -0.0 + 0.0 is +0.0, so a frozen weight that is -0.0 would change its bits.
    return jax.tree_util.tree_map(lambda p, u: jnp.where(u == 0, p, (p + u).astype(p.dtype)), params, updates)


def make_step(model: nn.Module, plan: Plan) -> Callable:
    """The jitted step (trained, opt_state, frozen, inputs, token_types) -> (trained, opt_state, loss).

    `trained` and `opt_state` are donated: pass the returned ones to the next call.
    """
    # Only the plan's functions, never the plan: a cached step must not keep a copy of the parameters alive.
    weights, optimizer, decay_params = plan.weights, plan.optimizer, plan.decay_params

    def loss_fn(trained: Any, frozen: Any, inputs: Mapping[str, Any], token_types: jax.Array) -> jax.Array:
        params, interceptor = weights(trained, frozen)
        with contextlib.ExitStack() as stack:
            if interceptor is not None:
                stack.enter_context(nn.intercept_methods(interceptor))
            with nn.intercept_methods(_final_hidden_states):
                output: Any = model.apply({"params": params}, **inputs)  # no `mutable`: the output alone
                hidden = output.logits  # [B, T, D]
            head = functools.partial(model.apply, {"params": params}, method="head")
            return reply_nll(head, hidden, inputs["input_ids"], token_types, model.config.vocab_size)

    def step(trained: Any, opt_state: optax.OptState, frozen: Any, inputs: Mapping[str, Any],
             token_types: jax.Array) -> tuple[Any, optax.OptState, jax.Array]:
        loss, grads = jax.value_and_grad(loss_fn)(trained, frozen, inputs, token_types)
        updates, opt_state = optimizer.update(grads, opt_state, decay_params(trained, frozen))
        return _apply_updates(trained, updates), opt_state, loss

    return jax.jit(step, donate_argnums=(0, 1))


# Masked steps by (model, optimizer settings, trained layers): the neuron selection is optimizer state, so one
# compiled step serves every set over the same layers (the random-neuron control, other conditions, reruns).
_MASKED_STEPS: dict[tuple, Callable] = {}


def _step_for(model: nn.Module, plan: Plan, config: TrainConfig, total_steps: int) -> Callable:
    if config.mode not in ("masked", "random") or plan.neurons is None:
        return make_step(model, plan)
    settings = {k: v for k, v in dataclasses.asdict(config).items()
                if k in ("optimizer", "learning_rate", "weight_decay", "max_grad_norm", "warmup_steps", "schedule",
                         "matrices")}
    key = (model, total_steps, tuple(sorted(settings.items())), tuple(plan.neurons.neurons))
    if key not in _MASKED_STEPS:
        _MASKED_STEPS[key] = make_step(model, plan)
    return _MASKED_STEPS[key]


# ----------------------------------------------------------------------------------------------------- data


def as_examples(examples: Iterable[Example | tuple[str, str]]) -> list[Example]:
    """Examples as given; (prompt, reply) pairs become Examples `pair-{i}` labelled harmful (refusal training)."""
    out = []
    for i, example in enumerate(examples):
        if isinstance(example, Example):
            out.append(example)
        elif isinstance(example, (tuple, list)) and len(example) == 2:
            out.append(Example(id=f"pair-{i}", prompt=example[0], label="harmful", response=example[1]))
        else:
            raise InputError(f"training example {i} is a {type(example).__name__}; give data.Example objects with "
                             "a response, or (prompt, reply) pairs")
    if not out:
        raise InputError("the training set is empty; give at least one (prompt, reply) example")
    return out


def _batch_at(examples: Sequence[Example], lm: Pretrained, config: TrainConfig, step: int):
    """The batch of 0-based `step`: epoch step // n_batches, examples in the order rng(seed, epoch) gives."""
    n_batches = math.ceil(len(examples) / config.batch_size)
    epoch, index = divmod(step, n_batches)
    order = np.random.default_rng([config.seed, epoch]).permutation(len(examples))
    chunk = [examples[i] for i in order[index * config.batch_size:(index + 1) * config.batch_size]]
    return next(iter(make_batches(chunk, lm, config.batch_size, buckets=config.buckets, system=config.system,
                                  with_response=True, max_length=config.max_length)))


def _check_replies(examples: Sequence[Example], lm: Pretrained, config: TrainConfig) -> None:
    """Encode every example once: each needs reply tokens and must fit the context (InputError otherwise)."""
    for batch in make_batches(examples, lm, config.batch_size, buckets=config.buckets, system=config.system,
                              with_response=True, max_length=config.max_length):
        replies = (np.asarray(batch["token_types"]) == TokenType.RESPONSE).sum(axis=1)
        lacking = [i for i, n, ok in zip(batch.ids, replies, batch.row_valid) if ok and n == 0]
        if lacking:
            raise InputError(f"examples {lacking[:5]} have no reply tokens after the chat template; the loss is on "
                             "reply tokens only, so give every example a non-empty response")


def _data_digest(examples: Sequence[Example]) -> str:
    """A digest of the training set, the same in every process (in-memory images by their pixels, not their id)."""
    h = hashlib.sha256()
    for e in examples:
        images = [hashlib.sha256(i.tobytes()).hexdigest() if hasattr(i, "tobytes") else str(i) for i in e.images]
        h.update(json.dumps([e.id, e.prompt, e.response, images]).encode())
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------------------------------- checkpoints


class _Checkpoints:
    """Orbax checkpoints of (trained tree, optimizer state, step) plus JSON (run fingerprint, losses, data position).

    Saves are synchronous: the next step donates (reuses) the very buffers a background save would still read.
    """

    def __init__(self, directory: str | Path, keep: int):
        import orbax.checkpoint as ocp

        self.ocp = ocp
        self.directory = Path(directory).resolve()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=False, create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: dict, meta: dict) -> None:
        args = self.ocp.args
        self.manager.save(step, args=args.Composite(state=args.StandardSave(state), meta=args.JsonSave(meta)))

    def meta(self, step: int) -> dict:
        return self.manager.restore(step, args=self.ocp.args.Composite(meta=self.ocp.args.JsonRestore())).meta

    def restore(self, step: int, like: dict) -> dict:
        """The saved state, laid out (shapes, dtypes, shardings) like `like`."""
        abstract = jax.tree_util.tree_map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), like)
        args = self.ocp.args
        return self.manager.restore(step, args=args.Composite(state=args.StandardRestore(abstract))).state

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _check_same_run(saved: Mapping, run: Mapping, directory: Path) -> None:
    differ = sorted(k for k in set(saved) | set(run) if saved.get(k) != run.get(k))
    if differ:
        detail = "; ".join(f"{k}: checkpoint {saved.get(k)!r} vs now {run.get(k)!r}" for k in differ[:4])
        raise CheckpointError(f"the checkpoint in {directory} belongs to another run ({detail}); resume with the "
                              "same model, data, neurons and settings, or give a fresh checkpoint folder")


# ----------------------------------------------------------------------------------------------------- train


def train(
    lm: Pretrained,
    examples: Iterable[Example | tuple[str, str]],
    neurons: NeuronSet | None = None,
    config: TrainConfig = TrainConfig(),
    *,
    checkpoint_dir: str | Path | None = None,
    validation: Validation | None = None,
    progress: bool = True,
) -> TrainResult:
    """Fine-tune `lm` on (prompt, reply) examples in `config.mode`; with `checkpoint_dir`, save every
    `checkpoint_every` steps and at the end, and resume from its latest checkpoint when it holds one of this run;
    with `validation`, stop early or keep the best check's parameters by its rule.
    """
    examples = as_examples(examples)
    _check_replies(examples, lm, config)
    n_batches = math.ceil(len(examples) / config.batch_size)
    total_steps = config.steps or config.epochs * n_batches
    plan = make_plan(lm, neurons, config, total_steps)
    total = _size(lm.params)
    run = json.loads(json.dumps({
        "config": {k: v for k, v in dataclasses.asdict(config).items() if k not in _NOT_IN_FINGERPRINT},
        "total_steps": total_steps, "model": lm.model_id, "dtype": np.dtype(lm.dtype).name,
        "data": _data_digest(examples),
        "neurons": None if plan.neurons is None else hashlib.sha256(
            json.dumps(sorted(plan.neurons.pairs())).encode()).hexdigest()[:16],
    }))

    trained, opt_state = plan.trained, plan.optimizer.init(plan.trained)
    start, losses, checks, best = 0, [], [], None
    checkpoints = None if checkpoint_dir is None else _Checkpoints(checkpoint_dir, config.keep_checkpoints)
    try:
        if checkpoints is not None and (latest := checkpoints.latest()) is not None:
            meta = checkpoints.meta(latest)
            _check_same_run(meta.get("run", {}), run, checkpoints.directory)
            state = checkpoints.restore(latest, {"trained": trained, "opt_state": opt_state, "step": np.int64(0)})
            trained, opt_state, start, losses = state["trained"], state["opt_state"], int(state["step"]), meta["losses"]
        rows = [min(config.batch_size, len(examples) - (s % n_batches) * config.batch_size)
                for s in range(total_steps)]  # valid examples per step: the last batch of an epoch is short
        if progress:
            print(f"train {config.mode}: {plan.count:,} of {total:,} parameters trainable "
                  f"({plan.count / total:.4%}), {total_steps} steps", file=sys.stderr)
        bar = tqdm(total=sum(rows), initial=sum(rows[:start]), unit="ex", desc=f"train {config.mode}",
                   file=sys.stderr, dynamic_ncols=True, disable=not progress)
        step_fn, began = _step_for(lm.model, plan, config, total_steps), time.perf_counter()
        for step in range(start, total_steps):
            batch = _batch_at(examples, lm, config, step)
            inputs = place_batch(lm.mesh, {**model_inputs(batch), "token_types": batch["token_types"]})
            types = inputs.pop("token_types")  # rows split over the mesh's data axes, if it has one
            trained, opt_state, loss = step_fn(trained, opt_state, plan.frozen, inputs, types)
            losses.append(float(loss))
            done = step + 1
            if checkpoints is not None and (done == total_steps or (
                    config.checkpoint_every and done % config.checkpoint_every == 0)):
                checkpoints.save(done, {"trained": trained, "opt_state": opt_state, "step": np.int64(done)},
                                 {"run": run, "losses": losses, "seed": config.seed,
                                  "data_position": {"epoch": done // n_batches, "batch": done % n_batches,
                                                    "examples_seen": sum(rows[:done])}})
            bar.update(rows[step])
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
            if validation is not None and (done % validation.every == 0 or done == total_steps):
                candidate = dataclasses.replace(lm, params=plan.export(trained, plan.frozen))
                rates = {k: float(v) for k, v in validation.measure(candidate).items()}
                checks.append({"step": done, "loss": losses[-1], **rates})
                if progress:
                    print(f"validation at step {done}: " + ", ".join(f"{k} {v:.3f}" for k, v in rates.items()),
                          file=sys.stderr)
                if validation.meets_targets(rates) or best is None or (
                        validation.margin(rates) > validation.margin(best[1])):
                    # a copy: the next step donates the buffers the candidate may share with the trained tree
                    best = (dataclasses.replace(candidate, params=jax.tree_util.tree_map(jnp.copy, candidate.params)),
                            rates, done)
                if validation.meets_targets(rates):
                    break
        bar.close()
    finally:
        if checkpoints is not None:
            checkpoints.close()
    if best is not None:
        model, chosen = best[0], best[2]
    else:
        model, chosen = dataclasses.replace(lm, params=plan.export(trained, plan.frozen)), None
    return TrainResult(model, losses, plan.count, total, plan.neurons, trained, time.perf_counter() - began,
                       checks, chosen)


# ----------------------------------------------------------------------------------------------------- helpers


def _size(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


def _mlp_shape(params: Mapping) -> dict:
    """Language-model layer count, width d, FFN width d_ff and whether gate/up have biases."""
    lm = params["lm"]
    layers = sum(1 for k in lm if k.startswith("layers_"))
    try:
        gate = lm["layers_0"]["mlp"]["gate_proj"]
    except KeyError:
        raise InputError("the model has no gated MLP at lm.layers_0.mlp.gate_proj; neuron training needs one") from None
    return {"layers": layers, "d": int(gate["kernel"].shape[0]), "d_ff": int(gate["kernel"].shape[1]),
            "bias": "bias" in gate}


__all__ = ["MODES", "Plan", "TrainConfig", "TrainResult", "Validation", "as_examples", "base_optimizer",
           "learning_rate_schedule", "make_plan", "make_step", "reply_nll", "response_loss", "train"]
