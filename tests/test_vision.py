"""MoonViT encoder + projector against transformers' Kimi-K2.5 vision tower, with weights in the released layout.

The released-layout tensors are written to a checkpoint directory that transformers opens with its own loader
(`from_pretrained`, which applies the kimi_k25 conversion: wqkv unfuse and RoPE permutation); k2lab loads the same
tensors by name. Both then see identical pixel inputs.
"""

import dataclasses
import json

import pytest
import torch
from safetensors.torch import save_file

from k2lab.config import ModelConfig
from k2lab.model.vision import (MediaInputError, MoonViT, Projector, VisionConfig, vision_param_counts)
from tests.conftest import randomize_

transformers = pytest.importorskip("transformers")
from transformers import Kimi_K25ForConditionalGeneration  # noqa: E402

TINY = VisionConfig.preset("tiny")
TEXT = ModelConfig.preset("tiny")



def hf_text_tensors(hf_model) -> dict[str, torch.Tensor]:
    """The language model of a transformers Kimi_K25 model in the released names (`language_model.model.*`)."""
    out = {}
    for name, t in hf_model.state_dict().items():
        if name == "lm_head.weight":
            out["language_model.lm_head.weight"] = t
        elif name.startswith("model.language_model."):
            rel = "language_model.model." + name[len("model.language_model."):]
            if rel.endswith("mlp.experts.gate_up_proj"):  # [E, 2I, D] -> per-expert gate, up
                for e, w in enumerate(t):
                    gate, up = w.chunk(2, dim=0)
                    out[rel.replace("gate_up_proj", f"{e}.gate_proj.weight")] = gate
                    out[rel.replace("gate_up_proj", f"{e}.up_proj.weight")] = up
            elif rel.endswith("mlp.experts.down_proj"):
                for e, w in enumerate(t):
                    out[rel.replace("down_proj", f"{e}.down_proj.weight")] = w
            else:
                out[rel] = t
    return out


def hf_config_dict(vision: VisionConfig) -> dict:
    cfg = TEXT.as_wrapper(vision.to_dict()).to_dict()
    placeholder = TEXT.bos_token_id + 21  # <|media_pad|> at K2's offset from [BOS]
    cfg.update(media_placeholder_token_id=placeholder, image_token_id=placeholder,
               projection_hidden_size=vision.hidden_size, projection_layer_norm_eps=vision.projector_ln_eps)
    return cfg


def released_pair(vision: VisionConfig, path):
    """k2lab's tower + projector with random weights, and transformers' model opened from the same tensors."""
    torch.manual_seed(0)
    vt, proj = MoonViT(vision), Projector(vision)
    randomize_(vt, 1)
    randomize_(proj, 2)
    released = {f"vision_tower.{k}": v for k, v in vt.state_dict().items()}
    released |= {f"mm_projector.{k}": v for k, v in proj.state_dict().items()}
    cfg = hf_config_dict(vision)
    from transformers import Kimi_K25Config
    released |= hf_text_tensors(Kimi_K25ForConditionalGeneration(Kimi_K25Config(**cfg)))
    save_file({k: v.contiguous() for k, v in released.items()}, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(cfg))
    hf, info = Kimi_K25ForConditionalGeneration.from_pretrained(path, output_loading_info=True, dtype=torch.float32)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return vt.eval(), proj.eval(), hf.eval()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return released_pair(TINY, tmp_path_factory.mktemp("released"))


