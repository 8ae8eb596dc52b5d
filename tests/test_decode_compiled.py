"""The compiled static-shape decoder (k2lab.model.decode) against the model's eager cached forward.

The step's math is checked uncompiled (fast), then one compiled decoder per module (one compile, ~5-40 s
depending on load and on whether inductor's cache under ~/.cache/k2lab/inductor is warm) is checked for
greedy identity with eager generate and for running without recompiles in steady state.
"""

import pytest
import torch
from torch._dynamo.utils import counters

from k2lab.model.decode import Decoder, bucket, cache_dir, decoder_for
from tests.conftest import random_model, tiny_config


@pytest.fixture(scope="module")
def model():
    return random_model(tiny_config(num_hidden_layers=2)).eval()  # one dense and one MoE block


def eager_steps(model, ids, prompt_len):
    """Logits [B, steps, V] of the model's own cached forward, one token at a time after the prompt."""
    bsz, total = ids.shape
    cache = model.new_cache(bsz, total)
    pos = torch.arange(total)[None].expand(bsz, -1)
    with torch.no_grad():
        model(ids[:, :prompt_len], positions=pos[:, :prompt_len], cache=cache)
        return torch.cat([model(ids[:, t:t + 1], positions=pos[:, t:t + 1], cache=cache)
                          for t in range(prompt_len, total)], dim=1)


def decoder_steps(decoder, ids, prompt_len):
    with torch.no_grad():
        decoder.prefill(ids[:, :prompt_len])
        return torch.stack([decoder.step(ids[:, t], torch.full((ids.shape[0],), t))
                            for t in range(prompt_len, ids.shape[1])], dim=1)


def test_step_math_equals_eager_cached_forward(model):
    ids = torch.randint(0, 512, (3, 70), generator=torch.Generator().manual_seed(1))
    decoder = Decoder(model, batch=4, max_len=128, compile=False, prefill_chunk=16)  # 4 rows: one is padding
    diff = (decoder_steps(decoder, ids, 40) - eager_steps(model, ids, 40)).abs().max().item()
    assert diff <= 1e-4


def test_rows_at_different_positions_and_prefill_into_rows(model):
    """The engine's use: prompts prefilled into chosen rows, then rows decode at their own positions."""
    a, b = torch.randint(0, 512, (1, 12)), torch.randint(0, 512, (1, 5))
    decoder = Decoder(model, batch=2, max_len=32, compile=False)
    with torch.no_grad():
        decoder.prefill(b[:, :4], rows=torch.tensor([0]))
        decoder.prefill(a[:, :11], rows=torch.tensor([1]))
        step = decoder.step(torch.tensor([b[0, 4], a[0, 11]]), torch.tensor([4, 11]))
        assert (step[0] - model(b)[0, -1]).abs().max() <= 1e-4
        assert (step[1] - model(a)[0, -1]).abs().max() <= 1e-4


def test_buckets_and_bad_inputs(model):
    assert [bucket(n) for n in (1, 2, 3, 5, 8, 9)] == [1, 2, 4, 8, 8, 16]
    assert bucket(100, 256) == 256
    assert (decoder_for(model, 3, 300).batch, decoder_for(model, 3, 300).max_len) == (4, 512)
    assert decoder_for(model, 3, 300) is decoder_for(model, 4, 400)  # same bucket, same decoder
    with pytest.raises(ValueError, match="does not fit"):
        Decoder(model, 1, 8, compile=False).prefill(torch.zeros(1, 9, dtype=torch.long))


def test_kept_decoders_go_with_their_model():
    import gc
    import weakref

    other = random_model(tiny_config(num_hidden_layers=1))
    decoder_for(other, 1, 16)
    gone = weakref.ref(other)
    del other
    gc.collect()
    assert gone() is None


def test_int4_experts_are_refused_with_a_message():
    import copy

    from k2lab.quant.checkpoint import quantize_experts_

    config = tiny_config(num_hidden_layers=2, hidden_size=64, moe_intermediate_size=32)
    quantized = quantize_experts_(copy.deepcopy(random_model(config)))
    with pytest.raises(ValueError, match="compile=False"):
        Decoder(quantized, 1, 16)


@pytest.fixture(scope="module")
def compiled(model):
    """generate(compile=True) once, so later tests find the (batch 2, 256) decoder compiled."""
    torch._dynamo.reset()
    ids = torch.randint(0, 512, (2, 8), generator=torch.Generator().manual_seed(2))
    out = model.generate(ids, 136, compile=True)
    return ids, out, decoder_for(model, 2, 144)


def test_compiled_greedy_equals_eager_over_136_tokens(model, compiled):
    ids, out, decoder = compiled
    assert decoder.compile_seconds is not None and decoder.compile_seconds > 0
    assert torch.equal(out, model.generate(ids, 136))
    # the logits themselves; every greedy choice leads the runner-up by more than twice the largest
    # compiled-vs-eager difference, so the identity follows from the logits and is not luck
    full = torch.cat([ids, out[:, 8:]], dim=1)
    steps = decoder_steps(decoder, full, 8)
    diff = (steps - eager_steps(model, full, 8)).abs().max().item()
    top2 = steps.topk(2, dim=-1).values
    print(f"compiled vs eager: max logit difference {diff:.2e}, smallest greedy margin "
          f"{(top2[..., 0] - top2[..., 1]).min().item():.2e}")
    assert diff <= 1e-4
    assert (top2[..., 0] - top2[..., 1]).min().item() > 2 * diff
    assert any(cache_dir().iterdir())  # compiled artifacts kept for the next process


