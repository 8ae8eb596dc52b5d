"""The K2 tokenizer: special-token layout, encode/decode, long inputs, streaming decode, files, training,
and parity with transformers' AutoTokenizer on the embedded corpus."""

import json
import warnings

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from k2lab.data.corpus import corpus_files, iter_texts, read_corpus, stdlib_dir
from k2lab.tokenizer import Tokenizer, train_tokenizer
from k2lab.tokenizer.chat import CHAT_TEMPLATE, K2_6, K2_INSTRUCT
from k2lab.tokenizer.templates import K2_INSTRUCT_TEMPLATE
from k2lab.tokenizer.tokenizer import MAX_ENCODE_CHARS, MAX_RUN_CHARS, _split_runs, default_special_names

# REFERENCE.md section 7: the K2 special-token ids (vocab 163840).
K2_IDS = {"[BOS]": 163584, "[EOS]": 163585, "<|im_end|>": 163586, "<|im_user|>": 163587,
          "<|im_assistant|>": 163588, "<|start_header_id|>": 163590, "<|end_header_id|>": 163591,
          "[EOT]": 163593, "<|im_system|>": 163594, "<|tool_calls_section_begin|>": 163595,
          "<|tool_calls_section_end|>": 163596, "<|tool_call_begin|>": 163597,
          "<|tool_call_argument_begin|>": 163598, "<|tool_call_end|>": 163599, "<|im_middle|>": 163601,
          "<|media_begin|>": 163602, "<|media_content|>": 163603, "<|media_end|>": 163604,
          "<|media_pad|>": 163605, "<think>": 163606, "</think>": 163607, "[UNK]": 163838, "[PAD]": 163839}


def test_k2_special_ids():
    names = default_special_names(163584)
    assert {n: names[n] for n in K2_IDS} == K2_IDS
    assert names["<|reserved_token_163589|>"] == 163589  # unnamed slots carry their absolute id
    assert len(names) == 256 and sorted(names.values()) == list(range(163584, 163840))


def test_small_vocab_specials_at_same_offsets_from_end(tok):
    v = tok.vocab_size
    assert v == 8192 and len(tok.mergeable_ranks) == v - 256
    for name, k2_id in K2_IDS.items():
        assert tok.special_tokens[name] == v - (163840 - k2_id)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (v - 256, v - 255, v - 1)
    assert (tok.im_end_id, tok.im_user_id, tok.im_assistant_id) == (v - 254, v - 253, v - 252)
    assert (tok.im_system_id, tok.im_middle_id) == (v - 246, v - 239)
    assert tok.special_tokens["<|reserved_token_7941|>"] == 7941


def test_special_text_parsed_only_when_allowed(tok):
    text = "a<|im_end|>b<think>"
    plain = tok.encode(text)
    assert not any(tok.is_special(i) for i in plain) and tok.decode(plain) == text
    allowed = tok.encode(text, allow_special=True)
    assert tok.im_end_id in allowed and tok.special_tokens["<think>"] in allowed
    assert tok.decode(allowed) == text


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_decode_inverts_encode(tok, text):
    assert tok.decode(tok.encode(text)) == text


@pytest.mark.parametrize("text", [
    "x = 1  # a comment\n" * 40_000,                    # > MAX_ENCODE_CHARS, cut at safe boundaries
    ("word " * 9 + "\n") * 10_000,
])
def test_long_inputs_cut_without_changing_ids(tok, text):
    assert len(text) > MAX_ENCODE_CHARS
    assert tok.encode(text) == tok.enc.encode(text, disallowed_special=())


@pytest.mark.parametrize("text", [" " * 100_000, "a" * 60_000, "\n" * 70_000, "ab" * 30_000 + "  " * 40_000])
def test_long_runs_round_trip(tok, text):
    assert len(text) > MAX_RUN_CHARS
    assert tok.decode(tok.encode(text)) == text


@settings(max_examples=100, deadline=None)
@given(st.text(min_size=1))
def test_incremental_decoder_never_splits_a_character(tok, text):
    dec = tok.decoder()
    pieces = [dec.add(i) for i in tok.encode(text)] + [dec.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces) or "\ufffd" in text


