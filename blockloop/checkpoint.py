"""Checkpoint files: atomic, integrity-checked saving and safe loading, plus nanoGPT import.

Training runs for hours and is killed by preemption, OOM killers, full disks and Ctrl-C; a
checkpoint that is half-written at that moment must never replace the last good one. And a
checkpoint is a pickle, so loading one from elsewhere must never run code. This module holds:

- `save_checkpoint(path, payload, summary=None)`: writes `payload` with `torch.save` into a
  temporary file in the same directory, fsyncs it, checks it loads back with the safe loader,
  and only then renames it over `path`. The file it replaces is kept as `<path>.prev`.
- `load_checkpoint(path)`: `torch.load(weights_only=True)` only, after checking the file against
  its integrity record; any failure is a `CheckpointError` naming the file.
- `load_latest_good(path)`: `path`, else `<path>.prev` with a warning.
- `read_nanogpt_checkpoint(path)`: a `ckpt.pt` written by nanoGPT's `train.py`, read through the
  same safe loader, with torch.compile/DDP key prefixes and causal-mask buffers removed.

Integrity scheme: each data file `X` may have a JSON sidecar `X.json` holding its size, its
sha256 and a human-readable summary (iter_num, best_val_loss, ...). The zip CRCs inside a torch
file are not checked by `torch.load`, so without the hash a flipped bit in a weight loads
silently. The save sequence keeps one invariant: *a sidecar that exists always describes the
data file beside it*. A sidecar is removed before its data file is replaced and written only
after, so a crash can leave a data file without a sidecar (it then loads with the structural
checks of `torch.load` only) but never a good file next to a stale hash that would make it look
corrupt. The hash detects accidents (truncation, bit rot, partial copies); it is not a security
boundary, anyone who can edit the file can edit the sidecar. Safety against code in the file comes
from `weights_only=True` alone.

Rotation: before the new file is written, the current file is hard-linked to `<path>.prev`
(renamed where hard links are not supported). So `path` exists at every instant, both names always
hold complete files, and a save never needs more disk than the two checkpoints it leaves behind
(rotating after the write would briefly need three, on exactly the disks that are nearly full).
The price: while the new file is written, both names hold the same checkpoint, and after a failed
save the one before it is gone. A current file that fails its integrity check is not rotated, so
a corrupt file never pushes the last good one out of `.prev`.

One process writes a given path at a time (in DDP only the master saves). A process killed
mid-save leaves a hidden `.<name>.<pid>.<hex>.tmp` file; the next save to that path removes it.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import re
import secrets
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from blockloop.errors import CheckpointError
from blockloop.model import GPT, GPTConfig

__all__ = [
    "CheckpointError",
    "find_run_checkpoint",
    "build_model",
    "load_model",
    "save_checkpoint",
    "load_checkpoint",
    "load_latest_good",
    "read_nanogpt_checkpoint",
    "prev_path",
    "sidecar_path",
]

SIDECAR_FORMAT = "blockloop-ckpt-sidecar-v1"
CHECKPOINT_FORMAT = "blockloop-ckpt-v1"
# A run directory's checkpoints: last.pt is what resumes, best.pt the best validation loss.
LAST_CKPT = "last.pt"
BEST_CKPT = "best.pt"
CHECKPOINT_CHOICES = {"auto": (BEST_CKPT, LAST_CKPT), "best": (BEST_CKPT,), "last": (LAST_CKPT,)}
# Payload keys copied into the sidecar summary when present, so `cat ckpt.pt.json` tells which
# iteration a file holds without loading gigabytes.
_SUMMARY_KEYS = ("format", "iter_num", "best_val_loss")
_HASH_CHUNK = 1 << 20
_NANOGPT_REQUIRED_ARGS = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size")
# torch.compile wraps the model as `_orig_mod`, DDP as `module`; either may wrap the other.
_WRAPPER_PREFIXES = ("_orig_mod.", "module.")


def sidecar_path(path: str | os.PathLike) -> Path:
    """The integrity record of data file `path`: `<path>.json`."""
    return Path(str(path) + ".json")


def prev_path(path: str | os.PathLike) -> Path:
    """Where the checkpoint replaced by the latest save of `path` is kept: `<path>.prev`."""
    return Path(str(path) + ".prev")


# ----------------------------------------------------------------------------------------------
# saving


class _HashingWriter:
    """Forwards writes to a file and hashes the bytes on the way, so the checksum of a
    multi-GB checkpoint costs no second read. `torch.save` streams sequentially into any
    object with `write` and `flush`, so the hash is the hash of the file."""

    def __init__(self, f):
        self._f = f
        self.sha256 = hashlib.sha256()
        self.size = 0
        self.error = None

    def write(self, data) -> int:
        try:
            n = self._f.write(data)
        except OSError as exc:
            self.error = exc
            raise
        self.sha256.update(data)
        self.size += n
        return n

    def flush(self) -> None:
        self._f.flush()


def save_checkpoint(
    path: str | os.PathLike, payload: dict, summary: Mapping[str, Any] | None = None
) -> Path:
    """Atomically write `payload` to `path`, keeping the file it replaces as `<path>.prev`.

    `summary` (JSON-friendly scalars such as iter_num or val_loss) goes into the sidecar next to
    payload's own `format`/`iter_num`/`best_val_loss`. Raises `CheckpointError` if anything
    fails; the earlier checkpoint is then left as it was. Returns `path` as a `Path`.
    """
    if not isinstance(payload, dict):
        raise TypeError(f"checkpoint payload must be a dict, got {type(payload).__name__}")
    path = Path(path)
    directory = path.parent
    side = sidecar_path(path)
    tmp_data = _temp_path(path)
    tmp_side = _temp_path(side)
    committed = False
    try:
        directory.mkdir(parents=True, exist_ok=True)
        _remove_stale_temps(path)
        _rotate_to_prev(path)
        size, digest = _write_data(tmp_data, payload)
        # A payload holding objects the safe loader refuses (numpy arrays, dataclasses, ...)
        # would save fine and only fail at resume time, hours later: refuse it now instead.
        try:
            _safe_load(tmp_data, shown_as=tmp_data, map_location="cpu", mmap=True)
        except CheckpointError as exc:
            raise CheckpointError(
                f"not saving {path}: the written file would not load back ({exc}). Keep only "
                f"tensors, dicts, lists, tuples, str, int, float, bool and None in the payload. "
                f"The previous checkpoint at {path} is unchanged."
            ) from None
        record = {
            "format": SIDECAR_FORMAT,
            "size": size,
            "sha256": digest,
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "torch_version": torch.__version__,
            "summary": _summary(payload, summary),
        }
        _write_json(tmp_side, record)
        _remove_if_present(side)
        os.replace(tmp_data, path)
        committed = True
        os.replace(tmp_side, side)
        _fsync_dir(directory)
    except BaseException as exc:
        # Also on KeyboardInterrupt: a half-written multi-GB temp file must not stay behind.
        _discard(tmp_data)
        _discard(tmp_side)
        if isinstance(exc, CheckpointError):
            raise
        if isinstance(exc, OSError):
            raise CheckpointError(_write_failure_message(path, exc, committed)) from exc
        if isinstance(exc, Exception):
            raise CheckpointError(
                f"could not save checkpoint {path}: {type(exc).__name__}: {exc}. A payload may "
                f"hold only tensors, dicts, lists, tuples, str, int, float, bool and None. "
                f"The previous checkpoint at {path} is unchanged."
            ) from exc
        raise
    return path


def _write_data(tmp: Path, payload: dict) -> tuple[int, str]:
    """torch.save into `tmp`, flushed and fsynced; returns (size, sha256 hex)."""
    with open(tmp, "xb") as f:
        writer = _HashingWriter(f)
        try:
            torch.save(payload, writer)
        except Exception:
            # torch's zip writer reports a failed write as a RuntimeError about stream
            # positions; the OSError behind it (a full disk) is what the user must see.
            if writer.error is not None:
                raise writer.error from None
            raise
        f.flush()
        os.fsync(f.fileno())
        on_disk = os.fstat(f.fileno()).st_size
    if on_disk != writer.size:
        raise CheckpointError(
            f"writing {tmp} produced {on_disk} bytes on disk but {writer.size} were written; "
            f"the disk or filesystem under {tmp.parent} is misbehaving"
        )
    return writer.size, writer.sha256.hexdigest()


def _write_json(tmp: Path, record: dict) -> None:
    with open(tmp, "x", encoding="utf-8") as f:
        json.dump(record, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def _rotate_to_prev(path: Path) -> None:
    """Keep the current `path` (and its sidecar) as `<path>.prev`, if it is a good file."""
    if not path.exists():
        return
    problem = _integrity_problem(path)
    if problem is not None:
        warnings.warn(
            f"not keeping {path} as {prev_path(path)}: {problem}; "
            f"the older {prev_path(path)} stays as the fallback",
            RuntimeWarning,
            stacklevel=3,
        )
        return
    prev = prev_path(path)
    # Sidecar first: `.prev` briefly has no record rather than a record of other bytes.
    _remove_if_present(sidecar_path(prev))
    _link_over(path, prev)
    if sidecar_path(path).exists():
        _link_over(sidecar_path(path), sidecar_path(prev))
    _fsync_dir(path.parent)


def _link_over(src: Path, dst: Path) -> None:
    """Atomically make `dst` name the same file as `src`, leaving `src` in place."""
    tmp = _temp_path(dst)
    try:
        os.link(src, tmp)
    except OSError:
        # No hard links on this filesystem: move instead. `src` is missing until the caller
        # renames the new file into place, a window `load_latest_good` covers via `.prev`.
        os.replace(src, dst)
        return
    try:
        os.replace(tmp, dst)
    finally:
        # Also after success: when `dst` already is a link to the same file (a save killed
        # after rotating), POSIX rename does nothing and leaves `tmp` behind.
        _discard(tmp)


def _integrity_problem(path: Path) -> str | None:
    """Why `path` is not a good checkpoint, or None if it is."""
    try:
        if sidecar_path(path).exists():
            with open(path, "rb") as f:
                _verify_against_sidecar(f, path)
        else:
            # No hash to compare: at least require that the safe loader accepts it (mmap keeps
            # this from reading the tensors).
            _safe_load(path, shown_as=path, map_location="cpu", mmap=True)
    except (CheckpointError, OSError) as exc:
        return str(exc)
    return None


def _summary(payload: dict, extra: Mapping[str, Any] | None) -> dict:
    out = {k: payload[k] for k in _SUMMARY_KEYS if k in payload}
    out.update(extra or {})
    return {str(k): _jsonable(v) for k, v in out.items()}


def _jsonable(value: Any) -> Any:
    """Best-effort JSON form of a summary value; the summary is for humans, never parsed back."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return repr(value)


