"""Tests for blockloop.checkpoint: round trips, crash safety, corruption detection, refusal of
code-carrying pickles, and reading nanoGPT checkpoints.

Crash safety is tested two ways: a deterministic "crash" before every filesystem operation of a
save (with cleanup disabled, as when a process dies), and a forked writer SIGKILLed at random
moments while it saves in a loop.
"""

import errno
import hashlib
import json
import math
import multiprocessing
import os
import pickle
import random
import shlex
import signal
import struct
import tempfile
import time
import warnings
from collections import OrderedDict

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import blockloop.checkpoint as ckpt
from blockloop.checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_latest_good,
    prev_path,
    read_nanogpt_checkpoint,
    save_checkpoint,
    sidecar_path,
)


def _payload(i: int, n: int = 64) -> dict:
    return {
        "format": "blockloop-ckpt-v1",
        "iter_num": i,
        "best_val_loss": 10.0 - i,
        "model": {"w": torch.full((n,), float(i))},
    }


def _assert_same(a, b, where="payload"):
    assert type(a) is type(b), f"{where}: {type(a)} != {type(b)}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert list(a) == list(b), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b), where
    else:
        assert a == b, where


def _temp_files(directory):
    return sorted(n for n in os.listdir(directory) if n.endswith(".tmp"))


def _snapshot(paths):
    return {p: p.read_bytes() for p in paths if p.exists()}


# ----------------------------------------------------------------------------------------------
# round trip


def test_round_trip_keeps_tensors_containers_scalars_and_rng_states(tmp_path):
    gen = torch.Generator().manual_seed(7)
    py_rng = random.Random(7)
    base = torch.arange(12.0).reshape(3, 4)
    payload = {
        "format": "blockloop-ckpt-v1",
        "model": OrderedDict(
            w=torch.randn(3, 4),
            half=torch.randn(5).to(torch.bfloat16),
            idx=torch.arange(6, dtype=torch.int64),
            mask=torch.tensor([True, False]),
            scalar=torch.tensor(3.5),
            empty=torch.empty(0, 7),
            transposed=base.t(),  # non-contiguous view
        ),
        "optimizer": {
            "state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.zeros(2)}},
            "param_groups": [{"lr": 6e-4, "betas": (0.9, 0.95), "params": [0]}],
        },
        "iter_num": 1234,
        "best_val_loss": 1.5,
        "big_int": 2**62,
        "inf": float("inf"),
        "nan": float("nan"),
        "name": "ünïcode run ✓",
        "flag": True,
        "nothing": None,
        "rng": {"torch": torch.get_rng_state(), "gen": gen.get_state(), "python": py_rng.getstate()},
    }
    expected_gen_draw = torch.rand(5, generator=gen)
    expected_py_draw = py_rng.random()

    path = tmp_path / "ckpt.pt"
    assert save_checkpoint(path, payload, summary={"val_loss": torch.tensor(1.25)}) == path
    loaded = load_checkpoint(path)
    _assert_same(payload, loaded)

    # RNG states restored from the file continue the same random streams.
    restored = torch.Generator()
    restored.set_state(loaded["rng"]["gen"])
    assert torch.equal(torch.rand(5, generator=restored), expected_gen_draw)
    restored_py = random.Random()
    restored_py.setstate(loaded["rng"]["python"])
    assert restored_py.random() == expected_py_draw

    record = json.loads(sidecar_path(path).read_text())
    data = path.read_bytes()
    assert record["size"] == len(data)
    assert record["sha256"] == hashlib.sha256(data).hexdigest()
    assert record["summary"] == {
        "format": "blockloop-ckpt-v1",
        "iter_num": 1234,
        "best_val_loss": 1.5,
        "val_loss": 1.25,
    }
    assert _temp_files(tmp_path) == []


_leaf = st.one_of(
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=False),
    st.text(max_size=8),
    st.booleans(),
    st.none(),
    st.lists(st.floats(-1e6, 1e6, width=32), max_size=6).map(
        lambda xs: torch.tensor(xs, dtype=torch.float32)
    ),
)
_nested = st.recursive(
    _leaf,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.text(max_size=6), inner, max_size=4),
    ),
    max_leaves=12,
)


@settings(max_examples=20, deadline=None)
@given(st.dictionaries(st.text(max_size=6), _nested, max_size=5))
def test_round_trip_of_arbitrary_nested_payloads(payload):
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "ckpt.pt")
        save_checkpoint(path, payload)
        _assert_same(payload, load_checkpoint(path))


