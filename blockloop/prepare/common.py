"""Shared pieces of `blockloop prepare`: the atomic token-directory writer and text helpers.

Every dataset script streams token ids into a `TokenDirWriter`. Tokens go to hidden temporary
files inside the target directory; only a successful `commit()` renames them to train.bin and
val.bin and then writes meta.json, last. A crash or an error therefore never leaves a partial
train.bin, and a directory without meta.json is rejected by `blockloop.data.TokenDataset`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from blockloop.errors import PrepareError

from ..data import DTYPES, META_FORMAT, SPLITS

# nanoGPT's Shakespeare split: the first 90% of the characters train, the rest validate.
TRAIN_FRACTION = 0.9


def dtype_for_vocab(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def split_text(text: str, train_fraction: float = TRAIN_FRACTION) -> tuple[str, str]:
    n = int(len(text) * train_fraction)
    return text[:n], text[n:]


def read_text_file(path) -> str:
    path = Path(path)
    if not path.is_file():
        raise PrepareError(f"--source {path}: no such file")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise PrepareError(f"--source {path}: not UTF-8 text ({e}); convert it to UTF-8 first") from None


def _fsync_dir(path: Path) -> None:
    # Makes the renames durable; not possible on every platform, where it is simply skipped.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def check_data_dir(data_dir) -> None:
    """Raise PrepareError unless `data_dir` is a directory or can be created as one."""
    path = Path(data_dir)
    for parent in (path, *path.parents):
        if parent.exists():
            if not parent.is_dir():
                raise PrepareError(
                    f"--data_dir={data_dir}: {parent} is a file, not a directory; choose another "
                    f"--data_dir"
                )
            break


class TokenDirWriter:
    """Appends token ids per split to temporary files; `commit()` publishes them atomically.

    Use as a context manager: leaving the block without `commit()` (an exception, Ctrl-C)
    removes the temporary files and leaves any previous contents of the directory untouched.
    """

    def __init__(self, out_dir, dataset: str, vocab_size: int, tokenizer_meta: dict, source: str):
        self.out_dir = Path(out_dir)
        check_data_dir(self.out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.dataset = dataset
        self.vocab_size = vocab_size
        self.tokenizer_meta = tokenizer_meta
        self.source = source
        self.dtype_name = dtype_for_vocab(vocab_size)
        self.dtype = DTYPES[self.dtype_name]
        self.counts = {split: 0 for split in SPLITS}
        self._tmp = {split: self.out_dir / f".{split}.bin.{os.getpid()}.tmp" for split in SPLITS}
        self._files = {split: open(self._tmp[split], "wb") for split in SPLITS}
        self._done = False

    def __enter__(self) -> TokenDirWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self._done:
            self.abort()

    def write(self, split: str, ids) -> None:
        arr = np.asarray(ids)
        if arr.size == 0:
            return
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi >= self.vocab_size:
            raise PrepareError(
                f"token id {lo if lo < 0 else hi} outside vocabulary of {self.vocab_size} ({self.dataset})"
            )
        self._files[split].write(arr.astype(self.dtype, copy=False).tobytes())
        self.counts[split] += int(arr.size)

    def abort(self) -> None:
        for split in SPLITS:
            self._files[split].close()
            self._tmp[split].unlink(missing_ok=True)
        self._done = True

    def commit(self, extra_meta: dict | None = None) -> dict:
        """Publish train.bin, val.bin, then meta.json; returns the meta written."""
        empty = [split for split in SPLITS if self.counts[split] == 0]
        if empty:
            self.abort()
            raise PrepareError(
                f"{self.dataset}: the {' and '.join(empty)} split came out empty; give it more text"
                + (" or a larger --val_fraction" if "val" in empty and self.dataset == "openwebtext"
                   else "")
            )
        for split in SPLITS:
            f = self._files[split]
            f.flush()
            os.fsync(f.fileno())
            f.close()
        meta = {
            "format": META_FORMAT,
            "dataset": self.dataset,
            "vocab_size": self.vocab_size,
            "dtype": self.dtype_name,
            "tokenizer": self.tokenizer_meta,
            "source": self.source,
            "train_tokens": self.counts["train"],
            "val_tokens": self.counts["val"],
            **(extra_meta or {}),
        }
        meta_tmp = self.out_dir / f".meta.json.{os.getpid()}.tmp"
        try:
            with open(meta_tmp, "w", encoding="utf-8") as f:
                json.dump(meta, f, indent=1, ensure_ascii=False)
                f.write("\n")
                f.flush()
                os.fsync(f.fileno())
            # Old meta.json goes first: between the renames the directory then reads as
            # "unfinished" rather than as old metadata describing new bins.
            (self.out_dir / "meta.json").unlink(missing_ok=True)
            for split in SPLITS:
                os.replace(self._tmp[split], self.out_dir / f"{split}.bin")
            os.replace(meta_tmp, self.out_dir / "meta.json")
        finally:
            meta_tmp.unlink(missing_ok=True)
            for split in SPLITS:
                self._tmp[split].unlink(missing_ok=True)
            self._done = True
        _fsync_dir(self.out_dir)
        return meta


def print_summary(meta: dict, out_dir) -> None:
    print(
        f"wrote {out_dir}: train {meta['train_tokens']:,} tokens, val {meta['val_tokens']:,} tokens, "
        f"vocab {meta['vocab_size']:,} ({meta['tokenizer']['kind']}), {meta['dtype']}"
    )
