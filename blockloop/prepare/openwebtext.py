"""OpenWebText (or any document corpus) as GPT-2 BPE tokens, streamed to disk with bounded memory.

Online, the corpus is Hugging Face's `openwebtext` with nanoGPT's split (test_size 0.0005,
seed 2357, the test split renamed val). OpenWebText cannot be had offline, so the same pipeline
also reads local documents from `--source`: a directory or glob of `.txt` files (one document per
file, as OpenWebText's own archives), `.jsonl` (one JSON object per line, field `text`),
`.parquet` (column `text`), `.arrow` files, or a directory written by `datasets`' `save_to_disk`
(its Arrow files are read with pyarrow, no `datasets` needed). Local documents go to val when a
hash of their index falls under `--val_fraction`, so the split is deterministic and needs no
pass over the corpus first.

Documents are tokenised in chunks by worker processes; at most a few chunks per worker are in
flight, so memory stays bounded whatever the corpus size. Each document's tokens are followed by
`<|endoftext|>` and appended to temporary files that are published atomically at the end.
"""

from __future__ import annotations

import collections
import glob
import hashlib
import json
import multiprocessing
import os
from collections.abc import Iterable, Iterator
from contextlib import closing
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..tokenizers import GPT2_EOT_TOKEN, GPT2Tokenizer
from .common import PrepareError, TokenDirWriter, print_summary

HF_DATASET = "openwebtext"
HF_SPLIT_SEED = 2357
DEFAULT_VAL_FRACTION = 0.0005
SUFFIXES = (".txt", ".jsonl", ".parquet", ".arrow")
# A chunk is one task for a worker: large enough to amortise inter-process transfer, small
# enough that (2 x workers) of them in flight stay within a few hundred MB.
CHUNK_CHARS = 4_000_000
CHUNK_DOCS = 10_000

_worker_encoding = None


# ---- reading local documents ------------------------------------------------------------------


def _pyarrow():
    try:
        import pyarrow
        import pyarrow.ipc
        import pyarrow.parquet
    except ImportError:
        raise PrepareError(
            "reading .parquet / .arrow / saved datasets directories needs pyarrow: pip install pyarrow"
        ) from None
    return pyarrow


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file())


def resolve_source(source: str) -> list[Path]:
    """The files (and saved-datasets directories) named by --source, in a deterministic order."""
    path = Path(source)
    if path.is_file() or _is_saved_dataset(path):
        found = [path]
    elif path.is_dir():
        found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in SUFFIXES)
        if not found:
            raise PrepareError(
                f"--source {source}: directory holds no {', '.join(SUFFIXES)} files and no saved datasets"
            )
    else:
        found = [Path(p) for p in sorted(glob.glob(source, recursive=True))]
        if not found:
            raise PrepareError(f"--source {source}: no such file or directory, and the glob matched nothing")
    for p in found:
        if not (_is_saved_dataset(p) or (p.is_file() and p.suffix in SUFFIXES)):
            raise PrepareError(
                f"--source: {p} is not a {', '.join(SUFFIXES)} file or a saved datasets directory; "
                "narrow the glob or convert the file"
            )
    return found


def _text_or_error(value, where: str) -> str:
    if not isinstance(value, str):
        raise PrepareError(
            f"{where}: 'text' must be a string, got {type(value).__name__}; fix or drop that record"
        )
    return value


def _read_txt(path: Path) -> Iterator[str]:
    try:
        yield path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise PrepareError(f"{path}: not UTF-8 text ({e}); convert it to UTF-8") from None


def _read_jsonl(path: Path) -> Iterator[str]:
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise PrepareError(
                    f"{path}:{lineno}: not valid JSON ({e}); each line must be one JSON object"
                ) from None
            if not isinstance(record, dict) or "text" not in record:
                raise PrepareError(f"{path}:{lineno}: expected a JSON object with a 'text' field")
            yield _text_or_error(record["text"], f"{path}:{lineno}")


def _text_column(batch, path: Path) -> list:
    if "text" not in batch.schema.names:
        raise PrepareError(
            f"{path}: no 'text' column (columns: {batch.schema.names}); rename the text column to 'text'"
        )
    return batch.column(batch.schema.get_field_index("text")).to_pylist()