def test_second_save_keeps_the_first_as_prev(tmp_path):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, _payload(1))
    assert not prev_path(path).exists()
    save_checkpoint(path, _payload(2))
    save_checkpoint(path, _payload(3))
    assert load_checkpoint(path)["iter_num"] == 3
    assert load_checkpoint(prev_path(path))["iter_num"] == 2
    # The .prev file keeps a sidecar that matches it, so it is hash-verified too.
    record = json.loads(sidecar_path(prev_path(path)).read_text())
    assert record["sha256"] == hashlib.sha256(prev_path(path).read_bytes()).hexdigest()
    assert record["summary"]["iter_num"] == 2
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pt", "ckpt.pt.json", "ckpt.pt.prev", "ckpt.pt.prev.json"]


def test_files_are_fsynced_before_they_are_renamed_into_place(tmp_path, monkeypatch):
    # Process-kill tests cannot show durability across a power cut; the fsync order can be.
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, _payload(1))
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.fstat(fd).st_ino))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", os.stat(src).st_ino, os.path.basename(dst)))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    save_checkpoint(path, _payload(2))
    monkeypatch.undo()

    for name in ("ckpt.pt", "ckpt.pt.json"):
        i = next(i for i, e in enumerate(events) if e[0] == "replace" and e[2] == name)
        assert ("fsync", events[i][1]) in events[:i], f"{name} renamed before its data was fsynced"
    last_replace = max(i for i, e in enumerate(events) if e[0] == "replace")
    assert ("fsync", os.stat(tmp_path).st_ino) in events[last_replace:], "directory not fsynced"


# ----------------------------------------------------------------------------------------------
# failed writes


def _partial_then_enospc(obj, f, *args, **kwargs):
    f.write(b"PK\x03\x04" + b"\0" * 4096)  # the start of a zip, then the disk fills up
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("fault", ["torch.save", "fsync", "replace"])
def test_failed_write_raises_clear_error_and_loses_nothing(tmp_path, monkeypatch, fault):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, _payload(1))
    save_checkpoint(path, _payload(2))
    current = _snapshot([path, sidecar_path(path)])

    if fault == "torch.save":
        monkeypatch.setattr(torch, "save", _partial_then_enospc)
    elif fault == "fsync":
        # Network and quota-limited filesystems may report a full disk only at fsync time.
        def fsync(fd):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(os, "fsync", fsync)
    else:

        def replace(src, dst):
            raise PermissionError(errno.EACCES, "Permission denied", str(dst))

        monkeypatch.setattr(os, "replace", replace)

    with pytest.raises(CheckpointError) as info:
        save_checkpoint(path, _payload(3))
    monkeypatch.undo()

    message = str(info.value)
    assert str(path) in message
    assert "unchanged" in message
    if fault == "replace":
        assert "Permission denied" in message and "writable" in message
    else:
        assert "No space left on device" in message and "Free disk space" in message
    assert _snapshot([path, sidecar_path(path)]) == current
    assert load_checkpoint(path)["iter_num"] == 2
    # .prev holds checkpoint 2 if the rotation ran before the fault, else still checkpoint 1.
    assert load_checkpoint(prev_path(path))["iter_num"] in {1, 2}
    assert _temp_files(tmp_path) == []


def test_save_never_needs_more_disk_than_two_checkpoints(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, _payload(1))
    save_checkpoint(path, _payload(2))
    real_save = torch.save
    seen = []

    def save(obj, f, *args, **kwargs):
        # While the new file is being written, .prev is the current file under a second name
        # (the one before it already freed), so only one old checkpoint occupies disk.
        seen.append(os.path.samefile(path, prev_path(path)))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    save_checkpoint(path, _payload(3))
    assert seen == [True]
    assert load_checkpoint(path)["iter_num"] == 3
    assert load_checkpoint(prev_path(path))["iter_num"] == 2


class _NotATensor:
    """A harmless custom class: torch.save pickles it, but the safe loader refuses it."""

    def __init__(self, x):
        self.x = x


def test_payload_that_would_not_load_back_is_refused_at_save_time(tmp_path):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, _payload(1))
    with pytest.raises(CheckpointError, match="would not load back") as info:
        save_checkpoint(path, {**_payload(2), "odd": _NotATensor(3)})
    assert "_NotATensor" in str(info.value)
    with pytest.raises(CheckpointError, match="Can't pickle"):
        save_checkpoint(path, {**_payload(2), "fn": lambda: None})
    assert load_checkpoint(path)["iter_num"] == 1
    assert _temp_files(tmp_path) == []


# ----------------------------------------------------------------------------------------------
# crashes


class _Crash(BaseException):
    """Stands in for the process dying: not an Exception, so nothing converts or handles it."""


