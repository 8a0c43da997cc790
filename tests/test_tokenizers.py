"""Tokenizers: char round trips and errors, GPT-2 BPE from the offline whisper copy, fallbacks."""

import threading

import pytest
import tiktoken
from hypothesis import given
from hypothesis import strategies as st

from blockloop import tokenizers
from blockloop.tokenizers import (
    CharTokenizer,
    GPT2Tokenizer,
    TokenizerUnavailableError,
    gpt2_encoding,
    offline_mode,
    tokenizer_from_meta,
)


@pytest.fixture
def fresh_gpt2_cache(monkeypatch):
    """Forget loaded encodings and past online failures, for tests of the loading logic."""
    monkeypatch.setattr(tokenizers, "_cache", {})
    monkeypatch.setattr(tokenizers, "_online_failed_reason", None)


ALPHABET = "\n !',.:;?ABCabcxyz_[]\\é"


@given(st.text(alphabet=ALPHABET))
def test_char_round_trip(text):
    tok = CharTokenizer.from_text(ALPHABET)
    ids = tok.encode(text)
    assert len(ids) == len(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


def test_char_vocab_is_sorted_distinct_chars():
    tok = CharTokenizer.from_text("hello world")
    assert tok.itos == sorted(set("hello world"))
    assert tok.vocab_size == 8
    assert tok.encode("ol") == [tok.itos.index("o"), tok.itos.index("l")]


def test_char_unknown_character_names_it():
    tok = CharTokenizer.from_text("abc")
    with pytest.raises(ValueError, match=r"'z'.*position 2"):
        tok.encode("abz")


def test_char_decode_rejects_out_of_range_ids():
    tok = CharTokenizer.from_text("abc")
    for bad in (3, -1):
        with pytest.raises(ValueError, match=str(bad)):
            tok.decode([0, bad])


def test_char_itos_validation():
    with pytest.raises(ValueError, match="one character"):
        CharTokenizer(["a", "bc"])
    with pytest.raises(ValueError, match="repeated"):
        CharTokenizer(["a", "a"])


def test_char_meta_round_trip():
    tok = CharTokenizer.from_text("to be or not")
    meta = tok.to_meta()
    assert meta["kind"] == "char"
    again = tokenizer_from_meta(meta)
    assert isinstance(again, CharTokenizer) and again.itos == tok.itos
    # The whole meta.json dict is accepted too.
    assert tokenizer_from_meta({"vocab_size": tok.vocab_size, "tokenizer": meta}).itos == tok.itos


def test_tokenizer_from_meta_errors():
    with pytest.raises(ValueError, match="unknown tokenizer kind 'sentencepiece'"):
        tokenizer_from_meta({"kind": "sentencepiece"})
    with pytest.raises(ValueError, match="itos"):
        tokenizer_from_meta({"kind": "char"})


def test_gpt2_offline_matches_gpt2_ids():
    enc = gpt2_encoding(offline=True)
    assert enc.encode_ordinary("hello world") == [31373, 995]
    assert enc.encode("<|endoftext|>", allowed_special="all") == [50256]
    assert enc.n_vocab == 50257
    assert enc.eot_token == 50256


def test_gpt2_tokenizer_api():
    tok = GPT2Tokenizer(offline=True)
    assert tok.vocab_size == 50257 and tok.eot_token == 50256
    ids = tok.encode("Hello world<|endoftext|>Bye")
    assert ids.count(50256) == 1
    assert tok.decode(ids) == "Hello world<|endoftext|>Bye"
    assert tok.to_meta() == {"kind": "gpt2"}
    assert isinstance(tokenizer_from_meta(tok.to_meta(), offline=True), GPT2Tokenizer)
    assert "openai-whisper" in tok.source


def test_offline_mode_flag_and_env(monkeypatch):
    monkeypatch.delenv("BLOCKLOOP_OFFLINE", raising=False)
    assert offline_mode(None) is False
    assert offline_mode(True) is True
    monkeypatch.setenv("BLOCKLOOP_OFFLINE", "1")
    assert offline_mode(None) is True
    assert offline_mode(False) is False


def test_online_failure_falls_back_to_offline_copy(monkeypatch, fresh_gpt2_cache, capsys):
    calls = []

    def no_network(name):
        calls.append(name)
        raise ConnectionError("no route to host")

    monkeypatch.setattr(tiktoken, "get_encoding", no_network)
    enc = gpt2_encoding(offline=False)
    assert enc.encode_ordinary("hello world") == [31373, 995]
    assert "no route to host" in capsys.readouterr().err
    # A second call does not retry the network.
    gpt2_encoding(offline=False)
    assert calls == ["gpt2"]


def test_hanging_download_is_abandoned(monkeypatch, fresh_gpt2_cache):
    release = threading.Event()

    def hang(name):
        release.wait(30)
        raise ConnectionError("released")

    monkeypatch.setattr(tiktoken, "get_encoding", hang)
    monkeypatch.setattr(tokenizers, "ONLINE_TIMEOUT_S", 0.2)
    try:
        enc = gpt2_encoding(offline=False)
    finally:
        release.set()
    assert enc.encode_ordinary("hello world") == [31373, 995]
    assert "TimeoutError" in tokenizers._online_failed_reason


def test_online_success_is_used_as_is(monkeypatch, fresh_gpt2_cache):
    sentinel = tiktoken.Encoding(
        name="fake",
        pat_str=r"\S+|\s+",
        mergeable_ranks={bytes([i]): i for i in range(256)},
        special_tokens={},
    )
    monkeypatch.setattr(tiktoken, "get_encoding", lambda name: sentinel)
    assert gpt2_encoding(offline=False) is sentinel
    assert GPT2Tokenizer(offline=False).source == "tiktoken.get_encoding('gpt2')"


def test_missing_whisper_names_the_package(monkeypatch, fresh_gpt2_cache):
    monkeypatch.setattr(tokenizers, "whisper_gpt2_path", lambda: None)
    with pytest.raises(TokenizerUnavailableError, match=r"pip install --no-deps openai-whisper==20250625"):
        gpt2_encoding(offline=True)


def test_offline_copy_hash_is_checked(monkeypatch, fresh_gpt2_cache, tmp_path):
    fake = tmp_path / "gpt2.tiktoken"
    fake.write_bytes(b"aGVsbG8= 0\n")
    monkeypatch.setattr(tokenizers, "whisper_gpt2_path", lambda: fake)
    # With the cache disabled tiktoken itself checks no hash, so this tests ours.
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")
    with pytest.raises(TokenizerUnavailableError, match=r"sha256.*openai-whisper"):
        gpt2_encoding(offline=True)