def _read_parquet(path: Path) -> Iterator[str]:
    pa = _pyarrow()
    parquet = pa.parquet.ParquetFile(path)
    if "text" not in parquet.schema_arrow.names:
        raise PrepareError(
            f"{path}: no 'text' column (columns: {parquet.schema_arrow.names}); rename it to 'text'"
        )
    for batch in parquet.iter_batches(batch_size=1024, columns=["text"]):
        for text in _text_column(batch, path):
            yield _text_or_error(text, str(path))


def _read_arrow(path: Path) -> Iterator[str]:
    pa = _pyarrow()
    with pa.memory_map(str(path), "r") as source:
        # `datasets` writes the IPC stream format; plain Arrow files use the file format.
        try:
            batches = iter(pa.ipc.open_stream(source))
        except pa.ArrowInvalid:
            source.seek(0)
            reader = pa.ipc.open_file(source)
            batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
        for batch in batches:
            for text in _text_column(batch, path):
                yield _text_or_error(text, str(path))


def _read_saved_dataset(path: Path) -> Iterator[str]:
    """A `save_to_disk` directory: a Dataset (state.json) or a DatasetDict (dataset_dict.json)."""
    if (path / "dataset_dict.json").is_file():
        splits = json.loads((path / "dataset_dict.json").read_text()).get("splits", [])
        for split in splits:
            if not _is_saved_dataset(path / split):
                raise PrepareError(f"{path / split}: split listed in dataset_dict.json has no state.json")
            yield from _read_saved_dataset(path / split)
        return
    state = json.loads((path / "state.json").read_text())
    if state.get("_indices_data_files"):
        raise PrepareError(f"{path}: saved with an indices mapping; save it again after `.flatten_indices()`")
    for entry in state.get("_data_files", []):
        yield from _read_arrow(path / entry["filename"])


def iter_local_documents(files: list[Path]) -> Iterator[str]:
    readers = {".txt": _read_txt, ".jsonl": _read_jsonl, ".parquet": _read_parquet, ".arrow": _read_arrow}
    for path in files:
        if path.is_dir():
            yield from _read_saved_dataset(path)
        else:
            yield from readers[path.suffix](path)


def is_val_document(index: int, val_fraction: float) -> bool:
    """Deterministic split of local documents: a hash of the index, so it is the same everywhere."""
    digest = hashlib.blake2b(index.to_bytes(8, "little"), digest_size=8, person=b"blockloop-val").digest()
    return int.from_bytes(digest, "little") < val_fraction * 2**64


# ---- the Hugging Face route -------------------------------------------------------------------


def hf_openwebtext(val_fraction: float, num_proc: int):
    """nanoGPT's OpenWebText splits as a DatasetDict with `train` and `val`."""
    try:
        from datasets import load_dataset
    except ImportError:
        raise PrepareError(
            "the online OpenWebText route needs Hugging Face datasets: pip install 'blockloop[online]'; "
            "or pass --source with local .txt/.jsonl/.parquet files or a saved datasets directory"
        ) from None
    try:
        dataset = load_dataset(HF_DATASET, num_proc=num_proc)
    except Exception as e:  # noqa: BLE001 - network, hub and cache errors all end here
        raise PrepareError(
            f"load_dataset({HF_DATASET!r}) failed ({type(e).__name__}: {e}); check the network, "
            "or pass --source with local documents"
        ) from e
    splits = dataset["train"].train_test_split(test_size=val_fraction, seed=HF_SPLIT_SEED, shuffle=True)
    splits["val"] = splits.pop("test")
    return splits


def _iter_hf_documents(splits) -> Iterator[tuple[str, str]]:
    for split in ("train", "val"):
        for batch in splits[split].iter(batch_size=1000):
            for text in batch["text"]:
                yield split, text


# ---- tokenisation -----------------------------------------------------------------------------


def _chunks(documents: Iterable[tuple[str, str]]) -> Iterator[list[tuple[str, str]]]:
    chunk, chars = [], 0
    for doc in documents:
        chunk.append(doc)
        chars += len(doc[1])
        if chars >= CHUNK_CHARS or len(chunk) >= CHUNK_DOCS:
            yield chunk
            chunk, chars = [], 0
    if chunk:
        yield chunk


