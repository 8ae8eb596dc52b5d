"""The multimodal K2 model against transformers' Kimi_K25ForConditionalGeneration, on a checkpoint k2lab writes.

k2lab saves a tiny random model in the released layout (`language_model.*`, `vision_tower.*`, `mm_projector.*`);
transformers opens the directory with its own loader. Logits and greedy generations are compared.
"""

import base64
import io

import pytest
import torch
from PIL import Image

from k2lab.checkpoint import CheckpointError, load_model, load_multimodal, read_index, save_model
from k2lab.data.images import ImageBudget, expand_media_placeholders, images_from_messages, media_token_counts
from k2lab.model import K2ForCausalLM
from k2lab.model.multimodal import K2VLForConditionalGeneration, multimodal_config
from k2lab.model.vision import MediaInputError, VisionConfig
from tests.conftest import randomize_, tiny_config

transformers = pytest.importorskip("transformers")
from transformers import Kimi_K25ForConditionalGeneration  # noqa: E402

# The lead's parity config: YaRN with a short original context, group-limited routing (n_group 4, topk_group 2).
CONFIG = multimodal_config(tiny_config(), VisionConfig.preset("tiny"))
PAD = CONFIG.wrapper["media_placeholder_token_id"]
BEGIN, CONTENT, END = PAD - 3, PAD - 2, PAD - 1  # <|media_begin|>, <|media_content|>, <|media_end|>
IMAGE_WORD = 88  # stands for the token(s) of the text "image"
TEXT_IDS = CONFIG.bos_token_id  # ordinary tokens are the ids below [BOS]



@pytest.fixture(scope="module")
def models(tmp_path_factory):
    torch.manual_seed(0)
    model = K2VLForConditionalGeneration(CONFIG)
    randomize_(model, 0)
    path = save_model(model.eval(), tmp_path_factory.mktemp("k2vl"))
    hf, info = Kimi_K25ForConditionalGeneration.from_pretrained(path, output_loading_info=True, dtype=torch.float32)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return model, hf.eval(), path


def prompt_batch(grids_per_row: list[list[tuple[int, int, int]]], seed=0):
    """Rows of text with one `<|media_begin|>image<|media_content|> pads <|media_end|>` run per image, filled to a
    common length, plus the packed pixel_values / grid_thw of all images in row order."""
    g = torch.Generator().manual_seed(seed)
    rows, grid = [], []
    for row_grids in grids_per_row:
        ids = torch.randint(0, TEXT_IDS, (5,), generator=g).tolist()
        for t, h, w in row_grids:
            ids += [BEGIN, IMAGE_WORD, CONTENT, PAD, END] + torch.randint(0, TEXT_IDS, (3,), generator=g).tolist()
            grid.append((t, h, w))
        rows.append(ids)
    counts = media_token_counts(torch.tensor(grid), 4)
    expanded, k = [], 0
    for ids, row_grids in zip(rows, grids_per_row):
        expanded.append(expand_media_placeholders(ids, counts[k:k + len(row_grids)], PAD))
        k += len(row_grids)
    length = max(map(len, expanded))
    input_ids = torch.tensor([ids + torch.randint(0, TEXT_IDS, (length - len(ids),), generator=g).tolist()
                              for ids in expanded])
    n = sum(t * h * w for t, h, w in grid)
    pixel_values = torch.randn(n, 3, 14, 14, generator=g)
    return input_ids, pixel_values, torch.tensor(grid)


@pytest.mark.parametrize("grids", [
    [[(1, 8, 8)], [(1, 6, 12)]],           # a batch of two prompts with images of different sizes
    [[(4, 4, 6), (1, 2, 4)], [(3, 6, 4)]],  # video chunks (4 and 3 frames) next to an image
])
@torch.no_grad()
def test_logits_match_transformers(models, grids):
    model, hf, _ = models
    input_ids, pixel_values, grid_thw = prompt_batch(grids)
    logits = model(input_ids, pixel_values, grid_thw)
    ref = hf(input_ids=input_ids, pixel_values=pixel_values, image_grid_thw=grid_thw).logits
    assert logits.shape == ref.shape == (*input_ids.shape, CONFIG.vocab_size)
    assert (input_ids == PAD).sum() == sum(h * w // 4 for _, h, w in grid_thw.tolist())
    torch.testing.assert_close(logits, ref, atol=1e-4, rtol=0)
    # the images matter: other pixels give other logits at and after the placeholders
    assert not torch.allclose(model(input_ids, pixel_values + 1, grid_thw), logits, atol=1e-3)


@torch.no_grad()
def test_greedy_generation_with_images_matches_transformers(models):
    model, hf, _ = models
    input_ids, pixel_values, grid_thw = prompt_batch([[(1, 6, 8)], [(1, 4, 4)]], seed=1)
    ours = model.generate(input_ids, pixel_values, grid_thw, max_new_tokens=6)
    ref = hf.generate(input_ids=input_ids, pixel_values=pixel_values, image_grid_thw=grid_thw, max_new_tokens=6,
                      do_sample=False, min_new_tokens=6)
    assert torch.equal(ours, ref)
    # the cached decode agrees with recomputing the whole sequence at every step
    seq = input_ids
    for _ in range(6):
        nxt = model(seq, pixel_values, grid_thw)[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], dim=1)
    assert torch.equal(ours, seq)


