"""Image preprocessing: the Kimi-K2.5 resize rule, patch layout, image_url parsing and the 400-style errors."""

import base64
import io
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from k2lab.data.images import (ImageBudget, expand_media_placeholders, image_urls, images_from_messages,
                               media_token_counts, prepare_chat_media, preprocess_images, preprocess_video,
                               read_image, resize_target, to_patches)
from k2lab.model.vision import MediaInputError

BUDGET = ImageBudget()


def transformers_navit_resize():
    """transformers' resize rule, taken from its source: the processor module itself needs torchvision."""
    import ast
    import inspect
    import math

    import transformers

    path = Path(inspect.getfile(transformers)).parent / "models/kimi_k25/image_processing_kimi_k25.py"
    tree = ast.parse(path.read_text())
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "navit_resize")
    scope = {"math": math}
    exec(compile(ast.Module([fn], []), str(path), "exec"), scope)
    return scope["navit_resize"]


navit_resize = transformers_navit_resize()


def data_url(image: Image.Image, fmt="PNG") -> str:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode()


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 20000), st.integers(1, 20000), st.sampled_from([(16384, 512), (4096, 512), (256, 24)]))
def test_resize_rule_matches_transformers(h, w, limits):
    budget = ImageBudget(max_patches=limits[0], max_side_patches=limits[1])
    assert resize_target(h, w, budget) == navit_resize(h, w, 14, 2, limits[0], limits[1])
    (rh, rw), (ph, pw) = resize_target(h, w, budget)
    assert ph % 28 == 0 and pw % 28 == 0 and rh <= ph < rh + 28 and rw <= pw < rw + 28


def test_patches_are_raster_order_normalized_and_padded():
    # 3 x 2 blocks of 14 px, block (r, c) has red = 40*r + 10*c; 42x28 pads to 56x28.
    image = Image.new("RGB", (28, 42))
    for r in range(3):
        for c in range(2):
            image.paste((40 * r + 10 * c, 255, 0), (14 * c, 14 * r, 14 * c + 14, 14 * r + 14))
    patches, grid = to_patches(image, BUDGET)
    assert grid == (4, 2) and patches.shape == (8, 3, 14, 14)
    for k in range(6):
        r, c = divmod(k, 2)
        torch.testing.assert_close(patches[k, 0], torch.full((14, 14), (40 * r + 10 * c) / 255 * 2 - 1))
        torch.testing.assert_close(patches[k, 1], torch.ones(14, 14))
    assert torch.all(patches[6:] == -1)  # black padding after normalization