def test_save_load_round_trip(tok, tmp_path):
    tok.save(tmp_path)
    again = Tokenizer.load(tmp_path)
    assert again.mergeable_ranks == tok.mergeable_ranks and again.special_tokens == tok.special_tokens
    assert again.chat_template == CHAT_TEMPLATE and again.chat_format == K2_6
    assert (tmp_path / "chat_template.jinja").read_text() == CHAT_TEMPLATE


def test_the_same_vocabulary_writes_the_same_files(tok, tmp_path):
    """Two trainings of one vocabulary may hold its ranks in different orders; the files must not differ."""
    shuffled = dict(sorted(tok.mergeable_ranks.items(), key=lambda kv: -kv[1]))
    other = Tokenizer(shuffled, {name: i for name, i in tok.special_tokens.items()})
    tok.save(tmp_path / "a")
    other.save(tmp_path / "b")
    for name in ("tokenizer.json", "tiktoken.model", "tokenizer_config.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_chat_format_is_recorded_and_inferred(tok, tmp_path):
    Tokenizer(tok.mergeable_ranks, chat_format=K2_INSTRUCT).save(tmp_path)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert cfg["k2lab_chat_format"] == K2_INSTRUCT and cfg["chat_template"] == K2_INSTRUCT_TEMPLATE
    assert Tokenizer.load(tmp_path).chat_format == K2_INSTRUCT
    # Files k2lab did not write: Moonshot's K2.5/K2.6 template uses tools_ts_str; any other template is K2-Instruct.
    for template, fmt in [("{{ tools_ts_str }}", K2_6), ("{{ messages }}", K2_INSTRUCT)]:
        cfg.pop("k2lab_chat_format", None)
        cfg["chat_template"] = template
        (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
        assert Tokenizer.load(tmp_path).chat_format == fmt
    cfg["k2lab_chat_format"] = "k9"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="k2lab_chat_format: unknown chat format 'k9'"):
        Tokenizer.load(tmp_path)


NON_SPECIAL = ["<|tool_calls_section_begin|>", "<|tool_calls_section_end|>", "<|tool_call_begin|>",
               "<|tool_call_argument_begin|>", "<|tool_call_end|>", "<think>", "</think>"]


def test_tool_call_and_think_markers_survive_skip_special_tokens(tok, tok_dir):
    """As in Moonshot's tokenizer_config: these markers are not special, so a client decoding with
    skip_special_tokens (vLLM's default) still sees them; role markers are special and are skipped."""
    from transformers import AutoTokenizer

    cfg = json.loads((tok_dir / "tokenizer_config.json").read_text())
    hf_json = json.loads((tok_dir / "tokenizer.json").read_text())
    flags = {t["content"]: t["special"] for t in cfg["added_tokens_decoder"].values()}
    assert flags == {t["content"]: t["special"] for t in hf_json["added_tokens"]}
    assert [n for n, special in flags.items() if not special] == NON_SPECIAL
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = AutoTokenizer.from_pretrained(tok_dir)
    text = ('<think>hm</think>ok<|tool_calls_section_begin|><|tool_call_begin|>functions.f:0'
            '<|tool_call_argument_begin|>{}<|tool_call_end|><|tool_calls_section_end|><|im_end|>')
    ids = tok.encode(text, allow_special=True)
    assert hf.encode(text, add_special_tokens=False) == ids
    assert hf.decode(ids, skip_special_tokens=True) == text[:-len("<|im_end|>")]


def test_load_takes_names_from_added_tokens_decoder(tok, tmp_path):
    tok.save(tmp_path)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    cfg["added_tokens_decoder"] = {"7936": {"content": "<|custom|>"}}  # K2 files name only some ids
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    again = Tokenizer.load(tmp_path)
    assert again.special_tokens["<|custom|>"] == 7936
    assert again.special_tokens["<|reserved_token_7937|>"] == 7937 and again.bos_id is None


def test_load_rejects_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="tiktoken.model"):
        Tokenizer.load(tmp_path)
    (tmp_path / "tiktoken.model").write_text("not-base64!! x\n")
    with pytest.raises(ValueError, match="tiktoken.model:1"):
        Tokenizer.load(tmp_path)


