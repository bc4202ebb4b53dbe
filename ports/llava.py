"""LLaVA (1.5): a CLIP vision tower, a two-layer GELU projector and a Llama decoder (HF's
`LlavaForConditionalGeneration`). The projected features of each image replace the embeddings of its image tokens,
in order, as HF's `masked_scatter` does; rows without images and batches without pixels are plain text.

The port is the decoder's `CausalLM` plus two submodules, `vision` (sites `vision.layers.{i}.…`, batch = images)
and `projector` (site `projector.out` [images, features, d_model]). Shapes: B rows, T tokens, N images, C channels,
S image side, F features per image, D the decoder's width.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ports import clip, llama, qwen2, qwen3, siglip
from ports.clip import VisionConfig, VisionOutput
from ports.errors import InputError, UnsupportedArchitectureError
from ports.layers import Array, CausalLM, CausalLMOutput, DecoderConfig, Dtype, KVCache, Site, activation
from ports.weights import Rule, mirrored, with_prefix

if TYPE_CHECKING:
    from transformers import PretrainedConfig

MODEL_TYPES = ("llava",)

# Language models a composition may hold: their config translation (the weight table is Llama's for all).
_TEXT = {t: m.config_from_hf for m in (llama, qwen2, qwen3) for t in m.MODEL_TYPES}
# Vision towers: module and weight table (config translation is shared, see clip.config_from_hf).
_TOWERS = {
    **{t: (clip.ClipVisionTower, clip.weight_rules) for t in clip.MODEL_TYPES},
    **{t: (siglip.SiglipVisionTower, siglip.weight_rules) for t in siglip.MODEL_TYPES},
}


@dataclasses.dataclass(frozen=True)
class LlavaConfig:
    """The composition: decoder, tower, and how image features are chosen and placed."""

    text: DecoderConfig
    vision: VisionConfig
    image_token_id: int
    feature_layers: tuple[int, ...]  # vision hidden states to concatenate (HF's `vision_feature_layer`)
    select_strategy: str  # "default" drops each image's first token (CLIP's class token), "full" keeps all
    projector_act: str = "gelu"
    projector_bias: bool = True

    @property
    def features_per_image(self) -> int:
        """Tokens the tower gives per image after selection: patches, plus the class token (CLIP), less 'default'."""
        tokens = self.vision.grid**2 + (self.vision.model_type in clip.MODEL_TYPES)
        return tokens - (self.select_strategy == "default")


def composition_fields(hf: PretrainedConfig) -> dict[str, Any]:
    """The LlavaConfig fields of a transformers LLaVA-style config (LLaVA, LLaVA-OneVision)."""
    text_type, vision_type = hf.text_config.model_type, hf.vision_config.model_type
    if text_type not in _TEXT:
        raise UnsupportedArchitectureError(
            f"{hf.model_type}: language model {text_type!r} has no port; supported: {', '.join(sorted(_TEXT))}")
    if vision_type not in _TOWERS:
        raise UnsupportedArchitectureError(
            f"{hf.model_type}: vision tower {vision_type!r} has no port; supported: {', '.join(sorted(_TOWERS))}")
    if hf.vision_feature_select_strategy not in ("default", "full"):
        raise UnsupportedArchitectureError(
            f"{hf.model_type}: vision_feature_select_strategy {hf.vision_feature_select_strategy!r} is neither "
            "'default' nor 'full'")
    text = _TEXT[text_type](hf.text_config)
    # transformers reads tie_word_embeddings from the composite config (it forwards the text config's when set).
    text = dataclasses.replace(text, tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)))
    layers = hf.vision_feature_layer
    return dict(
        text=text,
        vision=clip.config_from_hf(hf.vision_config),
        image_token_id=int(hf.image_token_id),
        feature_layers=(int(layers),) if isinstance(layers, int) else tuple(int(i) for i in layers),
        select_strategy=hf.vision_feature_select_strategy,
        projector_act=hf.projector_hidden_act,
        projector_bias=bool(getattr(hf, "multimodal_projector_bias", True)),
    )


def config_from_hf(hf: PretrainedConfig) -> LlavaConfig:
    return LlavaConfig(**composition_fields(hf))


# ----------------------------------------------------------------------------------------------------- weights


def weight_rules(config: LlavaConfig) -> list[Rule]:
    """The layout of the llava-hf checkpoints first (export writes it; transformers 4.x and 5.x load it), then the
    other layouts transformers has written: 5.x `save_pretrained` (`vision_tower.*` without `vision_model`) and
    4.52+ (`model.language_model.*`, `model.vision_tower.*`, `lm_head.weight`)."""
    text = llama.weight_rules(config.text)  # `model.layers.…`, `lm_head.weight`
    modern_text = [Rule("model.language_model." + r.hf.removeprefix("model."), r.port, r.transform)
                   if r.hf.startswith("model.") else r for r in text]
    tower_rules = _TOWERS[config.vision.model_type][1]
    projector = lambda prefix: mirrored(prefix, "projector", linears=("linear_1", "linear_2"))  # noqa: E731
    return [
        *with_prefix(text, "language_model", ""),
        *tower_rules("vision_tower.vision_model", "vision"),
        *projector("multi_modal_projector"),
        *tower_rules("vision_tower", "vision"),
        *modern_text,
        *tower_rules("model.vision_tower.vision_model", "vision"),
        *tower_rules("model.vision_tower", "vision"),
        *projector("model.multi_modal_projector"),
    ]


# ----------------------------------------------------------------------------------------------------- modules


class Projector(nn.Module):
    """HF's `multi_modal_projector`: linear_2(act(linear_1(x))); site `out`, image features in the LM's width."""

    width: int
    act: str = "gelu"
    bias: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:  # [N, F, W * len(feature_layers)] -> [N, F, D]
        dense = lambda name: nn.Dense(  # noqa: E731
            self.width, use_bias=self.bias, dtype=self.dtype, param_dtype=self.dtype, name=name
        )
        return Site(name="out")(dense("linear_2")(activation(self.act)(dense("linear_1")(x))))


def select_features(config: LlavaConfig, out: VisionOutput) -> Array:
    """HF's vision-feature selection: hidden states of `feature_layers`, concatenated, less the first token for
    'default'. hidden_states[0] is the input of the first layer, so -1 is the last layer's output (pre-norm)."""
    features = jnp.concatenate([out.hidden_states[i] for i in config.feature_layers], axis=-1)
    return features[:, 1:] if config.select_strategy == "default" else features


