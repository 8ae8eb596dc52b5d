import subprocess

import pytest
import torch

from k2lab.config import ModelConfig
from k2lab.model import K2ForCausalLM

# One thread: the tiny test models gain nothing from more, and tests that start server processes beside
# pytest would otherwise oversubscribe the two cores.
torch.set_num_threads(1)


def tiny_config(**overrides) -> ModelConfig:
    """A K2-shaped model small enough for exact parity tests: YaRN on with K2.6-style values scaled down
    (beta_fast 32, beta_slow 1, mscale 1) and an original context short enough that the ramp matters."""
    base = dict(
        vocab_size=512, hidden_size=64, intermediate_size=160, moe_intermediate_size=32, num_hidden_layers=3,
        num_attention_heads=4, q_lora_rank=48, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
        v_head_dim=16, n_routed_experts=8, num_experts_per_tok=3, n_group=4, topk_group=2,
        max_position_embeddings=1024, rope_theta=50000.0, rms_norm_eps=1e-5,
        rope_scaling=dict(type="yarn", factor=8.0, original_max_position_embeddings=128, beta_fast=32.0,
                          beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0),
        bos_token_id=256, eos_token_id=257, pad_token_id=511,
    )
    base.update(overrides)
    return ModelConfig(**base)


def random_model(config: ModelConfig, seed: int = 0) -> K2ForCausalLM:
    """Random weights with non-trivial norms and routing biases so every tensor matters."""
    torch.manual_seed(seed)
    model = K2ForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            elif p.dim() >= 2:
                p.normal_(0, 0.08)
        for module in model.modules():
            if hasattr(module, "e_score_correction_bias"):
                module.e_score_correction_bias.normal_(0, 0.05)
    return model.eval()


def randomize_(module: torch.nn.Module, seed: int) -> None:
    """All parameters random (norm weights around 1), routing biases too, so nothing hides behind a 0 or a 1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.1 * noise if "norm" in name and name.endswith("weight") else 0.05 * noise)
        for name, b in module.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.01 * torch.randn(b.shape, generator=g))


def read_checkpoint_tensors(path) -> dict[str, torch.Tensor]:
    """Every tensor of a sharded safetensors checkpoint directory, by name."""
    import json

    from safetensors import safe_open

    index = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    out = {}
    for fname in set(index.values()):
        with safe_open(str(path / fname), "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


@pytest.fixture
def tiny():
    return tiny_config()


@pytest.fixture(scope="session")
def tok_dir(tmp_path_factory):
    """A tokenizer trained once per test session: 8192 ids on 1 MB of the embedded corpus."""
    from k2lab.tokenizer import train_tokenizer

    d = tmp_path_factory.mktemp("tok")
    train_tokenizer(8192, out_dir=d, max_bytes=1_000_000)
    return d


@pytest.fixture(scope="session")
def tok(tok_dir):
    from k2lab.tokenizer import Tokenizer

    return Tokenizer.load(tok_dir)


def sft_checkpoint_and_data(d, tok_dir):
    """A random tiny checkpoint with the tokenizer of `tok_dir` in d/ckpt, and chat JSONL from `k2lab synth` on
    the embedded domains (30 tasks) in d/synth: (checkpoint dir, kept.jsonl)."""
    import k2lab
    from k2lab.synth.pipeline import run_embedded
    from k2lab.tokenizer import Tokenizer

    tok = Tokenizer.load(tok_dir)
    config = tiny_config(vocab_size=tok.vocab_size, pad_token_id=tok.pad_id, bos_token_id=tok.bos_id,
                         eos_token_id=tok.eos_id)
    k2lab.save_model(random_model(config, seed=0), d / "ckpt")
    tok.save(d / "ckpt")
    run_embedded("embedded", 30, d / "synth", seed=0)
    return d / "ckpt", d / "synth" / "kept.jsonl"


def side_by_side(argvs: list[list[str]], timeout: float = 300, **popen) -> list[subprocess.CompletedProcess]:
    """Run the commands at the same time and wait for all (for commands that are mostly the interpreter's start:
    bad-input answers, short CLI runs); each result has returncode, stdout and stderr as text."""
    procs = [subprocess.Popen(a, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen) for a in argvs]
    outs = [p.communicate(timeout=timeout) for p in procs]
    return [subprocess.CompletedProcess(a, p.returncode, out, err) for a, p, (out, err) in zip(argvs, procs, outs)]