def test_training_rejects_impossible_sizes(tmp_path):
    with pytest.raises(ValueError, match="too small"):
        train_tokenizer(300)
    small = tmp_path / "small.txt"
    small.write_text("hello world " * 10)
    with pytest.raises(ValueError, match="give more text"):
        train_tokenizer(4096, paths=[small])


def test_corpus_is_deterministic_and_capped():
    files = corpus_files()
    rel = [p.relative_to(stdlib_dir()).as_posix() for p in files]
    assert rel == sorted(rel) and len(files) > 100 and files == corpus_files()
    assert not any("site-packages" in p.parts or "test" in p.parts for p in files)
    assert len(read_corpus(max_bytes=12345).encode("utf-8", "replace")) <= 12345 + 3 * 4
    assert read_corpus(max_bytes=50_000) == read_corpus(max_bytes=50_000)


def test_auto_tokenizer_matches_on_the_embedded_corpus(tok, tok_dir):
    transformers = pytest.importorskip("transformers")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.AutoTokenizer.from_pretrained(tok_dir)
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (tok.bos_id, tok.eos_id, tok.pad_id)
    assert len(hf) == tok.vocab_size and hf.convert_tokens_to_ids("<|im_end|>") == tok.im_end_id
    n = 0
    for text in iter_texts():
        assert hf.encode(text, add_special_tokens=False) == tok.encode(text, allow_special=True)
        n += 1
    assert n == len(corpus_files())
    ids = tok.encode("héllo 你好 <|im_end|>", allow_special=True)
    assert hf.decode(ids) == tok.decode(ids)


@settings(max_examples=150, deadline=None)
@given(st.text(st.characters(codec="utf-8"), max_size=200))
def test_auto_tokenizer_matches_on_random_text(tok, tok_dir, text):
    transformers = pytest.importorskip("transformers")
    hf = _hf(transformers, tok_dir)
    assert hf.encode(text, add_special_tokens=False) == tok.encode(text, allow_special=True)


_HF = {}


def _hf(transformers, d):
    if d not in _HF:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _HF[d] = transformers.AutoTokenizer.from_pretrained(d)
    return _HF[d]


def test_encode_batch_equals_encode(tok):
    texts = list(iter_texts(max_bytes=600_000)) + ["x = 1\n" * 100_000, "", "<|im_end|>"]
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]
    assert tok.encode_batch(texts, allow_special=True)[-1] == [tok.im_end_id]


def test_cli_train(tmp_path):
    from typer.testing import CliRunner

    from k2lab.cli import app

    text = tmp_path / "a.txt"
    text.write_text(read_corpus(max_bytes=300_000))
    args = ["tokenizer", "train", "--vocab-size", "1024", "--out", str(tmp_path / "t"), str(text)]
    out = CliRunner().invoke(app, args)
    assert out.exit_code == 0, out.output
    tok = Tokenizer.load(tmp_path / "t")
    assert tok.vocab_size == 1024 and tok.pad_id == 1023 and tok.decode(tok.encode("def f(x):")) == "def f(x):"


def _k2_run_cuts(text, limit):
    """K2's rule, char by char: cut a run of whitespace or non-whitespace every `limit` chars."""
    pieces, start, run, space = [], 0, 0, None
    for i, ch in enumerate(text):
        if ch.isspace() != space:
            run, space = 1, ch.isspace()
        else:
            run += 1
            if run > limit:
                pieces.append(text[start:i])
                start, run = i, 1
    return pieces + [text[start:]]


@settings(max_examples=30, deadline=None)
@given(st.integers(MAX_RUN_CHARS - 3, 2 * MAX_RUN_CHARS + 3), st.integers(0, 20_000), st.sampled_from([" ", "x", "\n"]))
def test_long_runs_are_cut_as_k2_cuts_them(run, offset, ch):
    text = "ab c\n" * (offset // 5) + ch * run + " tail"
    assert list(_split_runs(text)) == _k2_run_cuts(text, MAX_RUN_CHARS)
