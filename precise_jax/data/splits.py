"""Deterministic train / held-out splits: a hash of (seed, example id), stable across runs, machines and Pythons."""

from __future__ import annotations

import hashlib
from collections import defaultdict
from typing import Sequence

from ports.errors import InputError
from precise_jax.data.examples import Example


def stable_hash(*parts: object) -> int:
    """A 64-bit integer from the parts' text: the same on every run (unlike `hash`, which is salted per process)."""
    text = "\x1f".join(str(part) for part in parts)
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")


def split_examples(
    examples: Sequence[Example], held_out: float = 0.2, *, seed: int = 0, stratify: bool = True
) -> tuple[list[Example], list[Example]]:
    """(train, held_out): in each category (when `stratify`) the round(held_out * n) examples of lowest hash.

    Membership depends only on ids, categories and the seed; both parts keep the input order.
    """
    if not 0.0 <= held_out <= 1.0:
        raise InputError(f"held_out must be a fraction in [0, 1], got {held_out}")
    if not examples:
        raise InputError("cannot split an empty prompt set")
    ids = [example.id for example in examples]
    if len(set(ids)) != len(ids):
        duplicated = sorted({i for i in ids if ids.count(i) > 1})[:5]
        raise InputError(f"example ids must be unique to split by id; repeated: {duplicated}")
    groups: dict[object, list[Example]] = defaultdict(list)
    for example in examples:
        groups[example.category if stratify else None].append(example)
    chosen: set[str] = set()
    for members in groups.values():
        ranked = sorted(members, key=lambda e: (stable_hash(seed, e.id), e.id))
        # int(x + 0.5): round half up, the same everywhere (round() rounds half to even)
        chosen.update(e.id for e in ranked[: int(held_out * len(members) + 0.5)])
    return [e for e in examples if e.id not in chosen], [e for e in examples if e.id in chosen]


def seeded_order(examples: Sequence[Example], seed: int = 0) -> list[Example]:
    """The examples in a seeded order that depends only on their ids, so that the first n of a set mixed from
    several sources (e.g. JBB then HarmBench) are a sample of all of them rather than of the first source."""
    return sorted(examples, key=lambda e: (stable_hash(seed, "order", e.id), e.id))
