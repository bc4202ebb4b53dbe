"""LLaVA-OneVision: LLaVA with a SigLIP tower, a Qwen2 decoder and "anyres" tiling (HF's
`LlavaOnevisionForConditionalGeneration`, images only).

The processor cuts each image into a base tile (the whole image resized) and a grid of tiles chosen among
`image_grid_pinpoints`; `pixel_values` [N, M, C, S, S] holds every image's tiles, zero-padded to the batch's most
tiles M. HF then packs each image's projected features (`pack_image_features`): the base tile's, then the grid's
laid out as one feature map, cropped to the image's aspect ratio (unpadding), bilinearly shrunk when larger than
`vision_aspect_ratio` allows, with the `image_newline` vector closing every row. Images of rows holding several
images (`batch_num_images`) are neither tiled nor unpadded: base features plus one newline.

That layout depends on `image_sizes` through float64 arithmetic, so the port computes it on the host with HF's
own formulas (`packing_plan`, through `jax.pure_callback` under jit) as gather indices and bilinear weights; the
tower runs on all N * M tiles (padding tiles included: their features are never gathered). Vision sites and
`projector.out` have batch N * M (tile m of image n at n * M + m). Shapes: G = P^2 features per tile (P = S /
patch), K feature slots (= B * T, the most image tokens a batch can hold).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import transformers
from numpy.typing import ArrayLike
from transformers.image_processing_utils import select_best_resolution

from ports.errors import InputError, UnsupportedArchitectureError
from ports.layers import Array
from ports.llava import Llava, LlavaConfig, composition_fields, weight_rules as llava_weight_rules
from ports.weights import Rule

MODEL_TYPES = ("llava_onevision",)


@dataclasses.dataclass(frozen=True)
class OnevisionConfig(LlavaConfig):
    """LLaVA's fields plus the anyres tiling."""

    grid_pinpoints: tuple[tuple[int, int], ...] = ()  # possible (height, width) resolutions of the tile grid
    max_tiles: int = 9  # `vision_aspect_ratio` 'anyres_max_{n}': a grid above ~n tiles of features is shrunk


def config_from_hf(hf: transformers.PretrainedConfig) -> OnevisionConfig:
    fields = composition_fields(hf)
    if fields["select_strategy"] != "full":
        raise UnsupportedArchitectureError(
            f"llava_onevision with vision_feature_select_strategy {fields['select_strategy']!r}: HF's "
            "pack_image_features rejects every tiled image then; only 'full' has working checkpoints"
        )
    aspect = hf.vision_aspect_ratio
    try:
        max_tiles = int(aspect.strip("anyres_max_"))  # noqa: B005  (HF parses it exactly so)
    except ValueError:
        raise UnsupportedArchitectureError(
            f"llava_onevision: vision_aspect_ratio {aspect!r} is not of the form 'anyres_max_<n>'") from None
    pinpoints = tuple((int(h), int(w)) for h, w in hf.image_grid_pinpoints)
    return OnevisionConfig(**fields, grid_pinpoints=pinpoints, max_tiles=max_tiles)


def weight_rules(config: OnevisionConfig) -> list[Rule]:
    return [*llava_weight_rules(config), Rule("image_newline", "image_newline"),
            Rule("model.image_newline", "image_newline")]


# ----------------------------------------------------------------------------------------------------- packing


def tiles_of(config: OnevisionConfig, image_size: ArrayLike) -> int:
    """Tiles the processor makes of an image of (height, width): the base tile plus the chosen grid's."""
    height, width = select_best_resolution([int(v) for v in image_size], [list(p) for p in config.grid_pinpoints])
    side = config.vision.image_size
    return math.ceil(height / side) * math.ceil(width / side) + 1