def _write_failure_message(path: Path, exc: OSError, committed: bool) -> str:
    if committed:
        return (
            f"the new checkpoint {path} is in place, but writing its integrity record "
            f"{sidecar_path(path)} failed ({exc}); {path} still loads, without hash verification"
        )
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        fix = (
            f"Free disk space on the filesystem holding {path.parent} (old runs, out-* dirs) "
            f"or point out_dir at a disk with room for the checkpoint plus its .prev copy, "
            f"then save again"
        )
    else:
        fix = f"Check that {path.parent} exists, is writable and its disk is healthy"
    return (
        f"could not save checkpoint {path}: {exc}. {fix}. "
        f"The previous checkpoint at {path} is unchanged."
    )


def _temp_path(target: Path) -> Path:
    # Hidden, same directory (so os.replace is an atomic rename), unique per process and call.
    return target.parent / f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"


def _remove_stale_temps(path: Path) -> None:
    """Delete temp files that a killed earlier save of `path` left behind."""
    pattern = re.compile(
        rf"\.{re.escape(path.name)}(?:\.json|\.prev|\.prev\.json)?\.\d+\.[0-9a-f]+\.tmp"
    )
    for name in os.listdir(path.parent):
        if pattern.fullmatch(name):
            _discard(path.parent / name)