@pytest.mark.slow
def test_crash_before_any_filesystem_step_leaves_both_names_loadable(tmp_path, monkeypatch):
    steps_seen = 0
    for k in range(100):
        d = tmp_path / f"crash_at_{k}"
        d.mkdir()
        path = d / "ckpt.pt"
        save_checkpoint(path, _payload(1))
        save_checkpoint(path, _payload(2))

        count = 0

        def crashing(real):
            def op(*args, **kwargs):
                nonlocal count
                count += 1
                if count > k:
                    raise _Crash
                return real(*args, **kwargs)

            return op

        finished = False
        with monkeypatch.context() as m:
            m.setattr(ckpt, "_discard", lambda p: None)  # a dead process cleans nothing up
            for name in ("replace", "link", "unlink", "fsync"):
                m.setattr(os, name, crashing(getattr(os, name)))
            try:
                save_checkpoint(path, _payload(3))
                finished = True
            except _Crash:
                pass

        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the current name must never need the fallback
            payload, used = load_latest_good(path)
        assert used == path
        assert payload["iter_num"] in ({3} if finished else {2, 3})
        assert load_checkpoint(prev_path(path))["iter_num"] in {1, 2}

        # The next save cleans up the dead process's temp files and works normally.
        save_checkpoint(path, _payload(4))
        assert load_checkpoint(path)["iter_num"] == 4
        assert load_checkpoint(prev_path(path))["iter_num"] in {2, 3}
        assert _temp_files(d) == []
        if finished:
            steps_seen = k
            break
    assert steps_seen >= 8, "the save should consist of several separately crashable steps"


def _save_forever(path, start, done, big):
    for i in range(start, start + 10_000):
        save_checkpoint(path, {"iter_num": i, "tag": torch.tensor([i]), "big": big})
        done.value = i


@pytest.mark.slow
def test_writer_killed_at_random_moments_never_loses_the_checkpoint(tmp_path):
    ctx = multiprocessing.get_context("fork")
    path = tmp_path / "ckpt.pt"
    # Built in the parent: the child only serializes, so no torch thread pool runs after fork.
    big = torch.zeros(1 << 20)
    save_checkpoint(path, {"iter_num": 0, "tag": torch.tensor([0]), "big": big})
    rng = random.Random(0)
    last = 0
    for _ in range(8):
        done = ctx.Value("q", last)
        child = ctx.Process(target=_save_forever, args=(str(path), last + 1, done, big))
        child.start()
        time.sleep(rng.uniform(0.02, 0.3))
        os.kill(child.pid, signal.SIGKILL)
        child.join()
        assert child.exitcode == -signal.SIGKILL

        with warnings.catch_warnings():
            warnings.simplefilter("error")
            payload, used = load_latest_good(path)
        assert used == path
        # Either the last save that returned, or one that was committed just before the kill.
        assert payload["iter_num"] in {done.value, done.value + 1}
        assert payload["tag"].item() == payload["iter_num"]
        if prev_path(path).exists():
            # Equal when killed after the rotation but before the new file was renamed into
            # place: both names then hold the same complete checkpoint.
            assert load_checkpoint(prev_path(path))["iter_num"] <= payload["iter_num"]
        last = payload["iter_num"]
    assert last > 8, "the writer should have completed saves between kills"
    save_checkpoint(path, {"iter_num": last + 1, "tag": torch.tensor([last + 1]), "big": big})
    assert _temp_files(tmp_path) == []


# ----------------------------------------------------------------------------------------------
# corruption


def test_truncated_file_is_detected_and_latest_good_falls_back_to_prev(tmp_path):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, _payload(1))
    save_checkpoint(path, _payload(2))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])

    with pytest.raises(CheckpointError, match="truncated") as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)

    with pytest.warns(RuntimeWarning, match="falling back") as record:
        payload, used = load_latest_good(path)
    assert used == prev_path(path) and payload["iter_num"] == 1
    assert str(path) in str(record[0].message)

    # Without its sidecar the truncation is still caught, by the zip reader.
    sidecar_path(path).unlink()
    with pytest.raises(CheckpointError, match="truncated or corrupt") as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)


def test_flipped_byte_is_detected_although_torch_load_would_accept_it(tmp_path):
    path = tmp_path / "ckpt.pt"
    value = 12345.678
    save_checkpoint(path, {"w": torch.full((256,), value)})
    data = bytearray(path.read_bytes())
    offset = data.index(struct.pack("<f", value) * 4) + 1
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))

    # torch does not check the zip CRCs: the damaged weight loads silently...
    silently = torch.load(path, weights_only=True)
    assert not torch.equal(silently["w"], torch.full((256,), value))
    # ...which is why the sidecar hash exists.
    with pytest.raises(CheckpointError, match="sha256") as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)