def _bilinear(size_in: int, size_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """torch's bilinear (align_corners=False) along one axis in float32: source indices i0, i1 and weights."""
    out = np.arange(size_out)
    if size_in == size_out:
        return out, out, np.ones(size_out, np.float32), np.zeros(size_out, np.float32)
    scale = np.float32(size_in) / np.float32(size_out)
    src = np.maximum(scale * (out.astype(np.float32) + np.float32(0.5)) - np.float32(0.5), np.float32(0))
    i0 = np.minimum(np.floor(src).astype(np.int64), size_in - 1)
    w1 = np.clip(src - i0.astype(np.float32), np.float32(0), np.float32(1)).astype(np.float32)
    i1 = i0 + (i0 < size_in - 1)
    return i0, i1, (np.float32(1) - w1).astype(np.float32), w1


def tiled_images(images: int, batch_num_images: ArrayLike | None) -> list[bool]:
    """Which images get anyres tiles: HF tiles only the images of single-image rows (all of them without counts)."""
    if batch_num_images is None:
        return [True] * images
    return [n == 1 for n in np.asarray(batch_num_images).reshape(-1).tolist() for _ in range(int(n))]


def packing_plan(config: OnevisionConfig, image_sizes: ArrayLike, batch_num_images: ArrayLike | None,
                 tiles: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """HF's pack_image_features as gathers: for every packed feature, in order, four rows of the flat projected
    tile features [N * tiles * G, D], their weights, and whether it is the newline -> (src [K, 4], weights [K, 4],
    newline [K]). Python floats, as HF's, decide every size."""
    grid, side = config.vision.grid, config.vision.image_size
    g = grid * grid
    sizes = [tuple(int(v) for v in size) for size in np.asarray(image_sizes).reshape(-1, 2)]
    src, weights, newline = [], [], []

    def emit(rows: np.ndarray, w: np.ndarray, is_newline: bool = False) -> None:
        src.append(rows.reshape(-1, 4))
        weights.append(w.reshape(-1, 4).astype(np.float32))
        newline.append(np.full(len(src[-1]), is_newline, np.float32))

    one_hot = np.array([1, 0, 0, 0], np.float32)
    for image, ((height, width), anyres) in enumerate(zip(sizes, tiled_images(len(sizes), batch_num_images))):
        first = image * tiles * g  # row of this image's base tile in the flat features
        base = first + np.arange(g)
        emit(np.stack([base] * 4, -1), np.tile(one_hot, (g, 1)))
        if not anyres:
            emit(np.zeros((1, 4), np.int64), np.zeros((1, 4)), is_newline=True)
            continue
        best_h, best_w = select_best_resolution([height, width], [list(p) for p in config.grid_pinpoints])
        tiles_h, tiles_w = best_h // side, best_w // side
        rows_n, cols_n = tiles_h * grid, tiles_w * grid  # the grid tiles' features as one map
        rows, cols = np.arange(rows_n), np.arange(cols_n)
        # unpad_image: crop the map back to the image's aspect ratio (HF's float arithmetic, symmetric crop).
        if width / height > cols_n / rows_n:
            padding = (rows_n - int(round(height * (cols_n / width), 7))) // 2
            rows = rows[padding: rows_n - padding]
        else:
            padding = (cols_n - int(round(width * (rows_n / height), 7))) // 2
            cols = cols[padding: cols_n - padding]
        # Shrink a map of more than ~max_tiles tiles of features (bilinear, torch's float32 weights).
        ratio = math.sqrt(len(rows) * len(cols) / (config.max_tiles * grid**2))
        if ratio > 1.1:
            y0, y1, wy0, wy1 = _bilinear(len(rows), int(len(rows) // ratio))
            x0, x1, wx0, wx1 = _bilinear(len(cols), int(len(cols) // ratio))
        else:
            y0, y1, wy0, wy1 = _bilinear(len(rows), len(rows))
            x0, x1, wx0, wx1 = _bilinear(len(cols), len(cols))

        # map position -> flat feature row (grid tiles follow the base tile, row-major)
        def flat(r: int, c: np.ndarray) -> np.ndarray:
            r, c = rows[r], cols[c]
            return first + (1 + (r // grid) * tiles_w + c // grid) * g + (r % grid) * grid + c % grid

        for y in range(len(y0)):
            emit(np.stack([flat(y0[y], x0), flat(y0[y], x1), flat(y1[y], x0), flat(y1[y], x1)], -1),
                 np.stack([wy0[y] * wx0, wy0[y] * wx1, wy1[y] * wx0, wy1[y] * wx1], -1))
            emit(np.zeros((1, 4), np.int64), np.zeros((1, 4)), is_newline=True)
    if not src:
        return np.zeros((0, 4), np.int32), np.zeros((0, 4), np.float32), np.zeros((0,), np.float32)
    return (np.concatenate(src).astype(np.int32), np.concatenate(weights), np.concatenate(newline))


class LlavaOnevision(Llava):
    """LLaVA-OneVision for conditional generation (images); call with the processor's batch keys
    (`pixel_values` [N, M, C, S, S], `image_sizes` [N, 2], optional `batch_num_images`)."""

    def setup(self) -> None:
        super().setup()
        width = self.spec.text.hidden_size
        self.image_newline = self.param("image_newline", nn.initializers.normal(width**-0.5), (width,), self.dtype)

    def image_values(self, order: Array, pixel_values: Array, image_sizes: Array | None,
                     batch_num_images: Array | None) -> Array:
        if pixel_values.ndim != 5 or image_sizes is None:
            raise InputError(
                f"LLaVA-OneVision takes pixel_values [images, tiles, channels, height, width] with image_sizes "
                f"[images, 2], as its processor returns them; got pixel_values of shape {pixel_values.shape} and "
                f"image_sizes {'missing' if image_sizes is None else 'given'}")
        n, m = pixel_values.shape[:2]
        features = self.project(pixel_values.reshape(n * m, *pixel_values.shape[2:]))  # [N * M, G, D]
        flat = features.reshape(-1, features.shape[-1])
        slots = order.size
        counts = () if batch_num_images is None else (jnp.asarray(batch_num_images),)

        def fit(a: np.ndarray) -> np.ndarray:  # exactly `slots` rows (check_batch refuses other counts)
            out = np.zeros((slots, *a.shape[1:]), a.dtype)
            out[:min(slots, len(a))] = a[:slots]
            return out

        def plan(sizes: np.ndarray, *counts: np.ndarray) -> tuple[np.ndarray, ...]:
            return tuple(fit(a) for a in packing_plan(self.spec, sizes, counts[0] if counts else None, m))

        shapes = (jax.ShapeDtypeStruct((slots, 4), jnp.int32), jax.ShapeDtypeStruct((slots, 4), jnp.float32),
                  jax.ShapeDtypeStruct((slots,), jnp.float32))
        src, weights, newline = jax.pure_callback(plan, shapes, jnp.asarray(image_sizes), *counts)
        k = jnp.clip(order, 0, slots - 1)
        src, weights, newline = src[k], weights[k], newline[k]  # [B, T, 4], [B, T, 4], [B, T]
        values = newline[..., None] * self.image_newline.astype(jnp.float32)
        for j in range(4):  # one gather at a time keeps memory at [B, T, D]
            values = values + weights[..., j, None] * flat[src[..., j]].astype(jnp.float32)
        return values

    @nn.nowrap
    def image_feature_count(self, batch: Mapping) -> int:
        pixels, sizes = np.shape(batch["pixel_values"]), batch.get("image_sizes")
        if len(pixels) != 5 or sizes is None or np.shape(sizes) != (pixels[0], 2):
            raise InputError(
                f"LLaVA-OneVision takes pixel_values [images, tiles, channels, height, width] and image_sizes "
                f"[images, 2] as its processor returns them; got pixel_values {pixels} and image_sizes "
                f"{None if sizes is None else np.shape(sizes)}")
        counts = batch.get("batch_num_images")
        if counts is not None and int(np.sum(counts)) != pixels[0]:
            raise InputError(f"batch_num_images {np.asarray(counts).tolist()} adds up to {int(np.sum(counts))} "
                             f"images but pixel_values holds {pixels[0]}")
        for i, (size, tiled) in enumerate(zip(np.asarray(sizes), tiled_images(pixels[0], counts))):
            if tiled and tiles_of(self.spec, size) > pixels[1]:
                raise InputError(f"image {i} of size {tuple(size)} needs {tiles_of(self.spec, size)} tiles but "
                                 f"pixel_values holds {pixels[1]} per image; pass the processor's output unchanged")
        return len(packing_plan(self.spec, sizes, counts, pixels[1])[0])


def build(config: OnevisionConfig, dtype: Any = jnp.float32) -> LlavaOnevision:
    return LlavaOnevision(config.text, dtype, spec=config)


def example_batch(config: OnevisionConfig) -> dict:
    """One image of the tower's size (two tiles) and exactly its image tokens (shape tracing only)."""
    v = config.vision
    sizes = np.array([[v.image_size, v.image_size]], np.int64)
    tokens = len(packing_plan(config, sizes, None, tiles_of(config, sizes[0]))[0])
    return {
        "input_ids": np.full((1, tokens), config.image_token_id, np.int32),
        "pixel_values": np.zeros((1, tiles_of(config, sizes[0]), v.num_channels, v.image_size, v.image_size),
                                 np.float32),
        "image_sizes": sizes,
    }


class LlavaOnevisionProcessor(transformers.LlavaOnevisionProcessor):
    """transformers' LlavaOnevisionProcessor for images only: its video processor needs torchvision, which a
    torch-free install lacks. Same name, so saved folders still name transformers' class; all else is transformers'."""

    def __init__(self, image_processor=None, tokenizer=None, num_image_tokens=None,
                 vision_feature_select_strategy=None, chat_template=None, image_token="<image>",
                 video_token="<video>", vision_aspect_ratio="anyres_max_9", **kwargs):
        # The attributes transformers loads, saves and checks come from this signature: no video_processor.
        super().__init__(image_processor, tokenizer, None, num_image_tokens, vision_feature_select_strategy,
                         chat_template, image_token, video_token, vision_aspect_ratio, **kwargs)


def load_processor(folder: Path) -> LlavaOnevisionProcessor | None:
    """The folder's processor (images only), or None when it has no tokenizer."""
    if not ((folder / "tokenizer.json").exists() or (folder / "tokenizer_config.json").exists()):
        return None
    return LlavaOnevisionProcessor.from_pretrained(folder)
