"""Token data directories (train.bin / val.bin / meta.json) and deterministic random batches.

The layout is the contract in docs/CONTRACTS.md. Everything that can be wrong with a directory is
checked once at construction and reported as a DataError naming the file and the fix, so a
training run fails in its first second rather than hours in with a cryptic index error.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from blockloop.errors import DataError

from .tokenizers import GPT2_VOCAB_SIZE, tokenizer_from_meta

META_FORMAT = "blockloop-tokens-v1"
SPLITS = ("train", "val")
# Explicitly little-endian, as the contract says, whatever the machine's byte order.
DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}
REQUIRED_META_KEYS = ("format", "vocab_size", "dtype", "tokenizer", "train_tokens", "val_tokens")

# Scanning every id of OpenWebText's 9B-token train.bin would add minutes to each start, so
# bigger files are checked on evenly spaced chunks (every file written by `blockloop prepare`
# is range-checked while it is written anyway).
SCAN_LIMIT_TOKENS = 1 << 28
_CHUNK_TOKENS = 1 << 22

# Folded into each batch's seed so train and val batches of the same step differ.
_SPLIT_IDS = {"train": 0, "val": 1}


def _prepare_hint(data_dir: Path) -> str:
    return f"re-create it with `blockloop prepare <dataset> --data_dir {data_dir}`"


class TokenDataset:
    """A validated token data directory that serves batches as a pure function of their arguments."""

    def __init__(self, data_dir, scan_limit_tokens: int = SCAN_LIMIT_TOKENS):
        self.data_dir = Path(data_dir)
        if not self.data_dir.is_dir():
            raise DataError(
                f"{self.data_dir}: data directory not found; {_prepare_hint(self.data_dir)} "
                "(e.g. `blockloop prepare shakespeare_char`)"
            )
        self._meta = self._read_meta()
        self._dtype = DTYPES[self._meta["dtype"]]
        self._tokenizer = None
        for split in SPLITS:
            self._check_bin(split, scan_limit_tokens)

    # ---- validation -------------------------------------------------------------------------

    def _read_meta(self) -> dict:
        path = self.data_dir / "meta.json"
        hint = _prepare_hint(self.data_dir)
        if not path.is_file():
            raise DataError(
                f"{path}: missing (prepare writes it last, so an interrupted prepare leaves none); {hint}"
            )
        try:
            meta = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"{path}: not valid JSON ({e}); {hint}") from None
        if not isinstance(meta, dict):
            raise DataError(f"{path}: expected a JSON object, got {type(meta).__name__}; {hint}")
        missing = [k for k in REQUIRED_META_KEYS if k not in meta]
        if missing:
            raise DataError(f"{path}: missing key(s) {', '.join(missing)}; {hint}")
        if meta["format"] != META_FORMAT:
            raise DataError(f"{path}: format is {meta['format']!r}, expected {META_FORMAT!r}; {hint}")
        if meta["dtype"] not in DTYPES:
            raise DataError(
                f"{path}: unknown dtype {meta['dtype']!r}, expected one of {sorted(DTYPES)}; {hint}"
            )
        for key in ("vocab_size", "train_tokens", "val_tokens"):
            value = meta[key]
            if (
                not isinstance(value, int)
                or isinstance(value, bool)
                or value < (1 if key == "vocab_size" else 0)
            ):
                raise DataError(
                    f"{path}: {key} must be a non-negative integer (vocab_size >= 1), got {value!r}; {hint}"
                )
        if meta["vocab_size"] > np.iinfo(DTYPES[meta["dtype"]]).max + 1:
            raise DataError(
                f"{path}: vocab_size {meta['vocab_size']} does not fit dtype {meta['dtype']}; {hint}"
            )
        tok = meta["tokenizer"]
        if not isinstance(tok, dict) or tok.get("kind") not in ("char", "gpt2"):
            raise DataError(
                f"{path}: tokenizer must be an object with kind 'char' or 'gpt2', got {tok!r}; {hint}"
            )
        if tok["kind"] == "char":
            itos = tok.get("itos")
            if not isinstance(itos, list) or len(itos) != meta["vocab_size"]:
                n = len(itos) if isinstance(itos, list) else None
                raise DataError(
                    f"{path}: char tokenizer itos has {n} entries "
                    f"but vocab_size is {meta['vocab_size']}; {hint}"
                )
        elif meta["vocab_size"] != GPT2_VOCAB_SIZE:
            raise DataError(
                f"{path}: gpt2 tokenizer needs vocab_size {GPT2_VOCAB_SIZE}, got {meta['vocab_size']}; {hint}"
            )
        return meta

    def _check_bin(self, split: str, scan_limit_tokens: int) -> None:
        path = self.bin_path(split)
        hint = _prepare_hint(self.data_dir)
        if not path.is_file():
            raise DataError(f"{path}: missing; {hint}")
        size = path.stat().st_size
        if size % self._dtype.itemsize:
            raise DataError(
                f"{path}: {size} bytes is not a multiple of {self._dtype.itemsize} ({self._meta['dtype']}), "
                f"so the file is truncated or meta.json's dtype is wrong; {hint}"
            )
        n = size // self._dtype.itemsize
        expected = self._meta[f"{split}_tokens"]
        if n != expected:
            raise DataError(f"{path}: holds {n} tokens but meta.json says {split}_tokens={expected}; {hint}")
        if n == 0:
            raise DataError(f"{path}: empty; {hint} with more data")
        data = np.memmap(path, dtype=self._dtype, mode="r")
        size = _CHUNK_TOKENS
        if n <= scan_limit_tokens:
            starts = list(range(0, n, size))
        else:
            # The first and last chunks and evenly spaced ones between them.
            starts = np.linspace(0, n - size, max(2, scan_limit_tokens // size)).astype(np.int64).tolist()
        vocab_size = self._meta["vocab_size"]
        for start in starts:
            chunk = data[start : start + size]
            if int(chunk.max()) >= vocab_size:
                where = int(np.argmax(chunk >= vocab_size))
                raise DataError(
                    f"{path}: token id {int(chunk[where])} at position {start + where} is >= vocab_size "
                    f"{vocab_size} from meta.json; the bins and meta.json come from different runs, {hint}"
                )

    def check_block_size(self, block_size: int) -> None:
        """Raise a DataError unless both splits hold at least one (block_size + 1)-token window."""
        for split in SPLITS:
            n = self.num_tokens(split)
            if n < block_size + 1:
                fix = f"use block_size <= {n - 1}, or prepare more data" if n >= 2 else (
                    "prepare more data"
                )
                if split == "val" and self._meta.get("dataset") == "openwebtext":
                    fix += " (a larger --val_fraction)"
                raise DataError(
                    f"{self.bin_path(split)}: {n} tokens, fewer than block_size + 1 = "
                    f"{block_size + 1}; {fix}"
                )

    # ---- accessors --------------------------------------------------------------------------

    @property
    def meta(self) -> dict:
        return json.loads(json.dumps(self._meta))

    @property
    def vocab_size(self) -> int:
        return self._meta["vocab_size"]

    def tokenizer(self):
        """The tokenizer that wrote this directory (built on first use: GPT-2's takes a moment)."""
        if self._tokenizer is None:
            self._tokenizer = tokenizer_from_meta(self._meta["tokenizer"])
        return self._tokenizer

    def bin_path(self, split: str) -> Path:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        return self.data_dir / f"{split}.bin"

    def num_tokens(self, split: str) -> int:
        return self.bin_path(split).stat().st_size // self._dtype.itemsize

    # ---- batches ----------------------------------------------------------------------------

    def get_batch(
        self,
        split: str,
        batch_size: int,
        block_size: int,
        seed: int,
        step: int,
        micro_step: int = 0,
        rank: int = 0,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Random windows (x, y), int64 (B, T), y = x shifted by one; a pure function of the arguments."""
        path = self.bin_path(split)
        for name, value in (("seed", seed), ("step", step), ("micro_step", micro_step), ("rank", rank)):
            if not isinstance(value, (int, np.integer)) or value < 0:
                raise ValueError(f"get_batch: {name} must be a non-negative integer, got {value!r}")
        if batch_size < 1 or block_size < 1:
            raise ValueError(
                f"get_batch: batch_size and block_size must be >= 1, got {batch_size}, {block_size}"
            )
        # Re-opened per call like nanoGPT: a long-lived memmap makes the process's resident memory
        # grow with every page touched (it looks like a leak), and re-opening costs microseconds.
        data = np.memmap(path, dtype=self._dtype, mode="r")
        n = len(data)
        if n < block_size + 1:
            self.check_block_size(block_size)
        entropy = [int(seed), _SPLIT_IDS[split], int(step), int(micro_step), int(rank)]
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(entropy)))
        starts = rng.integers(0, n - block_size, size=batch_size)
        windows = np.stack([data[i : i + block_size + 1] for i in starts]).astype(np.int64)
        x = torch.from_numpy(np.ascontiguousarray(windows[:, :-1]))
        y = torch.from_numpy(np.ascontiguousarray(windows[:, 1:]))
        return x, y