def patches(grid, seed=0):
    n = sum(t * h * w for t, h, w in grid)
    return torch.randn(n, 3, TINY.patch_size, TINY.patch_size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("grid", [
    [(1, 8, 8), (1, 6, 12)],     # two images of different sizes; 8x8 is the pos grid itself, 6x12 interpolated
    [(1, 12, 16), (1, 2, 4)],    # upsampled pos grid and a tiny image
    [(4, 6, 8), (3, 4, 4)],      # video chunks: time embedding, joint attention over frames, temporal mean
    [(1, 10, 6), (2, 4, 6)],     # an image and a video chunk in one packed batch
])
@torch.no_grad()
def test_image_features_match_transformers(models, grid):
    vt, proj, hf = models
    pixel_values, grid_thw = patches(grid), torch.tensor(grid)
    merged = vt(pixel_values, grid_thw)
    ref_merged = hf.model.vision_tower(pixel_values, grid_thw=grid_thw).pooler_output
    assert merged.shape == ref_merged.shape == (sum(h * w // 4 for _, h, w in grid), 4, TINY.hidden_size)
    torch.testing.assert_close(merged, ref_merged, atol=1e-4, rtol=0)
    features = proj(merged)
    ref = torch.cat(hf.model.get_image_features(pixel_values, grid_thw).pooler_output)
    assert features.shape == (merged.shape[0], TEXT.hidden_size)
    torch.testing.assert_close(features, ref, atol=1e-4, rtol=0)


@torch.no_grad()
def test_full_width_layer_matches_transformers(tmp_path):
    """MoonViT's real width (1152, 16 heads of 72, MLP 4304, 64x64 position grid), one layer to stay fast."""
    full = dataclasses.replace(VisionConfig.preset("moonvit"), num_hidden_layers=1, text_hidden_size=TEXT.hidden_size)
    vt, proj, hf = released_pair(full, tmp_path)
    grid = [(1, 8, 12), (3, 4, 4)]
    pixel_values, grid_thw = patches(grid, seed=7), torch.tensor(grid)
    features = proj(vt(pixel_values, grid_thw))
    ref = torch.cat(hf.model.get_image_features(pixel_values, grid_thw).pooler_output)
    torch.testing.assert_close(features, ref, atol=1e-4, rtol=0)


@torch.no_grad()
def test_packed_batch_equals_one_image_at_a_time(models):
    vt, _, _ = models
    grid = [(1, 6, 12), (2, 4, 4), (1, 8, 2)]
    pixel_values = patches(grid, seed=3)
    packed = vt(pixel_values, torch.tensor(grid))
    singles, start = [], 0
    for t, h, w in grid:
        singles.append(vt(pixel_values[start:start + t * h * w], torch.tensor([(t, h, w)])))
        start += t * h * w
    torch.testing.assert_close(packed, torch.cat(singles), atol=1e-5, rtol=0)


def test_param_counts_match_transformers():
    from transformers import Kimi_K25Config
    from transformers.models.kimi_k25.modeling_kimi_k25 import Kimi_K25MultimodalProjection, Kimi_K25VisionModel

    counts = vision_param_counts("kimi-k2.6")
    hf_cfg = Kimi_K25Config(text_config={"model_type": "deepseek_v3", "hidden_size": 7168})
    with torch.device("meta"):
        hf_vt = Kimi_K25VisionModel(hf_cfg.vision_config)
        hf_proj = Kimi_K25MultimodalProjection(hf_cfg)
    assert counts["vision_encoder"] == sum(p.numel() for p in hf_vt.parameters()) == 416_866_032
    assert counts["projector"] == sum(p.numel() for p in hf_proj.parameters()) == 54_277_888
    assert vision_param_counts("kimi-k2") == {}
    # from a checkpoint's config.json (released vt_* spelling) as `info --checkpoint` reads it
    released = ModelConfig.preset("kimi-k2.6").as_wrapper({"vt_hidden_size": 1152, "vt_num_hidden_layers": 27})
    assert vision_param_counts(ModelConfig.from_dict(released.to_dict())) == counts
    assert vision_param_counts(ModelConfig.preset("kimi-k2.6")) == {}  # the bare text config has no vision


def test_config_reads_released_and_transformers_spellings():
    released = {"vt_hidden_size": 64, "vt_intermediate_size": 128, "vt_num_hidden_layers": 2,
                "vt_num_attention_heads": 4, "init_pos_emb_height": 8, "init_pos_emb_width": 8,
                "init_pos_emb_time": 4, "patch_size": 14, "merge_kernel_size": [2, 2], "text_hidden_size": 256,
                "projector_ln_eps": 1e-5, "mm_projector_type": "patchmerger"}
    assert VisionConfig.from_dict(released) == TINY
    assert VisionConfig.from_dict(TINY.to_dict()) == TINY
    with pytest.raises(ValueError, match="unknown vision preset"):
        VisionConfig.preset("huge")


@pytest.mark.parametrize("grid, n, why", [
    ([(1, 5, 4)], 20, "multiples of 2x2"),
    ([(5, 4, 4)], 80, "1 <= t <= 4"),
    ([(1, 4, 4)], 15, "expected"),
])
def test_bad_grid_or_pixels_raise_media_error(models, grid, n, why):
    vt, _, _ = models
    with pytest.raises(MediaInputError, match=why):
        vt(torch.zeros(n, 3, 14, 14), torch.tensor(grid))