def _concrete(*arrays) -> bool:
    return not any(isinstance(a, jax.core.Tracer) for a in arrays)


class Llava(CausalLM):
    """LLaVA for conditional generation; `config` is the decoder's (as in CausalLM), `spec` the composition's.

    Call with Hugging Face batch keys (`input_ids`, `attention_mask`, optional `pixel_values` [N, C, S, S], ...);
    returns `CausalLMOutput`. Decoding steps pass no pixels: the cache already holds the image tokens."""

    spec: LlavaConfig | None = None

    def setup(self) -> None:
        super().setup()
        s = self.spec
        self.vision = _TOWERS[s.vision.model_type][0](s.vision, self.dtype)
        self.projector = Projector(s.text.hidden_size, s.projector_act, s.projector_bias, self.dtype)

    def __call__(
        self,
        input_ids: Array | None = None,  # [B, T]
        attention_mask: Array | None = None,  # [B, T]
        position_ids: Array | None = None,  # [B, T]
        *,
        pixel_values: Array | None = None,
        image_sizes: Array | None = None,  # [N, 2] (height, width): LLaVA-OneVision's anyres tiling
        batch_num_images: Array | None = None,  # [rows with images]: LLaVA-OneVision's multi-image rows
        inputs_embeds: Array | None = None,
        cache: KVCache | None = None,
        logits_to_keep: int = 0,
        token_types: Array | None = None,  # carried by every batch; the port does not need it
        mm_token_type_ids: Array | None = None,  # HF processors may emit it; image tokens are found by id instead
        num_layers: int | None = None,  # run only the first LM layers and return no logits (capture needs no more)
    ) -> CausalLMOutput:
        del mm_token_type_ids
        if input_ids is not None and inputs_embeds is not None:
            raise InputError("pass input_ids or inputs_embeds, not both")
        if pixel_values is not None:
            if input_ids is None:
                raise InputError("pixel_values need input_ids (image tokens mark where the features go); "
                                 "pass input_ids instead of inputs_embeds")
            if _concrete(input_ids, pixel_values, image_sizes, batch_num_images):
                self.check_batch(dict(input_ids=input_ids, pixel_values=pixel_values, image_sizes=image_sizes,
                                      batch_num_images=batch_num_images))
        if input_ids is not None:
            input_ids = jnp.asarray(input_ids)
            mask = jnp.ones(input_ids.shape, jnp.int32) if attention_mask is None else jnp.asarray(attention_mask)
            positions = jnp.zeros(input_ids.shape, jnp.int32)  # unused: no layer runs
            # The decoder stopped before its first layer returns the token embeddings.
            inputs_embeds, _ = self.lm(input_ids, mask, positions, num_layers=0)
            if pixel_values is not None:
                is_image = input_ids == self.spec.image_token_id  # [B, T]
                # The k-th image token of the batch (row-major) takes the k-th feature, as HF's masked_scatter.
                order = (jnp.cumsum(is_image.reshape(-1)) - 1).reshape(is_image.shape)
                values = self.image_values(order, jnp.asarray(pixel_values), image_sizes, batch_num_images)
                inputs_embeds = jnp.where(is_image[..., None], values.astype(inputs_embeds.dtype), inputs_embeds)
        return super().__call__(None, attention_mask, position_ids, inputs_embeds=inputs_embeds, cache=cache,
                                logits_to_keep=logits_to_keep, token_types=token_types, num_layers=num_layers)

    def project(self, pixel_values: Array) -> Array:
        """[N, C, S, S] -> projected features [N, F, D] (tower, feature selection, projector)."""
        return self.projector(select_features(self.spec, self.vision(pixel_values)))

    def image_values(self, order: Array, pixel_values: Array, image_sizes: Array | None,
                     batch_num_images: Array | None) -> Array:
        """Feature `order[b, t]` for every position [B, T, D] (meaningful at image tokens only)."""
        if image_sizes is not None or batch_num_images is not None:
            raise InputError("LLaVA takes pixel_values only (image_sizes and batch_num_images belong to "
                             "LLaVA-OneVision batches); pass the batch its own processor built")
        features = self.project(pixel_values)
        flat = features.reshape(-1, features.shape[-1])  # [N * F, D]
        return flat[jnp.clip(order, 0, flat.shape[0] - 1)]

    @nn.nowrap
    def image_feature_count(self, batch: Mapping) -> int:
        """How many image features the batch's pixels give (host side; the image tokens must be as many)."""
        pixels = np.shape(batch["pixel_values"])
        if len(pixels) != 4:
            raise InputError(f"pixel_values of shape {pixels}: LLaVA takes [images, channels, height, width], "
                             "as its processor returns them")
        return pixels[0] * self.spec.features_per_image

    @nn.nowrap
    def check_batch(self, batch: Mapping) -> None:
        """Raise InputError unless the batch's image tokens match its images' features (run on the host)."""
        if batch.get("pixel_values") is None:
            return
        features = self.image_feature_count(batch)
        tokens = int(np.sum(np.asarray(batch["input_ids"]) == self.spec.image_token_id))
        if tokens != features:
            raise InputError(
                f"the batch has {tokens} image tokens but its {np.shape(batch['pixel_values'])[0]} image(s) give "
                f"{features} image features; build batches with the model's processor "
                "(ports.processing.image_chat_batch) so that every image gets exactly its tokens"
            )


def build(config: LlavaConfig, dtype: Any = jnp.float32) -> Llava:
    return Llava(config.text, dtype, spec=config)


def example_batch(config: LlavaConfig) -> dict:
    """One image and exactly its image tokens (shape tracing only)."""
    v = config.vision
    return {
        "input_ids": np.full((1, config.features_per_image), config.image_token_id, np.int32),
        "pixel_values": np.zeros((1, v.num_channels, v.image_size, v.image_size), np.float32),
    }
