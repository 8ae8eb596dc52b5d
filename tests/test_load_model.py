"""`k2lab.load_model` on checkpoints transformers writes: what the checkpoint holds, read as transformers reads it.

transformers builds a tiny random Kimi_K25ForConditionalGeneration from a config that leaves its own defaults in
place (no `vision_config.text_hidden_size`, tied head, default projector eps) and saves it with save_pretrained;
k2lab loads the directory and both compute logits from the same files.
"""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import k2lab
from k2lab.checkpoint import CheckpointError
from k2lab.model import K2ForCausalLM
from k2lab.model.multimodal import K2VLForConditionalGeneration
from k2lab.quant.checkpoint import quantize_experts_
from k2lab.quant.experts import Int4Experts
from tests.conftest import randomize_

transformers = pytest.importorskip("transformers")
from transformers import Kimi_K25Config, Kimi_K25ForConditionalGeneration  # noqa: E402

PAD = 277  # image_token_id: <|media_pad|> of a 512-token vocabulary
TEXT = dict(vocab_size=512, hidden_size=64, intermediate_size=160, moe_intermediate_size=32, num_hidden_layers=3,
            first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=48, kv_lora_rank=32,
            qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8, num_experts_per_tok=3,
            n_group=4, topk_group=2, max_position_embeddings=1024,
            rope_parameters=dict(rope_type="yarn", rope_theta=50000.0, factor=8.0, original_max_position_embeddings=128,
                                 beta_fast=32.0, beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0))
VISION = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, pos_emb_height=8,
              pos_emb_width=8)
K2LAB_PACKAGE = Path(k2lab.__file__).parent


@pytest.fixture(scope="module")
def hf_checkpoint(tmp_path_factory):
    """A checkpoint directory written by transformers, and transformers' own model loaded back from it."""
    path = tmp_path_factory.mktemp("hf_kimi_k25")
    config = Kimi_K25Config(text_config=TEXT, vision_config=VISION, projection_hidden_size=64, image_token_id=PAD)
    torch.manual_seed(0)
    model = Kimi_K25ForConditionalGeneration(config)
    randomize_(model, 0)
    model.save_pretrained(path)
    assert "text_hidden_size" not in json.loads((path / "config.json").read_text())["vision_config"]
    hf = Kimi_K25ForConditionalGeneration.from_pretrained(path, dtype=torch.float32)
    return path, hf.eval()


def image_prompt(grids, seed=0):
    """One row: text, then per image a run of h*w/4 placeholders between text; packed pixel_values and grid_thw."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 256, (4,), generator=g).tolist()
    for _, h, w in grids:
        ids += [PAD] * (h * w // 4) + torch.randint(0, 256, (3,), generator=g).tolist()
    n = sum(t * h * w for t, h, w in grids)
    return torch.tensor([ids]), torch.randn(n, 3, 14, 14, generator=g), torch.tensor(grids)


@torch.no_grad()
@pytest.mark.parametrize("grids", [[(1, 4, 6)], [(1, 8, 8), (2, 4, 4)]])
def test_multimodal_checkpoint_written_by_transformers(hf_checkpoint, grids):
    path, hf = hf_checkpoint
    model = k2lab.load_model(path)
    assert isinstance(model, K2VLForConditionalGeneration)
    lm = model.language_model
    assert lm.lm_head.weight is lm.model.embed_tokens.weight  # no lm_head stored: tied, as transformers ties it
    ids, pixel_values, grid_thw = image_prompt(grids)
    logits = model(ids, pixel_values=pixel_values, image_grid_thw=grid_thw)
    ref = hf(input_ids=ids, pixel_values=pixel_values, image_grid_thw=grid_thw).logits
    torch.testing.assert_close(logits, ref, atol=1e-4, rtol=0)
    assert not torch.allclose(model(ids, pixel_values=pixel_values + 1, image_grid_thw=grid_thw), ref, atol=1e-3)


@torch.no_grad()
def test_text_only_gives_the_language_model(hf_checkpoint):
    path, hf = hf_checkpoint
    model = k2lab.load_model(path, text_only=True)
    assert type(model) is K2ForCausalLM
    ids = torch.randint(0, 512, (2, 23), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(model(ids), hf(input_ids=ids).logits, atol=1e-4, rtol=0)


@torch.no_grad()
def test_int4_experts_and_vision_in_one_checkpoint(hf_checkpoint, tmp_path):
    path, _ = hf_checkpoint
    model = quantize_experts_(k2lab.load_model(path))
    k2lab.save_model(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["quantization_config"]["format"] == "pack-quantized" and config["vision_config"]
    loaded = k2lab.load_model(tmp_path)
    assert isinstance(loaded, K2VLForConditionalGeneration)
    assert isinstance(loaded.language_model.model.layers[1].mlp.experts, Int4Experts)
    ids, pixel_values, grid_thw = image_prompt([(1, 6, 4)], seed=2)
    assert torch.equal(loaded(ids, pixel_values, grid_thw), model(ids, pixel_values, grid_thw))
    text = k2lab.load_model(tmp_path, text_only=True)
    assert isinstance(text.model.layers[2].mlp.experts, Int4Experts)
    assert torch.equal(text(ids), model.language_model(ids))


def test_configs_are_read_as_transformers_reads_them(hf_checkpoint, tmp_path):
    path, _ = hf_checkpoint
    config = json.loads((path / "config.json").read_text())
    for f in path.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    # Moonshot's configs carry vision_config.text_hidden_size and projector_ln_eps; transformers reads neither
    config["vision_config"].update(text_hidden_size=7168, projector_ln_eps=0.5)
    (tmp_path / "config.json").write_text(json.dumps(config))
    model = k2lab.load_model(tmp_path)
    assert model.mm_projector.proj[2].out_features == 64 and model.mm_projector.pre_norm.eps == 1e-5
    for section, key, value, message in [("vision_config", "hidden_act", "gelu", "vision_config.hidden_act 'gelu'"),
                                         ("text_config", "hidden_act", "gelu", "hidden_act 'gelu'"),
                                         ("text_config", "rope_interleave", False, "rope_interleave false")]:
        bad = json.loads(json.dumps(config))
        bad[section][key] = value
        (tmp_path / "config.json").write_text(json.dumps(bad))
        with pytest.raises(CheckpointError, match=message):
            k2lab.load_model(tmp_path)


def _imports(file: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(file.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_only_the_checkpoint_package_opens_safetensors_and_it_does_not_import_quant():
    for file in K2LAB_PACKAGE.rglob("*.py"):
        imports = _imports(file)
        inside = file.parent.name == "checkpoint"
        assert inside or not any(i.split(".")[0] == "safetensors" for i in imports), file
        assert not inside or not any(i.startswith("k2lab.quant") for i in imports), file


def test_int4_codec_is_found_only_once_quant_registers_it(hf_checkpoint, tmp_path):
    """k2lab.checkpoint alone names the missing codec; k2lab.load_model imports k2lab.quant, which registers it."""
    model = quantize_experts_(k2lab.load_model(hf_checkpoint[0]))
    k2lab.save_model(model, tmp_path)
    script = ("import sys; from k2lab.checkpoint import load_model\n"
              f"try: load_model({str(tmp_path)!r})\n"
              "except ValueError as e: print(e)\n"
              "print('k2lab.quant' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert "no codec reads quantization_config quant_method 'compressed-tensors'" in out
    assert out.strip().endswith("False")
