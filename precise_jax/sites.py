"""Canonical activation-site names and how they map to module paths in the ports.

`lm.layers.3.mlp.act` <-> ('lm', 'layers_3', 'mlp', 'act'): numbered layers are `layers_{i}` modules and the
attention module is `self_attn` (Hugging Face's name); everything else is the same word in both.
"""

from __future__ import annotations

import re
from typing import Callable, Iterable

from ports.errors import InputError
from ports.layers import Site

KINDS = ("mlp.act", "mlp.out", "attn.out", "resid")
_LAYER = re.compile(r"layers_(\d+)")


def site_name(path: Iterable[str]) -> str:
    """Module path -> canonical site name."""
    words: list[str] = []
    for part in path:
        m = _LAYER.fullmatch(part)
        words += ["layers", m.group(1)] if m else ["attn" if part == "self_attn" else part]
    return ".".join(words)


def site_path(name: str) -> tuple[str, ...]:
    """Canonical site name -> module path."""
    words, path = name.split("."), []
    i = 0
    while i < len(words):
        if words[i] == "layers" and i + 1 < len(words) and words[i + 1].isdigit():
            path.append(f"layers_{words[i + 1]}")
            i += 2
            continue
        path.append("self_attn" if words[i] == "attn" else words[i])
        i += 1
    return tuple(path)


def layer_sites(prefix: str, num_layers: int, kinds: Iterable[str] = KINDS) -> list[str]:
    """Every site of every layer of a stack, e.g. layer_sites('lm', 30, ['mlp.act'])."""
    return [f"{prefix}.layers.{i}.{kind}" for i in range(num_layers) for kind in kinds]


def site_filter(names: Iterable[str]) -> Callable[[object, str], bool]:
    """A `capture_intermediates` filter that keeps exactly the named sites."""
    wanted = {site_path(n) for n in names}
    return lambda module, method: method == "__call__" and isinstance(module, Site) and module.path in wanted


def check_sites(names: Iterable[str], available: Iterable[str]) -> None:
    missing = sorted(set(names) - set(available))
    if missing:
        raise InputError(
            f"unknown sites {missing[:5]}{' ...' if len(missing) > 5 else ''}; this model has sites like "
            f"{sorted(available)[:4]} (see precise_jax.sites.layer_sites)"
        )