def test_large_image_is_scaled_into_the_budget():
    budget = ImageBudget(max_patches=256)
    pixel_values, grid_thw = preprocess_images([Image.new("RGB", (1000, 500)), Image.new("RGB", (30, 30))], budget)
    (t0, h0, w0), (t1, h1, w1) = grid_thw.tolist()
    assert t0 == t1 == 1 and h0 * w0 <= 256 + 2 * (h0 + w0) and w0 >= 2 * h0 - 2  # aspect kept, within budget
    assert (h1, w1) == (4, 4)  # 30 px is not upscaled, only padded to 56
    assert pixel_values.shape == (h0 * w0 + h1 * w1, 3, 14, 14)
    assert media_token_counts(grid_thw, 4) == [h0 * w0 // 4, 4]


def test_video_frames_are_chunked_by_four():
    frames = [Image.new("RGB", (56, 28), (i * 20, 0, 0)) for i in range(6)]
    pixel_values, grid_thw = preprocess_video(frames, BUDGET)
    assert grid_thw.tolist() == [[4, 2, 4], [2, 2, 4]]
    assert pixel_values.shape == (6 * 8, 3, 14, 14)
    with pytest.raises(MediaInputError, match="differ in size"):
        preprocess_video(frames[:2] + [Image.new("RGB", (28, 28))], BUDGET)
    _, grid_thw = preprocess_video([Image.new("RGB", (2000, 1000))] * 2, BUDGET)  # frames get the video budget
    (_, (ph, pw)) = resize_target(1000, 2000, ImageBudget(max_patches=4096))
    assert grid_thw.tolist() == [[2, ph // 14, pw // 14]] and ph * pw // 196 < 5000
    with pytest.raises(MediaInputError, match="over the request budget of 40"):
        preprocess_video(frames, ImageBudget(max_request_patches=40))


def test_image_url_parts_data_urls_and_local_paths(tmp_path):
    red = Image.new("RGB", (20, 30), (255, 0, 0))
    red.save(tmp_path / "red.png")
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [
            {"type": "text", "text": "compare"},
            {"type": "image_url", "image_url": {"url": data_url(Image.new("RGB", (60, 40), (0, 0, 255)))}},
            {"type": "image_url", "image_url": {"url": str(tmp_path / "red.png")}},
        ]},
        {"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "file://" + str(tmp_path / "red.png")}}]},
    ]
    assert len(image_urls(messages)) == 3
    pixel_values, grid_thw = images_from_messages(messages, BUDGET, local_root=tmp_path)
    assert grid_thw.tolist() == [[1, 4, 6], [1, 4, 2], [1, 4, 2]]  # heights 40, 30 pad to 56
    assert pixel_values[0, 2, 0, 0] == 1.0 and pixel_values[24, 0, 0, 0] == 1.0  # blue, then red


@pytest.mark.parametrize("url, why", [
    ("https://example.com/cat.png", "not fetched"),
    ("data:image/png;base64,@@@@", "invalid base64"),
    ("data:image/png," + "x", "data:image/<type>;base64"),
    ("data:image/png;base64," + base64.b64encode(b"this is not an image").decode(), "cannot read image"),
])
def test_bad_urls_raise_media_error(url, why):
    with pytest.raises(MediaInputError, match=why):
        read_image(url)


def test_local_paths_need_an_allowed_root(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    with pytest.raises(MediaInputError, match="not accepted"):
        read_image(str(tmp_path / "a.png"))
    with pytest.raises(MediaInputError, match="outside the allowed directory"):
        read_image(str(tmp_path / "a.png"), local_root=tmp_path / "sub")
    with pytest.raises(MediaInputError, match="not found"):
        read_image(str(tmp_path / "b.png"), local_root=tmp_path)
    assert read_image("a.png", local_root=tmp_path).size == (8, 8)


def test_truncated_image_is_unreadable():
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (9, 9, 9)).save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()[:60]).decode()
    with pytest.raises(MediaInputError, match="cannot decode image 0"):
        preprocess_images([read_image(url)], BUDGET)


def test_images_beyond_the_pixel_budget_are_refused():
    with pytest.raises(MediaInputError, match="over the budget of 10000"):
        preprocess_images([Image.new("RGB", (200, 60))], ImageBudget(max_pixels=10_000))
    with pytest.raises(MediaInputError, match="over the request budget of 100"):
        preprocess_images([Image.new("RGB", (112, 112))] * 7, ImageBudget(max_request_patches=100))
    assert issubclass(MediaInputError, ValueError)


def test_placeholder_expansion_and_count_mismatch():
    pad = 7
    ids = [1, 5, pad, 6, 2, 5, pad, 6]
    assert expand_media_placeholders(ids, [3, 1], pad) == [1, 5, pad, pad, pad, 6, 2, 5, pad, 6]
    with pytest.raises(MediaInputError, match="2 media placeholders but 1 images"):
        expand_media_placeholders(ids, [3], pad)


def test_prepare_chat_media_for_a_server():
    pad = 9
    url = data_url(Image.new("RGB", (60, 30)))
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                             {"type": "text", "text": "and this?"},
                                             {"type": "image_url", "image_url": {"url": url}}]}]
    ids, pixel_values, grid_thw = prepare_chat_media(messages, [1, pad, 2, pad, 3], pad, BUDGET)
    assert grid_thw.tolist() == [[1, 4, 6]] * 2 and pixel_values.shape[0] == 48
    assert ids == [1] + [pad] * 6 + [2] + [pad] * 6 + [3]
    assert prepare_chat_media([{"role": "user", "content": "hi"}], [1, 2], pad, BUDGET) == ([1, 2], None, None)
    with pytest.raises(MediaInputError, match="1 media placeholders but 2 images"):
        prepare_chat_media(messages, [1, pad, 2], pad, BUDGET)
