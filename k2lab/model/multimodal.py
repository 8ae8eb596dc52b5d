"""K2.5/K2.6 multimodal model: MoonViT features replace the `<|media_pad|>` placeholders of the prompt.

Module names follow the released checkpoint (`language_model.*`, `vision_tower.*`, `mm_projector.*`). Images and
video chunks go in one packed batch: `pixel_values` [N, 3, p, p] and `image_grid_thw` [n, 3] (t > 1 for a video
chunk); image i fills the i-th run of `h_i*w_i/4` placeholders, counted over the batch in row-major order.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from k2lab.config import ModelConfig
from k2lab.model.transformer import K2ForCausalLM
from k2lab.model.vision import MediaInputError, MoonViT, Projector, VisionConfig, init_vision_weights

MEDIA_PAD_OFFSET = 21  # <|media_pad|> 163605 = [BOS] 163584 + 21; small vocabs keep the offset


def multimodal_config(text: ModelConfig, vision: VisionConfig) -> ModelConfig:
    """A kimi_k25 wrapper config for `text` + `vision`, with the keys Moonshot's code and transformers read."""
    vision = dataclasses.replace(vision, text_hidden_size=text.hidden_size)
    config = text.as_wrapper(vision.to_dict())
    pad = text.bos_token_id + MEDIA_PAD_OFFSET
    config.wrapper.update(media_placeholder_token_id=pad, image_token_id=pad,
                          projection_hidden_size=vision.hidden_size,
                          projection_layer_norm_eps=vision.projector_ln_eps)
    return config


def has_vision(config: ModelConfig) -> bool:
    return bool((config.wrapper or {}).get("vision_config"))


def vision_config_of(config: ModelConfig) -> VisionConfig:
    """The vision tower's config, read as transformers' Kimi_K25Config reads it: the projector maps to the text
    model's hidden_size and its LayerNorm eps is the wrapper's `projection_layer_norm_eps` (default 1e-5), whatever
    `vision_config` says about either (Moonshot's `text_hidden_size` / `projector_ln_eps` are not read)."""
    if not has_vision(config):
        raise ValueError("the multimodal model needs a kimi_k25 wrapper config with a vision_config "
                         "(see multimodal_config)")
    raw, wrapper = config.wrapper["vision_config"], config.wrapper
    act = raw.get("hidden_act", "gelu_pytorch_tanh")
    if act != "gelu_pytorch_tanh":
        raise ValueError(f"vision_config.hidden_act {act!r}: MoonViT computes with 'gelu_pytorch_tanh' only")
    vision = dataclasses.replace(VisionConfig.from_dict(raw), text_hidden_size=config.hidden_size,
                                 projector_ln_eps=wrapper.get("projection_layer_norm_eps", 1e-5))
    width = wrapper.get("projection_hidden_size", vision.hidden_size)
    if width != vision.hidden_size:
        raise ValueError(f"projection_hidden_size {width} != vision_config.hidden_size {vision.hidden_size} (the "
                         "projector normalizes the vision tower's output)")
    return vision


class K2VLForConditionalGeneration(nn.Module):
    """Kimi K2.5/K2.6: `language_model` (K2ForCausalLM), `vision_tower` (MoonViT), `mm_projector`."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        vision = vision_config_of(config)
        self.config = config
        # transformers reads image_token_id, Moonshot's code media_placeholder_token_id; both name <|media_pad|>
        self.media_pad_id = config.wrapper.get("image_token_id",
                                               config.wrapper.get("media_placeholder_token_id", 163605))
        self.language_model = K2ForCausalLM(config)
        self.vision_tower = MoonViT(vision)
        self.mm_projector = Projector(vision)
        init_vision_weights(self.vision_tower)
        init_vision_weights(self.mm_projector)

    def image_features(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> torch.Tensor:
        """[M, hidden]: one row per merged patch, images in order."""
        return self.mm_projector(self.vision_tower(pixel_values, image_grid_thw))

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
              image_grid_thw: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings with the placeholder positions replaced by image features."""
        embeds = self.language_model.embed(input_ids)
        mask = input_ids == self.media_pad_id
        n_slots = int(mask.sum())
        if pixel_values is None:
            if n_slots:
                raise MediaInputError(f"prompt has {n_slots} media placeholders but no images were given")
            return embeds
        if image_grid_thw is None:
            raise MediaInputError("pixel_values given without image_grid_thw")
        features = self.image_features(pixel_values, image_grid_thw)
        if n_slots != features.shape[0]:
            raise MediaInputError(f"prompt has {n_slots} media placeholders but the images give {features.shape[0]} "
                                  f"features (grid_thw {image_grid_thw.tolist()}; each image needs h*w/4)")
        return embeds.masked_scatter(mask[..., None], features.to(embeds.dtype))

    def forward(self, input_ids: torch.Tensor | None = None, pixel_values: torch.Tensor | None = None,
                image_grid_thw: torch.Tensor | None = None, *, inputs_embeds: torch.Tensor | None = None,
                **lm_kwargs) -> torch.Tensor:
        """Logits [B, T, vocab]; lm_kwargs (positions, cache, rows) go to the language model unchanged.
        inputs_embeds (from `embed`) skip the embedding, so a prefill with images and a decode step use the
        same call as the text model's (the engine's model interface)."""
        if inputs_embeds is None:
            if input_ids is None:
                raise ValueError("pass input_ids or inputs_embeds")
            inputs_embeds = self.embed(input_ids, pixel_values, image_grid_thw)
        return self.language_model(inputs_embeds=inputs_embeds, **lm_kwargs)

    @property
    def device(self) -> torch.device:
        return self.language_model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.language_model.dtype

    def new_cache(self, slots: int, max_len: int, dtype: torch.dtype | None = None):
        return self.language_model.new_cache(slots, max_len, dtype)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                 image_grid_thw: torch.Tensor | None = None, max_new_tokens: int = 32, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int | None = None, eos_token_id: int | None = None) -> torch.Tensor:
        """Prompt [B, T] plus new tokens: the prompt (with images) is prefilled once, then decoding reads the
        latent cache, exactly as the text model's generate."""
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        embeds = self.embed(input_ids, pixel_values, image_grid_thw)
        return self.language_model.generate(input_ids, max_new_tokens, temperature, top_p, seed, eos_token_id,
                                            inputs_embeds=embeds)