def test_damaged_sidecar_is_reported_by_name(tmp_path):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, _payload(1))
    sidecar_path(path).write_text("{not json")
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert str(sidecar_path(path)) in str(info.value)


def test_corrupt_current_file_is_not_rotated_over_a_good_prev(tmp_path):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, _payload(1))
    save_checkpoint(path, _payload(2))
    data = path.read_bytes()
    path.write_bytes(data[:-10])
    with pytest.warns(RuntimeWarning, match="not keeping"):
        save_checkpoint(path, _payload(3))
    assert load_checkpoint(path)["iter_num"] == 3
    assert load_checkpoint(prev_path(path))["iter_num"] == 1


def test_nothing_loadable_lists_every_path_tried(tmp_path):
    path = tmp_path / "ckpt.pt"
    with pytest.raises(CheckpointError, match="no checkpoint file"):
        load_checkpoint(path)
    path.write_bytes(b"garbage")
    prev_path(path).write_bytes(b"")
    with pytest.raises(CheckpointError, match="no loadable checkpoint") as info:
        load_latest_good(path)
    assert str(path) in str(info.value) and str(prev_path(path)) in str(info.value)


# ----------------------------------------------------------------------------------------------
# security


class _RunsCode:
    """Unpickling this runs a shell command: the classic malicious-checkpoint payload."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")
@pytest.mark.parametrize("form", ["torch.save", "torch.save legacy", "pickle", "forged sidecar"])
def test_code_carrying_file_is_refused_and_never_runs(tmp_path, form):
    # Control: the same object really does run code under plain unpickling.
    control = tmp_path / "CONTROL"
    pickle.loads(pickle.dumps(_RunsCode(control)))
    assert control.exists()

    marker = tmp_path / "PWNED"
    evil = {"model": {"w": torch.zeros(2)}, "iter_num": 5, "x": _RunsCode(marker)}
    path = tmp_path / "ckpt.pt"
    if form == "pickle":
        with open(path, "wb") as f:
            pickle.dump(evil, f, protocol=4)
    else:
        torch.save(evil, path, _use_new_zipfile_serialization=(form != "torch.save legacy"))
    if form == "forged sidecar":
        # The hash is for accidents, not a trust signal: a matching sidecar changes nothing.
        data = path.read_bytes()
        sidecar_path(path).write_text(
            json.dumps({"size": len(data), "sha256": hashlib.sha256(data).hexdigest()})
        )

    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)
    if form != "pickle":  # a protocol-4 pickle is refused before its GLOBAL is even reached
        assert "system" in str(info.value) and "run code" in str(info.value)
    with pytest.raises(CheckpointError):
        read_nanogpt_checkpoint(path)
    assert not marker.exists()


def test_latest_good_skips_code_carrying_file_without_running_it(tmp_path):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, _payload(1))
    save_checkpoint(path, _payload(2))
    marker = tmp_path / "PWNED"
    torch.save({"x": _RunsCode(marker)}, path)
    sidecar_path(path).unlink()
    with pytest.warns(RuntimeWarning, match="falling back"):
        payload, used = load_latest_good(path)
    assert used == prev_path(path) and payload["iter_num"] == 1
    assert not marker.exists()


# ----------------------------------------------------------------------------------------------
# nanoGPT


def _nanogpt_state(n_layer=2, n_embd=8, block_size=4, vocab_size=11):
    g = torch.Generator().manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=g)

    sd = {"transformer.wte.weight": r(vocab_size, n_embd), "transformer.wpe.weight": r(block_size, n_embd)}
    for i in range(n_layer):
        h = f"transformer.h.{i}."
        sd[h + "ln_1.weight"], sd[h + "ln_1.bias"] = r(n_embd), r(n_embd)
        sd[h + "attn.c_attn.weight"], sd[h + "attn.c_attn.bias"] = r(3 * n_embd, n_embd), r(3 * n_embd)
        sd[h + "attn.c_proj.weight"], sd[h + "attn.c_proj.bias"] = r(n_embd, n_embd), r(n_embd)
        # Old nanoGPT registered the causal mask as a buffer named `bias`.
        sd[h + "attn.bias"] = torch.tril(torch.ones(block_size, block_size)).view(1, 1, block_size, block_size)
        sd[h + "ln_2.weight"], sd[h + "ln_2.bias"] = r(n_embd), r(n_embd)
        sd[h + "mlp.c_fc.weight"], sd[h + "mlp.c_fc.bias"] = r(4 * n_embd, n_embd), r(4 * n_embd)
        sd[h + "mlp.c_proj.weight"], sd[h + "mlp.c_proj.bias"] = r(n_embd, 4 * n_embd), r(n_embd)
    sd["transformer.ln_f.weight"], sd["transformer.ln_f.bias"] = r(n_embd), r(n_embd)
    sd["lm_head.weight"] = sd["transformer.wte.weight"]  # weight tying, as in nanoGPT
    return sd


@pytest.mark.parametrize("prefix", ["_orig_mod.", "module.", "module._orig_mod.", ""])
def test_read_nanogpt_checkpoint_strips_prefixes_and_mask_buffers(tmp_path, prefix):
    model_args = dict(n_layer=2, n_head=2, n_embd=8, block_size=4, bias=True, vocab_size=11, dropout=0.0)
    state = _nanogpt_state()
    params = [t for k, t in state.items() if not k.endswith(".attn.bias")]
    opt = torch.optim.AdamW([torch.nn.Parameter(p.clone()) for p in params[:3]], lr=1e-3)
    for p in opt.param_groups[0]["params"]:
        p.grad = torch.ones_like(p)
    opt.step()
    config = {"batch_size": 12, "learning_rate": 6e-4, "dataset": "shakespeare_char", "compile": True}
    path = tmp_path / "ckpt.pt"
    # Exactly what nanoGPT's train.py writes: a plain torch.save, no sidecar.
    torch.save(
        {
            "model": {prefix + k: v for k, v in state.items()},
            "optimizer": opt.state_dict(),
            "model_args": model_args,
            "iter_num": 250,
            "best_val_loss": torch.tensor(1.4695),
            "config": config,
        },
        path,
    )

    args, sd, extra = read_nanogpt_checkpoint(path)
    assert args == model_args
    expected = {k: v for k, v in state.items() if not k.endswith(".attn.bias")}
    assert sorted(sd) == sorted(expected)
    for k, v in expected.items():
        assert torch.equal(sd[k], v), k
    assert "transformer.h.0.attn.c_attn.bias" in sd  # the real parameter is kept
    assert not any(k.endswith(".attn.bias") for k in sd)
    assert sorted(extra) == ["best_val_loss", "config", "iter_num", "optimizer"]
    assert extra["iter_num"] == 250 and extra["config"] == config
    assert isinstance(extra["best_val_loss"], float) and abs(extra["best_val_loss"] - 1.4695) < 1e-6
    _assert_same(extra["optimizer"], opt.state_dict())


def test_nanogpt_attn_bias_that_is_not_a_mask_is_kept(tmp_path):
    path = tmp_path / "ckpt.pt"
    state = {"_orig_mod.blk.attn.bias": torch.ones(8), "blk.attn.weight": torch.ones(8, 8)}
    torch.save({"model": state, "model_args": dict(n_layer=1, n_head=1, n_embd=8, block_size=4, vocab_size=5)}, path)
    _, sd, extra = read_nanogpt_checkpoint(path)
    assert sorted(sd) == ["blk.attn.bias", "blk.attn.weight"] and extra == {}


def test_nanogpt_checkpoint_with_missing_keys_or_clashing_prefixes_is_rejected(tmp_path):
    path = tmp_path / "ckpt.pt"
    args = dict(n_layer=1, n_head=1, n_embd=8, block_size=4, vocab_size=5)
    torch.save({"model": {"w": torch.ones(1)}}, path)
    with pytest.raises(CheckpointError, match="missing 'model_args'") as info:
        read_nanogpt_checkpoint(path)
    assert str(path) in str(info.value)

    torch.save({"model_args": args, "iter_num": 3}, path)
    with pytest.raises(CheckpointError, match="missing 'model'"):
        read_nanogpt_checkpoint(path)

    save_checkpoint(path, {"format": "blockloop-ckpt-v1", "model": {}, "model_config": {}})
    with pytest.raises(CheckpointError, match="blockloop checkpoint"):
        read_nanogpt_checkpoint(path)

    torch.save({"model": {"w": torch.ones(1)}, "model_args": {"n_layer": 1}}, path)
    sidecar_path(path).unlink()
    with pytest.raises(CheckpointError, match="lacks n_head"):
        read_nanogpt_checkpoint(path)

    torch.save({"model": {"module.w": torch.ones(1), "w": torch.zeros(1)}, "model_args": args}, path)
    with pytest.raises(CheckpointError, match="both become 'w'"):
        read_nanogpt_checkpoint(path)
