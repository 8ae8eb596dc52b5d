"""Parity with transformers (the reference implementation): logits, checkpoints both ways, greedy generation."""

import json

import pytest
import torch

import k2lab
from k2lab.checkpoint import CheckpointError
from k2lab.model import parameter_counts
from tests.conftest import random_model, tiny_config

transformers = pytest.importorskip("transformers")

PROMPT_LENGTHS = [1, 7, 64, 300]  # 300 > original_max_position_embeddings: YaRN's interpolated band is used


def _hf_model(path):
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = random_model(tiny_config())
    path = tmp_path_factory.mktemp("k2lab_ckpt")
    k2lab.save_model(model, path, max_shard_size="200KB")  # several shards
    return model, path


@pytest.mark.parametrize("length", PROMPT_LENGTHS)
def test_k2lab_checkpoint_loads_in_transformers(saved, length):
    model, path = saved
    hf = _hf_model(path)
    assert isinstance(hf, transformers.DeepseekV3ForCausalLM)
    ids = torch.randint(0, model.config.vocab_size, (2, length), generator=torch.Generator().manual_seed(length))
    with torch.no_grad():
        diff = (model(ids) - hf(ids).logits).abs().max().item()
    assert diff <= 1e-4


def test_sharded_index_layout(saved):
    _, path = saved
    index = json.loads((path / "model.safetensors.index.json").read_text())
    files = set(index["weight_map"].values())
    assert len(files) > 1 and all(f.startswith("model-") and f.endswith(".safetensors") for f in files)
    names = index["weight_map"]
    assert "model.layers.1.mlp.experts.7.down_proj.weight" in names
    assert "model.layers.1.mlp.gate.e_score_correction_bias" in names
    assert "model.layers.0.mlp.gate_proj.weight" in names and "lm_head.weight" in names


def test_transformers_checkpoint_loads_in_k2lab(tmp_path):
    config = tiny_config()
    hf_config = transformers.DeepseekV3Config(**{k: v for k, v in config.to_dict().items()
                                                 if k not in ("architectures", "model_type", "torch_dtype")})
    torch.manual_seed(1)
    hf = transformers.DeepseekV3ForCausalLM(hf_config).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.normal_(0, 0.08) if p.dim() >= 2 else p.uniform_(0.5, 1.5)
        for name, b in hf.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.normal_(0, 0.05)
    hf.save_pretrained(tmp_path)
    model = k2lab.load_model(tmp_path)
    for length in PROMPT_LENGTHS:
        ids = torch.randint(0, config.vocab_size, (2, length))
        with torch.no_grad():
            assert (model(ids) - hf(ids).logits).abs().max().item() <= 1e-4


def test_greedy_generation_matches_transformers(saved):
    model, path = saved
    hf = _hf_model(path)
    prompt = torch.randint(0, model.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(3))
    ours = model.generate(prompt, max_new_tokens=64)
    theirs = hf.generate(prompt, max_new_tokens=64, min_new_tokens=64, do_sample=False,
                         attention_mask=torch.ones_like(prompt), pad_token_id=model.config.pad_token_id)
    assert torch.equal(ours, theirs)


def test_kimi_k25_wrapper_text_only(tmp_path):
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, patch_size=14,
                  pos_emb_height=8, pos_emb_width=8, pos_emb_time=2, merge_kernel_size=[2, 2])
    config = tiny_config().as_wrapper(vision_config=vision)
    model = random_model(config)
    k2lab.save_model(model, tmp_path)
    stored = json.loads((tmp_path / "config.json").read_text())
    assert stored["model_type"] == "kimi_k25" and stored["text_config"]["model_type"] == "kimi_k2"
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert all(k.startswith("language_model.") for k in index["weight_map"])
    hf = transformers.Kimi_K25ForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = torch.randint(0, 256, (2, 40))
    with torch.no_grad():
        assert (model(ids) - hf(input_ids=ids).logits).abs().max().item() <= 1e-4
    with pytest.raises(CheckpointError, match="no vision_tower .* text_only=True"):
        k2lab.load_model(tmp_path)  # a vision_config but only the text model stored
    reloaded = k2lab.load_model(tmp_path, text_only=True)
    assert reloaded.config.wrapper is not None
    with torch.no_grad():
        assert torch.equal(reloaded(ids), model(ids))


def test_tied_embeddings_both_ways(tmp_path):
    """tie_word_embeddings (off in K2; `k2lab pretrain --tie-embeddings` for the copying experiments): one
    matrix, stored once under the embedding's name as transformers stores it, loading tied in transformers and
    back in k2lab."""
    config = tiny_config(tie_word_embeddings=True)
    model = random_model(config)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    untied = parameter_counts(random_model(tiny_config()))["total"]
    assert parameter_counts(model)["total"] == untied - config.vocab_size * config.hidden_size  # counted once
    k2lab.save_model(model, tmp_path / "ours")
    names = json.loads((tmp_path / "ours" / "model.safetensors.index.json").read_text())["weight_map"]
    assert "model.embed_tokens.weight" in names and "lm_head.weight" not in names
    hf = _hf_model(tmp_path / "ours")
    assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    back = k2lab.load_model(tmp_path / "ours")
    assert back.lm_head.weight is back.model.embed_tokens.weight
    hf.save_pretrained(tmp_path / "theirs")
    again = k2lab.load_model(tmp_path / "theirs")
    assert again.lm_head.weight is again.model.embed_tokens.weight
    ids = torch.randint(0, config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = hf(ids).logits
        for m in (model, back, again):
            assert (m(ids) - ref).abs().max().item() <= 1e-4