@torch.no_grad()
def test_chat_image_url_to_generation(models):
    """An OpenAI-style message with a data-URL image, preprocessed, expanded and generated from, as a server does."""
    model, hf, _ = models
    image = Image.radial_gradient("L").resize((90, 50)).convert("RGB")
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    messages = [{"role": "user", "content": [{"type": "text", "text": "what is this?"},
                                             {"type": "image_url", "image_url": {"url": url}}]}]
    pixel_values, grid_thw = images_from_messages(messages, ImageBudget.for_vision(VisionConfig.preset("tiny")))
    assert grid_thw.tolist() == [[1, 4, 8]]  # 50 x 90 px padded to 56 x 112
    # the K2.5 template renders each image as <|media_begin|>image<|media_content|><|media_pad|><|media_end|>
    rendered = [CONFIG.bos_token_id, 17, 29, BEGIN, IMAGE_WORD, CONTENT, PAD, END, 41]
    input_ids = torch.tensor([expand_media_placeholders(rendered, media_token_counts(grid_thw, 4), PAD)])
    assert input_ids.shape[1] == len(rendered) - 1 + 8
    ours = model.generate(input_ids, pixel_values, grid_thw, max_new_tokens=4)
    ref = hf.generate(input_ids=input_ids, pixel_values=pixel_values, image_grid_thw=grid_thw, max_new_tokens=4,
                      do_sample=False, min_new_tokens=4)
    assert torch.equal(ours, ref)


@torch.no_grad()
def test_save_load_round_trip(models):
    model, _, path = models
    loaded = load_model(path)  # a vision_config in config.json: the multimodal model
    assert isinstance(loaded, K2VLForConditionalGeneration)
    expected = model.state_dict()
    assert loaded.state_dict().keys() == expected.keys()
    for name, t in loaded.state_dict().items():
        assert torch.equal(t, expected[name]), name
    input_ids, pixel_values, grid_thw = prompt_batch([[(1, 4, 6)]], seed=2)
    assert torch.equal(loaded(input_ids, pixel_values, grid_thw), model(input_ids, pixel_values, grid_thw))


@torch.no_grad()
def test_text_only_skips_vision_and_bad_checkpoints_are_named(models, tmp_path):
    model, _, path = models
    text = load_model(path, text_only=True)  # the language model alone; the vision tensors are not read
    assert isinstance(text, K2ForCausalLM)
    ids = torch.arange(10)[None]
    assert torch.equal(text(ids), model.language_model(ids))
    from safetensors.torch import load_file, save_file
    broken = save_model(model, tmp_path / "broken")
    name = "vision_tower.encoder.blocks.1.wqkv.weight"
    shard = broken / read_index(broken).files[name]
    tensors = load_file(shard)
    tensors.pop(name)
    save_file(tensors, str(shard))
    with pytest.raises(CheckpointError, match="does not contain .*blocks.1.wqkv.weight"):
        load_model(broken)
    assert torch.equal(load_model(broken, text_only=True)(ids), text(ids))
    save_model(K2ForCausalLM(tiny_config()), tmp_path / "text")
    with pytest.raises(CheckpointError, match="no vision_config"):
        load_multimodal(tmp_path / "text")


@torch.no_grad()
def test_placeholder_count_mismatch_is_a_media_error(models):
    model, _, _ = models
    input_ids, pixel_values, grid_thw = prompt_batch([[(1, 4, 4)]], seed=3)
    with pytest.raises(MediaInputError, match="4 media placeholders but the images give 6 features"):
        model(input_ids, torch.randn(24, 3, 14, 14), torch.tensor([(1, 4, 6)]))
    with pytest.raises(MediaInputError, match="4 media placeholders but no images"):
        model(input_ids)
    with pytest.raises(MediaInputError, match="pixel_values has shape"):
        model(input_ids, pixel_values[:-1], grid_thw)


def test_gradients_reach_the_vision_tower():
    """Training through the image path (e.g. SFT on image chats): the loss moves MoonViT and the projector."""
    model = K2VLForConditionalGeneration(CONFIG).train()
    input_ids, pixel_values, grid_thw = prompt_batch([[(1, 4, 4)]], seed=4)
    logits = model(input_ids, pixel_values, grid_thw)
    torch.nn.functional.cross_entropy(logits[0, :-1], input_ids[0, 1:]).backward()
    for name in ("vision_tower.patch_embed.pos_emb.weight", "vision_tower.encoder.blocks.0.wqkv.weight",
                 "mm_projector.proj.2.weight", "language_model.model.layers.0.self_attn.q_a_proj.weight"):
        grad = model.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name


@torch.no_grad()
def test_bf16_load_runs_close_to_fp32(models):
    """Released weights are bf16: loading with dtype=bfloat16 keeps the image path working (RoPE, merge in fp32)."""
    model, _, path = models
    bf16 = load_model(path, dtype=torch.bfloat16)
    assert bf16.vision_tower.encoder.blocks[0].wqkv.weight.dtype == torch.bfloat16
    input_ids, pixel_values, grid_thw = prompt_batch([[(2, 4, 6)]], seed=5)
    ref = model(input_ids, pixel_values, grid_thw)
    out = bf16(input_ids, pixel_values, grid_thw).float()
    assert torch.isfinite(out).all()
    assert (out - ref).abs().max() < 0.05 * ref.abs().max()  # measured 0.015
