"""Prompt sets, languages, modalities (typographic and real images) and batching with token types.

    examples = sources.jbb_behaviors() + sources.alpaca_eval()
    train, held_out = split_examples(examples, 0.2, seed=0)
    grid = build_conditions(train, languages=("en",), modalities=("text", "typographic"))
    for batch in make_batches(grid[Condition("en", "text")], tokenizer, 8): ...
"""

from precise_jax.data import benchmarks, sources
from precise_jax.data.batching import Batch, BatchEncoder, bucket_length, make_batches, positions_mask, token_lengths
from precise_jax.data.conditions import (
    ApertiumTranslator, Condition, build_conditions, load_translations, save_translations,
)
from precise_jax.data.examples import Example, load_examples, save_examples
from precise_jax.data.images import benign_photos
from precise_jax.data.splits import seeded_order, split_examples, stable_hash
from precise_jax.data.typography import (
    FIGSTEP, FIGSTEP_PROMPT, TypographyStyle, layout_typographic, render_typographic, typographic_image,
)

__all__ = [
    "ApertiumTranslator", "Batch", "Condition", "Example", "BatchEncoder", "FIGSTEP", "FIGSTEP_PROMPT",
    "TypographyStyle", "benign_photos", "benchmarks", "bucket_length", "build_conditions", "layout_typographic",
    "load_examples", "load_translations", "make_batches", "positions_mask", "render_typographic",
    "save_examples", "save_translations", "seeded_order", "sources", "split_examples", "stable_hash",
    "token_lengths", "typographic_image",
]