def encode_chunk(encoding, chunk: list[tuple[str, str]]) -> dict[str, np.ndarray]:
    """Token ids per split for a chunk of (split, text), each document followed by EOT."""
    ids: dict[str, list[int]] = {"train": [], "val": []}
    for split, text in chunk:
        # encode_ordinary: a literal "<|endoftext|>" inside a document is just text.
        ids[split].extend(encoding.encode_ordinary(text))
        ids[split].append(GPT2_EOT_TOKEN)
    return {split: np.array(v, dtype=np.uint16) for split, v in ids.items()}


def _init_worker(encoding) -> None:
    global _worker_encoding
    _worker_encoding = encoding


def _encode_in_worker(chunk):
    return encode_chunk(_worker_encoding, chunk), len(chunk)


def _encoded_chunks(chunks: Iterable[list], encoding, num_proc: int) -> Iterator[tuple[dict, int]]:
    """Encoded chunks in input order, with at most 2 * num_proc chunks in flight."""
    if num_proc <= 1:
        for chunk in chunks:
            yield encode_chunk(encoding, chunk), len(chunk)
        return
    # spawn, not fork: the parent holds threads (tqdm, a possibly stalled tiktoken download)
    # and torch, none of which is safe to fork; the start-up cost is paid once per worker.
    context = multiprocessing.get_context("spawn")
    with context.Pool(num_proc, initializer=_init_worker, initargs=(encoding,)) as pool:
        # Pool.imap would read the whole input ahead of the workers; this window bounds memory.
        pending = collections.deque()
        for chunk in chunks:
            pending.append(pool.apply_async(_encode_in_worker, (chunk,)))
            if len(pending) >= 2 * num_proc:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def _count(documents: Iterable[tuple[str, str]], counts: dict[str, int]) -> Iterator[tuple[str, str]]:
    for split, text in documents:
        counts[split] += 1
        yield split, text


def default_num_proc() -> int:
    return max(1, min(8, (os.cpu_count() or 2) // 2))


def prepare(
    out_dir,
    offline: bool = False,
    source: str | None = None,
    num_proc: int | None = None,
    val_fraction: float = DEFAULT_VAL_FRACTION,
) -> dict:
    """Tokenise OpenWebText (online) or local documents (--source) into a token directory."""
    if not 0.0 < val_fraction < 1.0:
        raise PrepareError(f"--val_fraction must be between 0 and 1, got {val_fraction}")
    num_proc = default_num_proc() if num_proc is None else num_proc
    if num_proc < 1:
        raise PrepareError(f"--num_proc must be >= 1, got {num_proc}")
    if source is not None:
        files = resolve_source(source)
        origin = (
            f"local documents from {source} ({len(files)} file(s)/dir(s)); val = hash(index) < {val_fraction}"
        )
        documents = (
            ("val" if is_val_document(i, val_fraction) else "train", text)
            for i, text in enumerate(iter_local_documents(files))
        )
        total = None
    elif offline:
        raise PrepareError(
            "OpenWebText cannot be downloaded offline; pass --source with local .txt/.jsonl/.parquet "
            "files or a saved datasets directory"
        )
    else:
        splits = hf_openwebtext(val_fraction, num_proc)
        origin = (
            f"huggingface datasets {HF_DATASET!r} "
            f"(train_test_split test_size={val_fraction}, seed={HF_SPLIT_SEED})"
        )
        documents = _iter_hf_documents(splits)
        total = len(splits["train"]) + len(splits["val"])
    print(f"source: {origin}")
    tokenizer = GPT2Tokenizer(offline=offline or None)
    print(f"tokenizer: {tokenizer.source}")
    counts = {"train": 0, "val": 0}
    with TokenDirWriter(out_dir, "openwebtext", tokenizer.vocab_size, tokenizer.to_meta(), origin) as writer:
        chunks = _chunks(_count(documents, counts))
        # closing(): on an error the worker pool is shut down now, not when the traceback is freed.
        with (
            closing(_encoded_chunks(chunks, tokenizer.encoding, num_proc)) as encoded_chunks,
            tqdm(total=total, unit="doc", desc="tokenizing", mininterval=1.0) as bar,
        ):
            for encoded, n_docs in encoded_chunks:
                for split, ids in encoded.items():
                    writer.write(split, ids)
                bar.update(n_docs)
        meta = writer.commit({"documents": dict(counts), "tokenizer_source": tokenizer.source})
    print_summary(meta, out_dir)
    return meta