def _remove_if_present(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _discard(path: Path) -> None:
    """Best-effort removal during cleanup, where a second error must not hide the first."""
    try:
        os.unlink(path)
    except OSError:
        pass


def _fsync_dir(directory: Path) -> None:
    """Persist renames in `directory`; without it a power cut can undo a completed rename."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as exc:
        # Some filesystems cannot fsync a directory; the renames are still atomic there.
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------------------------
# loading


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict:
    """Load a checkpoint dict with `torch.load(weights_only=True)`, after checking its sidecar.

    Raises `CheckpointError` naming the file if it is missing, truncated, altered, not a
    checkpoint, or holds pickled objects other than tensors and plain containers.
    """
    path = Path(path)
    try:
        # One open file for the hash and the load, so both see the same bytes even if a
        # concurrent save renames a new file over `path` in between.
        with open(path, "rb") as f:
            _verify_against_sidecar(f, path)
            f.seek(0)
            payload = _safe_load(f, shown_as=path, map_location=map_location)
    except FileNotFoundError:
        raise CheckpointError(f"no checkpoint file at {path}") from None
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {exc}") from None
    if not isinstance(payload, dict):
        raise CheckpointError(
            f"{path} holds a {type(payload).__name__}, not a checkpoint dict"
        )
    return payload


def load_latest_good(path: str | os.PathLike, map_location: Any = "cpu") -> tuple[dict, Path]:
    """Load `path`, or else `<path>.prev` with a warning; returns (payload, path used)."""
    path = Path(path)
    failures = []
    for candidate in (path, prev_path(path)):
        try:
            payload = load_checkpoint(candidate, map_location=map_location)
        except CheckpointError as exc:
            failures.append(f"{candidate}: {exc}")
            continue
        if failures:
            warnings.warn(
                f"the newest checkpoint could not be loaded ({failures[0]}); "
                f"falling back to the previous one, {candidate}",
                RuntimeWarning,
                stacklevel=2,
            )
        return payload, candidate
    raise CheckpointError("no loadable checkpoint; tried:\n  " + "\n  ".join(failures))


def _verify_against_sidecar(f, path: Path) -> None:
    """Compare open file `f` (of `path`) with `<path>.json`; no sidecar means nothing to check."""
    side = sidecar_path(path)
    try:
        text = side.read_text(encoding="utf-8")
    except FileNotFoundError:
        return
    try:
        record = json.loads(text)
        expected_size = record["size"]
        expected_sha = record["sha256"]
        if not isinstance(expected_size, int) or not isinstance(expected_sha, str):
            raise TypeError("size must be an int and sha256 a string")
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(
            f"integrity record {side} of {path} is unreadable ({exc}); the sidecar is "
            f"damaged. If you trust {path}, delete {side} to load it unverified"
        ) from None
    size = os.fstat(f.fileno()).st_size
    if size != expected_size:
        raise CheckpointError(
            f"{path} is {size} bytes but {side} records {expected_size}: the file is "
            f"truncated or was changed after saving; use its .prev copy (load_latest_good)"
        )
    sha = hashlib.sha256()
    for chunk in iter(lambda: f.read(_HASH_CHUNK), b""):
        sha.update(chunk)
    if sha.hexdigest() != expected_sha:
        raise CheckpointError(
            f"{path} does not match the sha256 recorded in {side}: the file is corrupt or was "
            f"altered after saving; use its .prev copy (load_latest_good)"
        )


def _safe_load(source, shown_as: Path, map_location: Any, mmap: bool = False) -> Any:
    """`torch.load(weights_only=True)`, with every failure turned into a CheckpointError."""
    try:
        # mmap needs a path; it keeps verification of a fresh multi-GB file from reading it.
        return torch.load(str(source) if mmap else source, weights_only=True,
                          map_location=map_location, mmap=mmap)
    except pickle.UnpicklingError as exc:
        message = str(exc)
        # torch's own text suggests retrying with weights_only=False, which is exactly what
        # must not be done with an untrusted file, so only the diagnosis is passed on.
        culprit = re.search(r"GLOBAL ([\w.]+)", message)
        if culprit:
            raise CheckpointError(
                f"refusing to load {shown_as}: it contains a pickled reference to "
                f"{culprit.group(1)}, which could run code when unpickled. Checkpoints may hold "
                f"only tensors, dicts, lists, tuples and Python scalars/strings; do not load "
                f"this file with weights_only=False unless you made it yourself"
            ) from None
        detail = re.search(r"Unsupported [^\n]*", message)
        reason = detail.group(0) if detail else "unpickling failed"
        raise CheckpointError(
            f"{shown_as} is not a valid checkpoint: its pickle data is corrupt or uses "
            f"constructs the safe loader refuses ({reason})"
        ) from None
    except Exception as exc:  # torch raises RuntimeError, EOFError, ValueError... for bad bytes
        first_line = (str(exc).splitlines() or [""])[0]
        raise CheckpointError(
            f"{shown_as} is truncated or corrupt and cannot be loaded "
            f"({type(exc).__name__}: {first_line}); use its .prev copy (load_latest_good)"
        ) from None


# ----------------------------------------------------------------------------------------------
# a run's model


def find_run_checkpoint(out_dir: str | os.PathLike, which: str = "auto") -> Path:
    """The checkpoint file of run directory `out_dir`: "best" (best.pt), "last" (last.pt) or
    "auto" (best.pt if present, else last.pt). Raises CheckpointError saying what is missing."""
    out_dir = Path(out_dir)
    if which not in CHECKPOINT_CHOICES:
        raise CheckpointError(
            f"checkpoint={which!r}: must be one of {', '.join(CHECKPOINT_CHOICES)}"
        )
    if not out_dir.is_dir():
        raise CheckpointError(f"out_dir {str(out_dir)!r} does not exist or is not a directory")
    names = CHECKPOINT_CHOICES[which]
    for name in names:
        if (out_dir / name).is_file():
            return out_dir / name
    raise CheckpointError(
        f"no {' or '.join(names)} in {out_dir}; train a model there first "
        f"(blockloop train --out_dir={out_dir} ...)"
    )


def build_model(payload: dict, source: str | os.PathLike, **config_overrides) -> GPT:
    """The GPT of a `blockloop train` checkpoint payload, weights loaded, in train mode on the
    CPU (or the payload's device). `config_overrides` replace model-config keys that do not
    change the weights (e.g. `loops_representation=True`). Raises CheckpointError naming
    `source` if the payload is not a blockloop checkpoint or its model cannot be rebuilt."""
    for key in ("model", "model_config"):
        if key not in payload:
            raise CheckpointError(
                f"{source} has no {key!r} entry; it was not written by `blockloop train`"
            )
    try:
        model = GPT(GPTConfig(**{**payload["model_config"], **config_overrides}))
        model.load_state_dict(payload["model"])
    except (TypeError, ValueError, RuntimeError, KeyError) as e:
        first = (str(e).splitlines() or [""])[0]
        raise CheckpointError(
            f"{source}: cannot rebuild its model with this version of blockloop ({first})"
        ) from None
    return model


def load_model(path: str | os.PathLike, device: str = "cpu", **config_overrides):
    """(model in eval mode on `device`, payload) of checkpoint file `path`; see `build_model`."""
    payload = load_checkpoint(path, map_location="cpu")
    model = build_model(payload, path, **config_overrides)
    return model.to(device).eval(), payload


# ----------------------------------------------------------------------------------------------
# nanoGPT


def read_nanogpt_checkpoint(
    path: str | os.PathLike, map_location: Any = "cpu"
) -> tuple[dict, dict, dict]:
    """Read nanoGPT's `ckpt.pt`: returns (model_args, state_dict, extra).

    `state_dict` has `_orig_mod.`/`module.` prefixes removed and old nanoGPT's causal-mask
    buffers (`*.attn.bias` of shape (1, 1, T, T)) dropped. `extra` holds every other key
    (`optimizer`, `iter_num`, `best_val_loss`, `config`, ...); `best_val_loss`, which nanoGPT
    stores as a 0-dim tensor, is returned as a float.
    """
    path = Path(path)
    payload = load_checkpoint(path, map_location=map_location)
    missing = [k for k in ("model", "model_args") if k not in payload]
    if missing:
        hint = (
            "; it is a blockloop checkpoint, read it with load_checkpoint"
            if "model_config" in payload
            else ""
        )
        raise CheckpointError(
            f"{path} is not a nanoGPT checkpoint: missing {', '.join(map(repr, missing))} "
            f"(keys present: {sorted(map(str, payload))}){hint}"
        )
    model_args = payload["model_args"]
    if not isinstance(model_args, Mapping):
        raise CheckpointError(f"{path}: 'model_args' is a {type(model_args).__name__}, not a dict")
    absent = [k for k in _NANOGPT_REQUIRED_ARGS if k not in model_args]
    if absent:
        raise CheckpointError(f"{path}: 'model_args' lacks {', '.join(absent)}")
    state = payload["model"]
    if not isinstance(state, Mapping) or not all(
        isinstance(v, torch.Tensor) for v in state.values()
    ):
        raise CheckpointError(f"{path}: 'model' is not a state dict of tensors")

    state_dict, original_key = {}, {}
    for key, tensor in state.items():
        name = _strip_wrapper_prefixes(key)
        if _is_causal_mask_buffer(name, tensor):
            continue
        if name in state_dict:
            raise CheckpointError(
                f"{path}: keys {original_key[name]!r} and {key!r} both become {name!r} once "
                f"torch.compile/DDP prefixes are removed; the state dict mixes wrapped and "
                f"unwrapped models"
            )
        state_dict[name] = tensor
        original_key[name] = key

    extra = {k: v for k, v in payload.items() if k not in ("model", "model_args")}
    best = extra.get("best_val_loss")
    if isinstance(best, torch.Tensor) and best.numel() == 1:
        extra["best_val_loss"] = float(best.item())
    return dict(model_args), state_dict, extra


def _strip_wrapper_prefixes(key: str) -> str:
    stripped = True
    while stripped:
        stripped = False
        for prefix in _WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
                stripped = True
    return key


def _is_causal_mask_buffer(name: str, tensor: torch.Tensor) -> bool:
    # `.attn.bias` never matches `c_attn.bias` (a real parameter): the character before
    # "attn" there is "_", not ".". The shape test keeps any genuine `attn.bias` parameter.
    return (
        name.endswith(".attn.bias")
        and tensor.dim() == 4
        and tensor.shape[0] == tensor.shape[1] == 1
        and tensor.shape[2] == tensor.shape[3]
    )
