"""Images in chat requests: a tiny random K2.6 (MoonViT + MoE) checkpoint served, OpenAI `image_url` data URLs in,
the same tokens out as the multimodal model's own generate; bad images are a 400, never a 500."""

import base64
import io

import openai
import pytest
import torch
from PIL import Image

from k2lab.checkpoint import save_model
from k2lab.data.images import ImageBudget, prepare_chat_media
from k2lab.model.multimodal import K2VLForConditionalGeneration, multimodal_config
from k2lab.model.vision import VisionConfig
from k2lab.serve.server import build_server, serve_in_thread
from tests.conftest import random_model, tiny_config


def data_url(width: int, height: int, seed: int) -> str:
    g = torch.Generator().manual_seed(seed)
    pixels = (torch.rand(height, width, 3, generator=g) * 255).to(torch.uint8).numpy()
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def vl_checkpoint(tmp_path_factory, tok):
    text = tiny_config(vocab_size=tok.vocab_size, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
                       pad_token_id=tok.pad_id, max_position_embeddings=1024)
    config = multimodal_config(text, VisionConfig.preset("tiny"))
    assert config.wrapper["media_placeholder_token_id"] == tok.special_tokens["<|media_pad|>"]
    torch.manual_seed(0)
    model = K2VLForConditionalGeneration(config)
    model.language_model = random_model(config)
    path = tmp_path_factory.mktemp("k2vl")
    save_model(model.eval(), path)
    tok.save(path)
    return model, path


def test_chat_with_images_matches_the_models_own_generate(vl_checkpoint):
    model, path = vl_checkpoint
    server = build_server(path, max_len=512, cache_mb=16, max_slots=4, model_name="k2vl")
    messages = [{"role": "user", "content": [
        {"type": "text", "text": "Compare"}, {"type": "image_url", "image_url": {"url": data_url(56, 84, 1)}},
        {"type": "text", "text": "with"}, {"type": "image_url", "image_url": {"url": data_url(112, 56, 2)}}]}]
    no_thinking = {"thinking": False}  # the answer comes back as content (a random model never closes <think>)
    ids, pixels, grid = prepare_chat_media(messages, server.chat_ids(messages, None, no_thinking), model.media_pad_id,
                                           ImageBudget.for_vision(VisionConfig.preset("tiny")))
    expected = model.generate(torch.tensor([ids]), pixels, grid, max_new_tokens=12)[0, len(ids):].tolist()
    with serve_in_thread(server) as base:
        client = openai.OpenAI(base_url=base, api_key="none")
        resp = client.chat.completions.create(model="k2vl", messages=messages, max_tokens=12, temperature=0,
                                              extra_body={"chat_template_kwargs": no_thinking})
        assert resp.usage.prompt_tokens == len(ids)  # each image's placeholder expanded to its patch count
        stops = (server.tokenizer.eos_id, server.tokenizer.im_end_id)
        cut = next((i for i, t in enumerate(expected) if t in stops), len(expected))
        assert resp.usage.completion_tokens == min(cut + 1, len(expected))
        assert resp.choices[0].message.content == server.tokenizer.decode(expected[:cut])
        with pytest.raises(openai.BadRequestError, match="image"):
            client.chat.completions.create(model="k2vl", max_tokens=4, messages=[{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}])


def test_text_only_model_refuses_images(tmp_path, tok):
    import k2lab

    config = tiny_config(vocab_size=tok.vocab_size, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
                         pad_token_id=tok.pad_id)
    k2lab.save_model(random_model(config), tmp_path)
    tok.save(tmp_path)
    server = build_server(tmp_path, max_len=256, cache_mb=8, max_slots=2, model_name="text")
    with serve_in_thread(server) as base:
        client = openai.OpenAI(base_url=base, api_key="none")
        with pytest.raises(openai.BadRequestError, match="text-only"):
            client.chat.completions.create(model="text", max_tokens=4, messages=[{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": data_url(28, 28, 0)}}]}])
