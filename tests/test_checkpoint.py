"""Bad checkpoints fail loudly, naming the key or file; good ones round-trip exactly, lazily and per device."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import k2lab
from k2lab.checkpoint import CheckpointError
from tests.conftest import random_model, tiny_config


@pytest.fixture
def ckpt(tmp_path):
    model = random_model(tiny_config())
    k2lab.save_model(model, tmp_path, max_shard_size="300KB")
    return model, tmp_path


def _index(path):
    return json.loads((path / "model.safetensors.index.json").read_text())


def _rewrite(path, key, fn):
    """Apply fn to the shard dict holding `key` and save it back."""
    fname = _index(path)["weight_map"][key]
    tensors = load_file(path / fname)
    fn(tensors)
    save_file(tensors, path / fname, metadata={"format": "pt"})


def test_round_trip_is_exact_and_lands_on_requested_dtype(ckpt):
    model, path = ckpt
    loaded = k2lab.load_model(path)
    for (n, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), n
    half = k2lab.load_model(path, dtype=torch.bfloat16)
    assert half.lm_head.weight.dtype == torch.bfloat16
    assert half.model.layers[1].mlp.gate.weight.dtype == torch.float32  # the router stays fp32
    assert half.model.layers[1].mlp.gate.e_score_correction_bias.dtype == torch.float32


def test_device_map_places_layers(ckpt):
    _, path = ckpt
    model = k2lab.load_model(path, device="cpu", device_map={"model.layers.2": "meta"})
    assert model.model.layers[2].self_attn.o_proj.weight.is_meta
    assert not model.model.layers[1].self_attn.o_proj.weight.is_meta


def test_missing_key(ckpt):
    _, path = ckpt
    key = "model.layers.1.mlp.experts.3.up_proj.weight"
    _rewrite(path, key, lambda t: t.pop(key))
    index = _index(path)
    del index["weight_map"][key]
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"missing.*experts\.3\.up_proj"):
        k2lab.load_model(path)


def test_key_listed_in_index_but_absent_from_shard(ckpt):
    _, path = ckpt
    key = "model.norm.weight"
    _rewrite(path, key, lambda t: t.pop(key))
    with pytest.raises(CheckpointError, match=r"does not contain model\.norm\.weight"):
        k2lab.load_model(path)


def test_unexpected_key(ckpt):
    _, path = ckpt
    key = "model.norm.weight"
    _rewrite(path, key, lambda t: t.__setitem__("model.norm.bias", torch.zeros(64)))
    index = _index(path)
    index["weight_map"]["model.norm.bias"] = index["weight_map"][key]
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"unexpected.*model\.norm\.bias"):
        k2lab.load_model(path)


def test_wrong_shape(ckpt):
    _, path = ckpt
    key = "model.layers.0.self_attn.kv_b_proj.weight"
    _rewrite(path, key, lambda t: t.__setitem__(key, torch.zeros(10, 32)))
    with pytest.raises(CheckpointError, match=r"kv_b_proj\.weight has shape \(10, 32\)"):
        k2lab.load_model(path)


def test_wrong_dtype(ckpt):
    _, path = ckpt
    key = "model.layers.1.mlp.gate.e_score_correction_bias"
    _rewrite(path, key, lambda t: t.__setitem__(key, t[key].to(torch.bfloat16)))
    with pytest.raises(CheckpointError, match=r"e_score_correction_bias is torch\.bfloat16"):
        k2lab.load_model(path)
    _rewrite(path, key, lambda t: t.__setitem__(key, t[key].float()))
    key = "model.norm.weight"
    _rewrite(path, key, lambda t: t.__setitem__(key, torch.ones(64, dtype=torch.int32)))
    with pytest.raises(CheckpointError, match=r"model\.norm\.weight has dtype torch\.int32"):
        k2lab.load_model(path)


def test_truncated_shard(ckpt):
    _, path = ckpt
    fname = sorted(set(_index(path)["weight_map"].values()))[1]
    data = (path / fname).read_bytes()
    (path / fname).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=fname):
        k2lab.load_model(path)


def test_index_points_to_missing_file(ckpt):
    _, path = ckpt
    fname = sorted(set(_index(path)["weight_map"].values()))[0]
    (path / fname).unlink()
    with pytest.raises(CheckpointError, match=f"points to {fname}"):
        k2lab.load_model(path)


def test_config_weights_mismatch(ckpt):
    _, path = ckpt
    config = json.loads((path / "config.json").read_text())
    config["n_routed_experts"] = 16  # the weights hold 8 experts per layer
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"missing.*experts\.(8|9|1\d)\."):
        k2lab.load_model(path)
    config["n_routed_experts"], config["kv_lora_rank"] = 8, 48
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="the config implies"):
        k2lab.load_model(path)


def test_no_checkpoint_at_all(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        k2lab.load_model(tmp_path / "nope")
    (tmp_path / "config.json").write_text(json.dumps(tiny_config().to_dict()))
    with pytest.raises(CheckpointError, match="neither"):
        k2lab.load_model(tmp_path)


def test_resave_with_fewer_shards_removes_stale_files(ckpt):
    model, path = ckpt
    k2lab.save_model(model, path, max_shard_size="1GB")
    assert [p.name for p in path.glob("model*.safetensors")] == ["model-00001-of-00001.safetensors"]
    assert not list(path.glob(".*.tmp"))
    k2lab.load_model(path)


def test_generation_config_stops_at_eos_and_im_end(ckpt):
    _, path = ckpt
    generation = json.loads((path / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [257, 258]  # [EOS] and <|im_end|> of a 512-token vocabulary