def test_no_recompiles_in_steady_state(model, compiled):
    """Other prompts and lengths in the same bucket reuse the compiled step."""
    counters.clear()
    with torch._dynamo.config.patch(error_on_recompile=True):
        for bsz, prompt_len, new in [(2, 20, 30), (2, 3, 100), (2, 100, 50)]:
            ids = torch.randint(0, 512, (bsz, prompt_len))
            assert torch.equal(model.generate(ids, new, compile=True), model.generate(ids, new))
    assert counters["stats"]["unique_graphs"] == 0


def test_compiled_math_of_every_row_count_path(model):
    """The compiled CPU step computes linears as a summed product up to 16 rows (the module fixture: 2 rows) and
    through the module beyond: 8 and 20 rows (two more compiles) equal the eager forward."""
    for bsz in (8, 20):
        ids = torch.randint(0, 512, (bsz, 40), generator=torch.Generator().manual_seed(bsz))
        decoder = Decoder(model, batch=bsz, max_len=48)
        diff = (decoder_steps(decoder, ids, 24) - eager_steps(model, ids, 24)).abs().max().item()
        assert diff <= 1e-4, (bsz, diff)


@pytest.mark.slow  # a second compile (batch 1)
def test_cli_generate_compile_flag(model, tmp_path):
    from typer.testing import CliRunner

    import k2lab
    from k2lab.cli import app

    k2lab.save_model(model, tmp_path)
    args = ["generate", "--checkpoint", str(tmp_path), "--prompt-ids", "1,2,3", "--max-new-tokens", "40"]
    compiled, eager = CliRunner().invoke(app, args + ["--compile"]), CliRunner().invoke(app, args + ["--no-compile"])
    assert compiled.exit_code == 0 and eager.exit_code == 0, compiled.output + eager.output
    assert compiled.stdout == eager.stdout and len(compiled.stdout.split(",")) == 40
    assert "compiled the decode step" in compiled.stderr  # the compile time is reported


def rollout_prompts(n, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 512, (int(torch.randint(3, 40, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def test_compiled_rollouts_equal_eager_without_recompiles(model, compiled):
    """The rollout API on the compiled step gives eager's greedy tokens, and its log-probabilities at temperature
    1, and a second pass over the same sizes with other prompts and stop ids compiles no new graph."""
    from k2lab.serve.rollout import InProcessGenerator, RolloutParams

    fast, eager = InProcessGenerator(model, eos_ids=(7,), compile=True), InProcessGenerator(model, eos_ids=(7,),
                                                                                            compile=False)
    sizes = [(1, 2), (2, 1), (1, 1)]

    def play():
        for seed, (n, k) in enumerate(sizes):
            ps, greedy = rollout_prompts(n, seed), RolloutParams(max_new_tokens=40, temperature=0.0)
            assert fast.generate(ps, k, greedy) == eager.generate(ps, k, greedy)
            params = RolloutParams(max_new_tokens=30, seed=seed, stop_token_ids=(9,))
            for a, b in zip(fast.generate(ps, k, params), eager.generate(ps, k, params)):
                assert a.completion_ids == b.completion_ids and a.finish_reason == b.finish_reason
                assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)) <= 1e-4

    # The first pass may compile: whether these row counts need a new graph depends on what this process (and
    # dynamo's automatic-dynamic state) compiled before. The steady state after it must compile nothing.
    play()
    counters.clear()
    with torch._dynamo.config.patch(error_on_recompile=True):
        play()
        ps, k = rollout_prompts(1, 2), 1
        greedy = RolloutParams(max_new_tokens=40, temperature=0.0)
        before = fast.generate(ps, k, greedy)
        with torch.no_grad():  # an optimizer step: the compiled step reads the parameters, never a copy
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(0)) * 0.05)
        after = fast.generate(ps, k, greedy)
        assert after == eager.generate(ps, k, greedy) and after != before
    assert counters["stats"]["unique_graphs"] == 0


def test_compiled_engine_equals_eager_engine(model):
    """Continuous batching on the compiled step: requests arriving and finishing at different steps make the
    decoding rows 1, 2 and 3 of 4 slots (buckets 1, 2 and 4, padded with free slots); greedy tokens equal the
    eager engine's, and a second wave of requests compiles nothing new."""
    from k2lab.serve.engine import Engine
    from k2lab.serve.sampling import SamplingParams

    def run(engine, seed):
        reqs = []
        for i, p in enumerate(rollout_prompts(3, seed)):
            reqs.append(engine.submit(p, SamplingParams(max_tokens=6 + 5 * i, temperature=0.0)))
            engine.step()
        while any(not r.done.is_set() for r in reqs):
            engine.step()
        return [r.output for r in reqs]

    fast, eager = (Engine(model, lambda t: b"x", (), max_len=128, max_slots=4, compile=c) for c in (True, False))
    assert run(fast, 0) == run(eager, 0)
    assert {size for size, _ in fast.decoder._graphs} == {1, 2, 4}
    counters.clear()
    with torch._dynamo.config.patch(error_on_recompile=True):
        assert run(fast, 1) == run(eager, 1)
    assert counters["stats"]["unique_graphs"] == 0
