"""Tokenizers: a character-level one and GPT-2 BPE through tiktoken, plus their meta.json form.

The GPT-2 encoding normally comes from tiktoken's own download. Offline machines build the
identical encoding from the `gpt2.tiktoken` ranks file that ships inside the `openai-whisper`
package (installed with `--no-deps` and never imported), so prepare and sampling work without a
network.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import sys
import threading
from pathlib import Path

import numpy as np
import tiktoken

GPT2_EOT_TOKEN = 50256
GPT2_VOCAB_SIZE = 50257
GPT2_EOT_TEXT = "<|endoftext|>"

# whisper's gpt2.tiktoken is byte-for-byte tiktoken's r50k_base ranks file (same 50,256 ranks as
# GPT-2), so we can pin tiktoken's own published hash for it.
WHISPER_GPT2_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
WHISPER_PIN = "openai-whisper==20250625"

# tiktoken downloads with `requests` and no timeout: where DNS answers but packets are dropped
# that can block for minutes, so the attempt runs in a daemon thread we stop waiting for.
ONLINE_TIMEOUT_S = 20.0

_cache: dict[bool, tuple[tiktoken.Encoding, str]] = {}
_online_failed_reason: str | None = None


class TokenizerUnavailableError(RuntimeError):
    """Neither tiktoken's download nor the offline copy of GPT-2 BPE could be loaded."""


class CharTokenizer:
    """Maps each character to its index in `itos` (nanoGPT's shakespeare_char scheme)."""

    kind = "char"

    def __init__(self, itos: list[str]):
        itos = list(itos)
        for i, ch in enumerate(itos):
            if not isinstance(ch, str) or len(ch) != 1:
                raise ValueError(f"char tokenizer itos[{i}] = {ch!r}: every entry must be one character")
        if len(set(itos)) != len(itos):
            raise ValueError("char tokenizer itos has repeated characters; build it from sorted(set(text))")
        self.itos = itos
        self.stoi = {ch: i for i, ch in enumerate(itos)}

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        return cls(sorted(set(text)))

    @property
    def vocab_size(self) -> int:
        return len(self.itos)

    def encode(self, text: str) -> list[int]:
        try:
            return [self.stoi[ch] for ch in text]
        except KeyError as e:
            ch = e.args[0]
            raise ValueError(
                f"character {ch!r} (at position {text.index(ch)}) is not in this char vocabulary of "
                f"{self.vocab_size} characters; use only characters seen in the training text"
            ) from None

    def decode(self, ids) -> str:
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        # Checked up front because a negative id would otherwise index itos from the end.
        bad = ids[(ids < 0) | (ids >= self.vocab_size)]
        if bad.size:
            raise ValueError(
                f"token id {int(bad[0])} is outside this char vocabulary (size {self.vocab_size})"
            )
        itos = self.itos
        return "".join([itos[i] for i in ids.tolist()])

    def to_meta(self) -> dict:
        return {"kind": self.kind, "itos": list(self.itos)}


def offline_mode(offline: bool | None = None) -> bool:
    """An explicit flag wins; otherwise the environment variable BLOCKLOOP_OFFLINE=1 forces offline."""
    if offline is not None:
        return bool(offline)
    return os.environ.get("BLOCKLOOP_OFFLINE", "").strip().lower() in ("1", "true", "yes")


def whisper_gpt2_path() -> Path | None:
    """Where the installed openai-whisper keeps gpt2.tiktoken, found without importing whisper."""
    try:
        spec = importlib.util.find_spec("whisper")
    except (ImportError, ValueError):
        return None
    # An unrelated single-module `whisper` (graphite's) has no package directory.
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        path = Path(location) / "assets" / "gpt2.tiktoken"
        if path.is_file():
            return path
    return None


def _offline_encoding() -> tiktoken.Encoding:
    path = whisper_gpt2_path()
    if path is None:
        raise FileNotFoundError("openai-whisper's whisper/assets/gpt2.tiktoken is not installed")
    from tiktoken.load import load_tiktoken_bpe
    from tiktoken_ext.openai_public import r50k_pat_str

    # Checked here because tiktoken skips its own check when TIKTOKEN_CACHE_DIR is empty; passed
    # to tiktoken too, which otherwise trusts a stale cached copy of the same path.
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != WHISPER_GPT2_SHA256:
        raise ValueError(f"{path} has sha256 {digest}, expected {WHISPER_GPT2_SHA256}")
    ranks = load_tiktoken_bpe(str(path), expected_hash=WHISPER_GPT2_SHA256)
    # Not named "gpt2": a registered name would pickle by reference and make worker processes
    # call tiktoken.get_encoding("gpt2"), i.e. the network.
    return tiktoken.Encoding(
        name="gpt2-offline",
        pat_str=r50k_pat_str,
        mergeable_ranks=ranks,
        special_tokens={GPT2_EOT_TEXT: GPT2_EOT_TOKEN},
        explicit_n_vocab=GPT2_VOCAB_SIZE,
    )


