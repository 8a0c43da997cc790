"""Run records on disk: JSON-lines logs, atomic JSON files, and the code identity of a run.

A run's files are read by other processes (the experiment runner, the report) while it writes
them and after a kill, so JSON-lines readers skip a line cut short, and whole JSON files are
written to a temporary name and renamed. The code identity (a hash of the package's source
files, the torch version, and the git commit where there is one) is stored with every result so
that results made by other code are recognised instead of silently reused.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import subprocess
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """The records of a JSON-lines file ([] if it does not exist); a line cut short is skipped."""
    path = Path(path)
    records = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def append_jsonl(path: str | os.PathLike, record: dict) -> None:
    """Append one record; a previous writer killed mid-line does not glue onto this one."""
    path = Path(path)
    line = json.dumps(record, default=json_default) + "\n"
    if path.exists() and path.stat().st_size > 0:
        with open(path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                line = "\n" + line
    with open(path, "a") as f:
        f.write(line)
        f.flush()


def write_jsonl(path: str | os.PathLike, records: list[dict]) -> None:
    """Replace a JSON-lines file atomically with `records`."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r, default=json_default) + "\n" for r in records))
    os.replace(tmp, path)


def atomic_write_json(path: str | os.PathLike, data, indent: int | None = 1) -> None:
    """Write `data` as JSON to a temporary file beside `path`, then rename it over `path`."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=indent, sort_keys=True, default=json_default))
    os.replace(tmp, path)


def json_default(obj):
    """`json.dumps` fallback: paths as strings, 0-d tensors and numpy scalars as numbers."""
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"not JSON-serialisable: {type(obj).__name__}")


def finite_or_none(x):
    """JSON has no NaN/inf: a non-finite number becomes None (shown as "diverged"/"n/a")."""
    return x if isinstance(x, (int, float)) and math.isfinite(x) else None


def jsonable(value):
    """Plain JSON types throughout, with NaN/inf (undefined or diverged values) as None."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        value = value.item()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    return value


@functools.lru_cache(maxsize=1)
def code_identity() -> dict:
    """What code makes a result: {"source_sha256", "torch", "git_commit"}.

    `source_sha256` hashes every `.py` file of the package (path and bytes, in sorted order), so
    any edit to the code that trains or evaluates changes it; `git_commit` is None outside a
    git checkout (it is informative only: uncommitted edits do not change it).
    """
    import torch

    digest = hashlib.sha256()
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        digest.update(str(path.relative_to(PACKAGE_DIR)).encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return {
        "source_sha256": digest.hexdigest()[:16],
        "torch": torch.__version__,
        "git_commit": _git_commit(),
    }


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=PACKAGE_DIR, capture_output=True, text=True,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def same_code(identity: dict | None) -> bool:
    """Whether a recorded code identity is this code's (source hash and torch version)."""
    if not isinstance(identity, dict):
        return False
    here = code_identity()
    return all(identity.get(k) == here[k] for k in ("source_sha256", "torch"))
