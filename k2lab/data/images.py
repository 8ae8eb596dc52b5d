"""Images for MoonViT: read OpenAI `image_url` parts, resize within a patch budget, normalize, cut into patches.

The resize rule is the Kimi-K2.5 processor's: scale down (never up) so the image has at most `max_patches` patches
and at most `max_side_patches` per side, then pad right/bottom with black to a multiple of patch_size x merge.
Pixels are scaled to [0, 1] and normalized with mean 0.5, std 0.5. Output layout is the model's input:
`pixel_values` [N, 3, p, p] (each image's patches in raster order), `grid_thw` [n, 3].

Every bad input raises `MediaInputError` (a ValueError) naming the image and what is wrong; a server answers 400.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import io
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from k2lab.model.vision import MediaInputError, VisionConfig


@dataclass(frozen=True)
class ImageBudget:
    patch_size: int = 14
    merge: int = 2  # merge kernel side: padded sizes are multiples of patch_size * merge
    max_patches: int = 16384  # per image, after resizing
    max_video_patches: int = 4096  # per video frame (transformers' Kimi-K2.5 video processor default)
    max_side_patches: int = 512
    max_pixels: int = 64 * 1024 * 1024  # per image as sent; larger images are refused before decoding
    max_request_patches: int = 65536  # all images of one request together
    frames_per_chunk: int = 4  # video: frames per grid_thw entry (MoonViT's pos_emb_time)

    @classmethod
    def for_vision(cls, cfg: VisionConfig, **overrides) -> "ImageBudget":
        return cls(patch_size=cfg.patch_size, merge=cfg.merge_kernel_size[0], frames_per_chunk=cfg.pos_emb_time,
                   **overrides)


def resize_target(height: int, width: int, budget: ImageBudget) -> tuple[tuple[int, int], tuple[int, int]]:
    """((resized h, w), (padded h, w)) for an image of height x width pixels."""
    p = budget.patch_size
    current = max(1, height // p) * max(1, width // p)
    scale = min(1.0, math.sqrt(budget.max_patches / current),
                budget.max_side_patches * p / height, budget.max_side_patches * p / width)
    new_h = min(max(1, int(height * scale)), budget.max_side_patches * p)
    new_w = min(max(1, int(width * scale)), budget.max_side_patches * p)
    factor = p * budget.merge
    return (new_h, new_w), (-(-new_h // factor) * factor, -(-new_w // factor) * factor)


def read_image(url: str, local_root: Path | None = None) -> Image.Image:
    """An `image_url` url: a `data:image/...;base64,` URL, or a local path (plain or file://) under `local_root`.

    Network URLs are refused (nothing is fetched). Local paths are refused unless `local_root` is given, and must
    resolve inside it, so a server never reads files its operator did not expose.
    """
    if url.startswith("data:"):
        header, sep, payload = url.partition(",")
        if not sep or not header.endswith(";base64"):
            raise MediaInputError("image data URL must look like data:image/<type>;base64,<data>")
        try:
            raw = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as e:
            raise MediaInputError(f"image data URL has invalid base64: {e}") from None
        source = io.BytesIO(raw)
    elif url.startswith(("http://", "https://")):
        raise MediaInputError(f"remote image URLs are not fetched: {url[:80]}; send a data URL instead")
    else:
        if local_root is None:
            raise MediaInputError("local image paths are not accepted here; send a data URL")
        path = Path(url.removeprefix("file://")).expanduser()
        root = Path(local_root).resolve()
        path = (root / path).resolve() if not path.is_absolute() else path.resolve()
        if not path.is_relative_to(root):
            raise MediaInputError(f"image path {url} is outside the allowed directory {root}")
        if not path.is_file():
            raise MediaInputError(f"image file not found: {url}")
        source = path
    try:
        image = Image.open(source)
    except Image.DecompressionBombError as e:
        raise MediaInputError(f"image is over the pixel budget: {e}") from None
    except (UnidentifiedImageError, OSError) as e:
        raise MediaInputError(f"cannot read image {url[:80]!r}: {e}") from None
    return image


def image_urls(messages: list[dict]) -> list[str]:
    """The urls of all `image_url` content parts, in prompt order (the order their placeholders appear)."""
    urls = []
    for m in messages:
        content = m.get("content")
        for part in content if isinstance(content, list) else []:
            if isinstance(part, dict) and part.get("type") == "image_url":
                image_url = part.get("image_url")
                url = image_url.get("url") if isinstance(image_url, dict) else image_url
                if not isinstance(url, str) or not url:
                    raise MediaInputError("image_url content part has no url")
                urls.append(url)
    return urls


def to_patches(image: Image.Image, budget: ImageBudget, index: int = 0) -> tuple[torch.Tensor, tuple[int, int]]:
    """One decoded image -> normalized patches [gh*gw, 3, p, p] and its grid (gh, gw)."""
    width, height = image.size
    if width * height > budget.max_pixels:
        raise MediaInputError(f"image {index} is {width}x{height} = {width * height} pixels, over the budget of "
                              f"{budget.max_pixels}")
    try:
        image = image.convert("RGB")  # decodes the file
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise MediaInputError(f"cannot decode image {index}: {e}") from None
    (h, w), (ph, pw) = resize_target(height, width, budget)
    if (h, w) != (height, width):
        image = image.resize((w, h), Image.Resampling.BICUBIC)
    pixels = torch.zeros(3, ph, pw)  # padding is black before normalization
    pixels[:, :h, :w] = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    pixels = (pixels - 0.5) / 0.5
    p = budget.patch_size
    gh, gw = ph // p, pw // p
    patches = pixels.view(3, gh, p, gw, p).permute(1, 3, 0, 2, 4).reshape(gh * gw, 3, p, p)
    return patches, (gh, gw)


def preprocess_images(images: list[Image.Image], budget: ImageBudget) -> tuple[torch.Tensor, torch.Tensor]:
    """Images -> (pixel_values [N, 3, p, p], grid_thw [n, 3]) for one request, within the request budget."""
    pixel_values, grid = [], []
    for i, image in enumerate(images):
        patches, (gh, gw) = to_patches(image, budget, index=i)
        pixel_values.append(patches)
        grid.append((1, gh, gw))
    total = sum(h * w for _, h, w in grid)
    if total > budget.max_request_patches:
        raise MediaInputError(f"{len(images)} images need {total} patches, over the request budget of "
                              f"{budget.max_request_patches}")
    if not images:
        return torch.zeros(0, 3, budget.patch_size, budget.patch_size), torch.zeros(0, 3, dtype=torch.long)
    return torch.cat(pixel_values), torch.tensor(grid, dtype=torch.long)


def preprocess_video(frames: list[Image.Image], budget: ImageBudget) -> tuple[torch.Tensor, torch.Tensor]:
    """Sampled video frames -> chunks of up to `frames_per_chunk` frames, one grid_thw row (t, h, w) per chunk."""
    frame_budget = dataclasses.replace(budget, max_patches=budget.max_video_patches)
    pixel_values, grid = [], []
    for start in range(0, len(frames), budget.frames_per_chunk):
        chunk = [to_patches(f, frame_budget, index=start + k)
                 for k, f in enumerate(frames[start:start + budget.frames_per_chunk])]
        if len({g for _, g in chunk}) != 1:
            raise MediaInputError(f"video frames {start}..{start + len(chunk) - 1} differ in size")
        pixel_values += [p for p, _ in chunk]
        grid.append((len(chunk), *chunk[0][1]))
    total = sum(t * h * w for t, h, w in grid)
    if total > budget.max_request_patches:
        raise MediaInputError(f"{len(frames)} video frames need {total} patches, over the request budget of "
                              f"{budget.max_request_patches}")
    return torch.cat(pixel_values), torch.tensor(grid, dtype=torch.long)


def images_from_messages(messages: list[dict], budget: ImageBudget,
                         local_root: Path | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """All images of an OpenAI-style chat request -> (pixel_values, grid_thw), in prompt order."""
    return preprocess_images([read_image(u, local_root) for u in image_urls(messages)], budget)


def media_token_counts(grid_thw: torch.Tensor, merge_size: int) -> list[int]:
    """<|media_pad|> tokens per image or video chunk: its merged patch count (frames are averaged)."""
    return [h * w // merge_size for _, h, w in grid_thw.tolist()]


def expand_media_placeholders(ids: list[int], counts: list[int], pad_id: int) -> list[int]:
    """Repeat the i-th `<|media_pad|>` of a rendered prompt counts[i] times (one placeholder per image in)."""
    n_pads = sum(t == pad_id for t in ids)
    if n_pads != len(counts):
        raise MediaInputError(f"prompt has {n_pads} media placeholders but {len(counts)} images were given")
    out, k = [], 0
    for t in ids:
        if t == pad_id:
            out += [pad_id] * counts[k]
            k += 1
        else:
            out.append(t)
    return out


def prepare_chat_media(messages: list[dict], rendered_ids: list[int], pad_id: int, budget: ImageBudget,
                       local_root: Path | None = None) -> tuple[list[int], torch.Tensor | None, torch.Tensor | None]:
    """The server's one call: a chat request and its rendered prompt (one `<|media_pad|>` per image part) ->
    (expanded input ids, pixel_values, image_grid_thw); (ids, None, None) when the request has no images."""
    pixel_values, grid_thw = images_from_messages(messages, budget, local_root)
    ids = expand_media_placeholders(rendered_ids, media_token_counts(grid_thw, budget.merge ** 2), pad_id)
    if grid_thw.shape[0] == 0:
        return ids, None, None
    return ids, pixel_values, grid_thw