def _online_encoding(timeout_s: float) -> tiktoken.Encoding:
    result: dict = {}

    def target():
        try:
            result["encoding"] = tiktoken.get_encoding("gpt2")
        except BaseException as e:  # noqa: BLE001 - reported to the caller below
            result["error"] = e

    thread = threading.Thread(target=target, name="blockloop-tiktoken-gpt2", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise TimeoutError(f"tiktoken.get_encoding('gpt2') gave no answer within {timeout_s:.0f} s")
    if "error" in result:
        raise result["error"]
    return result["encoding"]


def _load_gpt2(offline: bool | None) -> tuple[tiktoken.Encoding, str]:
    """(encoding, where it came from), cached per process; True/False keys: offline/online."""
    global _online_failed_reason
    offline = offline_mode(offline)
    # After one failed (possibly still hanging) online attempt, later calls go straight offline.
    if not offline and _online_failed_reason is None:
        if False not in _cache:
            try:
                _cache[False] = (_online_encoding(ONLINE_TIMEOUT_S), "tiktoken.get_encoding('gpt2')")
            except Exception as e:  # noqa: BLE001 - any failure means: use the offline copy
                _online_failed_reason = f"{type(e).__name__}: {str(e)[:160]}"
                print(
                    f"tiktoken could not fetch GPT-2 BPE ({_online_failed_reason}); using the offline copy",
                    file=sys.stderr,
                )
        if False in _cache:
            return _cache[False]
    if True not in _cache:
        try:
            _cache[True] = (
                _offline_encoding(),
                f"{WHISPER_PIN} whisper/assets/gpt2.tiktoken (offline copy of GPT-2 BPE)",
            )
        except (OSError, ValueError) as e:
            why = "" if offline else f"tiktoken could not download them ({_online_failed_reason}) and "
            raise TokenizerUnavailableError(
                f"GPT-2 BPE files unavailable: {why}the offline copy failed to load ({e}). "
                f"Install it with: pip install --no-deps {WHISPER_PIN}  (or run `make install`)"
            ) from e
    return _cache[True]


def gpt2_encoding(offline: bool | None = None) -> tiktoken.Encoding:
    """GPT-2's tiktoken encoding: tiktoken's download when online, else whisper's identical copy."""
    return _load_gpt2(offline)[0]


class GPT2Tokenizer:
    """GPT-2 BPE (50257 tokens, `<|endoftext|>` = 50256)."""

    kind = "gpt2"
    eot_token = GPT2_EOT_TOKEN
    vocab_size = GPT2_VOCAB_SIZE

    def __init__(self, offline: bool | None = None):
        self.encoding, self.source = _load_gpt2(offline)

    def encode(self, text: str) -> list[int]:
        return self.encoding.encode(text, allowed_special={GPT2_EOT_TEXT})

    def decode(self, ids) -> str:
        return self.encoding.decode([int(i) for i in ids])

    def to_meta(self) -> dict:
        return {"kind": self.kind}


def tokenizer_from_meta(meta: dict, offline: bool | None = None) -> CharTokenizer | GPT2Tokenizer:
    """Rebuild a tokenizer from meta.json's `tokenizer` entry (or from the whole meta.json dict)."""
    spec = tokenizer_spec(meta)
    kind = spec.get("kind")
    if kind == "char":
        if "itos" not in spec:
            raise ValueError("char tokenizer meta has no 'itos' list; re-run `blockloop prepare`")
        return CharTokenizer(spec["itos"])
    if kind == "gpt2":
        return GPT2Tokenizer(offline=offline)
    raise ValueError(f"unknown tokenizer kind {kind!r} in meta; expected 'char' or 'gpt2'")


def tokenizer_spec(meta: dict) -> dict:
    """The tokenizer entry of a meta.json dict (or the entry itself), checked to be a dict."""
    if not isinstance(meta, dict):
        raise ValueError(f"tokenizer meta must be a dict, got {type(meta).__name__}")
    spec = meta.get("tokenizer", meta)
    if not isinstance(spec, dict):
        raise ValueError(f"meta 'tokenizer' must be a dict, got {type(spec).__name__}")
    return spec


def tokenizer_fingerprint(meta: dict) -> str:
    """A short hash of what decoding depends on: the kind and, for characters, the whole
    vocabulary in order (GPT-2 BPE is fixed: its ranks file's pinned hash stands for it).

    Two data directories whose fingerprints differ decode the same ids to different text, so a
    checkpoint stores the fingerprint of the data it was trained on and every reader compares.
    """
    spec = tokenizer_spec(meta)
    what = {"kind": spec.get("kind")}
    if spec.get("kind") == "char":
        what["itos"] = spec.get("itos")
    elif spec.get("kind") == "gpt2":
        what["ranks_sha256"] = WHISPER_GPT2_SHA256
    blob = json.dumps(what, sort_keys=True, ensure_ascii=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def decoding_meta(data_meta: dict) -> dict:
    """What a checkpoint stores so that it decodes on its own: the data's `tokenizer` entry,
    its `vocab_size` (ids at or above it were never in the data: padding) and the tokenizer
    fingerprint. `data_meta` is a meta.json dict."""
    return {
        "tokenizer": tokenizer_spec(data_meta),
        "vocab_size": int(data_meta["vocab_size"]),
        "tokenizer_sha256": tokenizer_fingerprint(data_meta),
    }


def check_same_tokenizer(trained: dict, current: dict, where) -> None:
    """Raise ValueError naming `where` (a meta.json path) if `current` (that file's dict)
    decodes ids differently from `trained` (a checkpoint's meta with a `tokenizer` entry).

    Without this check a re-prepared data directory with another vocabulary of the same size
    would be read (or decoded) silently shifted."""
    if "tokenizer" not in trained:
        return  # written before checkpoints carried their tokenizer: nothing to compare
    want, have = tokenizer_fingerprint(trained), tokenizer_fingerprint(current)
    if want != have:
        raise ValueError(
            f"{where} has changed since this model was trained: its tokenizer "
            f"({tokenizer_spec(current).get('kind')}, {current.get('vocab_size')} ids, "
            f"fingerprint {have}) is not the one the checkpoint was trained with "
            f"({tokenizer_spec(trained).get('kind')}, fingerprint {want}); prepare the data "
            f"directory as it was, or point --data_dir at the data the model was trained on"
        )
