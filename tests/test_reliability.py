"""Fault injection through training and the CLI: kills, signals, NaNs, bad files, full disks.

The claim under test: a run can be killed at any moment and lose nothing, and no file it opens
runs anyone's code. Each test attacks the program from outside (a real SIGKILL/SIGINT/SIGTERM
to a real `blockloop train` process) or at a precise point inside it (a monkeypatched step,
write or open), then checks against an uninterrupted run, bit for bit. Every run uses
`--threads=1`: CPU results are then bit-reproducible across processes, and a 2-core machine
shared with other work is not slowed by thread contention.
"""

import errno
import io
import json
import os
import pickle
import random
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import blockloop.checkpoint as ckpt
import blockloop.train as train_mod
from blockloop import cli
from blockloop.checkpoint import load_checkpoint, load_latest_good
from blockloop.model import GPT
from blockloop.train import TrainingData
from tests.conftest import read_metrics, run, tiny_args, write_token_dataset

REPO = Path(__file__).resolve().parent.parent
# Exercise the stochastic paths (dropout, sampled loop counts, loop noise also in evaluation):
# they are what an inexact resume would get wrong.
STOCHASTIC = ("--loop_center_idx=1", "--max_loops=2", "--loop_sampling=uniform", "--dropout=0.1",
              "--loop_noise_scale=0.1", "--loop_noise_in_eval=True")
# Wall-clock fields differ between any two runs; everything else in metrics.jsonl must not.
TIMING_KEYS = {"time_s", "time_ms", "tokens_per_sec"}


def args(data, out, *extra):
    return tiny_args(data, out, "--threads=1", *STOCHASTIC, *extra)


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    # --threads=1 sets torch's global thread count; later tests must get the default back.
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture
def data(tmp_path):
    return write_token_dataset(tmp_path / "data")


def comparable_metrics(out):
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in read_metrics(out)]


def assert_tensors_equal(a, b, where):
    assert a.keys() == b.keys(), where
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]), f"{where}[{k}]"
        elif isinstance(a[k], dict):
            assert_tensors_equal(a[k], b[k], f"{where}[{k}]")
        else:
            assert a[k] == b[k], f"{where}[{k}]"


def assert_same_training(ref, got):
    """last.pt, best.pt (weights and optimizer state) and metrics.jsonl equal, bit for bit."""
    for name in ("last.pt", "best.pt"):
        a, b = load_checkpoint(ref / name), load_checkpoint(got / name)
        assert (a["iter_num"], a["best_val_loss"]) == (b["iter_num"], b["best_val_loss"]), name
        assert_tensors_equal(a["model"], b["model"], f"{name} model")
        assert_tensors_equal(a["optimizer"]["state"], b["optimizer"]["state"], f"{name} optimizer")
    assert comparable_metrics(ref) == comparable_metrics(got)


def cli_train(argv, capsys):
    """`blockloop train ARGV` in this process: (exit code, stdout, stderr)."""
    capsys.readouterr()
    rc = cli.main(["train", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_error_line(err, *needles):
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert str(needle) in lines[0], (needle, lines[0])


def launch(argv, log_dir, name):
    """A real `python -m blockloop train` process, its output in files (a pipe could fill up)."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    stdout = open(log_dir / f"{name}.out", "w")
    stderr = open(log_dir / f"{name}.err", "w")
    proc = subprocess.Popen([sys.executable, "-m", "blockloop", "train", *argv], cwd=REPO,
                            stdout=stdout, stderr=stderr, env=env)
    stdout.close()
    stderr.close()
    return proc


def logged_iters(out):
    """Iterations in metrics.jsonl so far, tolerating a line being written right now."""
    try:
        text = (out / "metrics.jsonl").read_text()
    except FileNotFoundError:
        return []
    iters = []
    for line in text.splitlines():
        try:
            iters.append(json.loads(line)["iter"])
        except (ValueError, KeyError):
            pass
    return iters


def saving_now(out):
    """True while a checkpoint's temporary file exists, i.e. a save is in progress."""
    return any(n.startswith((".last.pt", ".best.pt")) and n.endswith(".tmp") for n in os.listdir(out))


# ----------------------------------------------------------------------------------------------
# SIGKILL at random points, then resume: bit-exact


@pytest.mark.slow
def test_sigkill_at_random_points_then_resume_equals_uninterrupted_run(tmp_path, data):
    # Kills land before iteration 30 (+ poll lag), so that the 30 iterations left keep a run
    # from finishing before its kill, even on a fast machine.
    max_iters, last_target = 60, 30
    extra = (f"--max_iters={max_iters}", f"--lr_decay_iters={max_iters}", "--eval_interval=4")
    ref = tmp_path / "ref"
    run(args(data, ref, *extra))

    out, logs = tmp_path / "killed", tmp_path / "logs"
    out.mkdir()
    logs.mkdir()
    rng = random.Random(20240611)
    # Two kills of each kind, in random order: during start-up (imports, data checks, metrics
    # truncation), at a random moment after a random iteration, and while a checkpoint's
    # temporary file exists (mid-save).
    modes = ["startup", "progress", "mid-save"] * 2
    rng.shuffle(modes)
    kills, resumed_from = [], []
    newest = -1  # iteration of the newest checkpoint known to be on disk
    for n, mode in enumerate(modes):
        resume = (out / "last.pt").exists()
        before = max(logged_iters(out), default=-1)
        proc = launch(args(data, out, *extra, *(["--init_from=resume"] if resume else [])), logs, n)
        # Past iteration 5 the first checkpoint exists, so the runs after this one resume.
        target = min(max(before + rng.randint(1, 4), 5), last_target)
        start_kill_at = time.monotonic() + rng.uniform(0.05, 1.0)
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            latest = max(logged_iters(out), default=-1)
            # Kill before the run can finish, even if no save was caught in the act.
            if latest >= last_target + 10:
                break
            if mode == "startup" and time.monotonic() >= start_kill_at:
                break
            if mode != "startup" and latest >= target and (mode == "progress" or saving_now(out)):
                if mode == "progress":
                    time.sleep(rng.uniform(0, 0.05))
                break
            time.sleep(0.002)
        mid_save = saving_now(out)
        proc.send_signal(signal.SIGKILL)
        rc = proc.wait(timeout=60)
        assert rc == -signal.SIGKILL, (mode, rc, (logs / f"{n}.err").read_text())
        kills.append((mode, max(logged_iters(out), default=-1), mid_save))
        resumed_from.append(resume)
        # Nothing lost: the newest checkpoint on disk never goes back.
        if (out / "last.pt").exists():
            payload, _ = load_latest_good(out / "last.pt")
            assert payload["iter_num"] >= newest, kills
            newest = payload["iter_num"]
        else:
            assert newest == -1, kills

    assert len(kills) == 6 and sum(resumed_from) >= 3, kills
    run(args(data, out, *extra, *(["--init_from=resume"] if (out / "last.pt").exists() else [])))
    assert_same_training(ref, out)
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")]
    print(f"kills (mode, last logged iteration, mid-save): {kills}")


# ----------------------------------------------------------------------------------------------
# a crash between the saves of one evaluation (deterministic, in process)


class _Crash(BaseException):
    """Stands in for SIGKILL at one exact point: not an Exception, so nothing handles it."""


@pytest.mark.parametrize("crash_after_save", [1, 2, 3, 4])
def test_crash_after_any_checkpoint_save_then_resume_equals_uninterrupted_run(
    tmp_path, data, monkeypatch, crash_after_save
):
    extra = ("--max_iters=8", "--eval_interval=4")
    ref = tmp_path / "ref"
    run(args(data, ref, *extra))
    evals = [r for r in read_metrics(ref) if r["kind"] == "eval"]
    # Both evaluations improve, so each writes last.pt and best.pt: saves 1-4 are all there are.
    assert evals[2]["val_loss"] < evals[1]["val_loss"] < evals[0]["val_loss"]

    out, calls = tmp_path / "out", []
    real_save = train_mod.save_checkpoint

    def save_then_crash(path, payload, *a, **kw):
        real_save(path, payload, *a, **kw)
        calls.append(Path(path).name)
        if len(calls) == crash_after_save:
            raise _Crash

    monkeypatch.setattr(train_mod, "save_checkpoint", save_then_crash)
    with pytest.raises(_Crash):
        run(args(data, out, *extra))
    monkeypatch.setattr(train_mod, "save_checkpoint", real_save)
    # As a user would: resume if there is a last.pt, else start again (replacing the lone
    # best.pt, which a scratch run may only do when asked to).
    again = ["--init_from=resume"] if (out / "last.pt").exists() else ["--overwrite_out_dir=True"]
    run(args(data, out, *extra, *again))
    assert_same_training(ref, out)


# ----------------------------------------------------------------------------------------------
# SIGINT / SIGTERM


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_sigint_sigterm_finish_the_step_save_and_exit_0_then_resume_is_exact(tmp_path, data, sig):
    out, logs = tmp_path / "out", tmp_path / "logs"
    logs.mkdir()
    # max_iters far away: the run only ends because of the signal. The schedule does not depend
    # on max_iters (lr_decay_iters does), so a resumed run with a nearer max_iters is comparable.
    proc = launch(args(data, out, "--max_iters=100000"), logs, "run")
    try:
        deadline = time.monotonic() + 120
        while max(logged_iters(out), default=-1) < 5 and proc.poll() is None:
            assert time.monotonic() < deadline, (logs / "run.err").read_text()
            time.sleep(0.01)
        proc.send_signal(sig)
        rc = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:  # it ignored the signal: do not leave it running
            proc.kill()
    stdout, stderr = (logs / "run.out").read_text(), (logs / "run.err").read_text()
    assert rc == 0, stderr
    assert "Traceback" not in stderr
    last = load_checkpoint(out / "last.pt")
    stop_iter = last["iter_num"]
    # The step in flight when the signal came was finished and logged, then saved.
    trains = [r["iter"] for r in read_metrics(out) if r["kind"] == "train"]
    assert trains == list(range(stop_iter)) and stop_iter >= 6
    message = next(line for line in stdout.splitlines() if sig.name in line)
    assert f"saved {out / 'last.pt'} at iteration {stop_iter}" in message
    assert "--init_from=resume" in message

    end = f"--max_iters={stop_iter + 3}"
    run(args(data, out, end, "--init_from=resume"))
    ref = tmp_path / "ref"
    run(args(data, ref, end))
    assert_same_training(ref, out)


# ----------------------------------------------------------------------------------------------
# non-finite losses


@pytest.fixture
def hook_loss(monkeypatch):
    """Install `fn(step, loss) -> loss` on every training forward pass (not evaluation)."""
    step = {"now": None}
    real_batch = TrainingData.train_batch

    def train_batch(self, it, micro_step, rank=0):
        step["now"] = it
        return real_batch(self, it, micro_step, rank)

    monkeypatch.setattr(TrainingData, "train_batch", train_batch)

    def install(fn):
        real_forward = GPT.forward

        def forward(self, idx, targets=None, **kw):
            logits, loss = real_forward(self, idx, targets, **kw)
            if self.training and loss is not None:
                loss = fn(step["now"], loss)
            return logits, loss

        monkeypatch.setattr(GPT, "forward", forward)

    return install


def nan_at(steps):
    return lambda step, loss: loss * float("nan") if step in steps else loss


class _NaNGradient(torch.autograd.Function):
    """Identity forward, NaN backward: a finite loss whose update still destroys the weights
    (what an overflow in the backward pass does)."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def nan_gradient_at(step_to_poison):
    return lambda step, loss: _NaNGradient.apply(loss) if step == step_to_poison else loss


def all_finite(state_dict):
    return all(torch.isfinite(t).all() for t in state_dict.values())


def test_nan_loss_stops_with_step_hint_and_keeps_last_good_checkpoint(tmp_path, data, hook_loss, capsys):
    good = tmp_path / "good"
    run(args(data, good, "--max_iters=4"))
    hook_loss(nan_at({6}))
    out = tmp_path / "out"
    rc, _, err = cli_train(args(data, out, "--max_iters=12"), capsys)
    assert rc == 3
    assert_one_error_line(err, "iteration 6", "learning_rate", "float16", "--nan_policy=skip", out)
    assert [r["iter"] for r in read_metrics(out) if r["kind"] == "train"] == list(range(6))
    last = load_checkpoint(out / "last.pt")
    assert last["iter_num"] == 4
    assert_tensors_equal(last["model"], load_checkpoint(good / "last.pt")["model"], "last.pt")


def test_nan_policy_skip_skips_exactly_the_bad_batches(tmp_path, data, hook_loss, capsys):
    hook_loss(nan_at({5, 6}))
    out = tmp_path / "out"
    rc, stdout, _ = cli_train(args(data, out, "--max_iters=12", "--nan_policy=skip"), capsys)
    assert rc == 0
    records = read_metrics(out)
    assert [r["iter"] for r in records if r["kind"] == "skipped"] == [5, 6]
    assert [r["iter"] for r in records if r["kind"] == "train"] == [0, 1, 2, 3, 4, *range(7, 12)]
    assert "step 5: non-finite loss nan; batch skipped" in stdout
    last = load_checkpoint(out / "last.pt")
    assert last["iter_num"] == 12 and all_finite(last["model"])
    # A skipped batch makes no optimizer step: AdamW counted 10 updates in 12 iterations.
    assert {float(s["step"]) for s in last["optimizer"]["state"].values()} == {10.0}


@pytest.mark.parametrize("policy,poisoned", [("stop", 7), ("skip", 5)])
def test_diverged_weights_are_never_checkpointed(tmp_path, data, hook_loss, capsys, policy, poisoned):
    # The loss of the poisoned step is finite, so the step is taken and the weights become NaN;
    # the evaluation at 8 sees it first (stop: step 7 is the last before it; skip: every later
    # step is skipped). A checkpoint written then would push the last good one out of .prev.
    hook_loss(nan_gradient_at(poisoned))
    out = tmp_path / "out"
    rc, _, err = cli_train(args(data, out, "--max_iters=16", f"--nan_policy={policy}"), capsys)
    assert rc == 3
    assert_one_error_line(err, "iteration 8", "learning_rate", out)
    for name in ("last.pt", "best.pt"):
        payload = load_checkpoint(out / name)
        assert payload["iter_num"] == 4 and all_finite(payload["model"]), name


# ----------------------------------------------------------------------------------------------
# data files through `blockloop train`


def _meta(d):
    return json.loads((d / "meta.json").read_text())


def _set_meta(d, **changes):
    meta = _meta(d)
    meta.update(changes)
    (d / "meta.json").write_text(json.dumps(meta))


def _append_bytes(d, split, data):
    with open(d / f"{split}.bin", "ab") as f:
        f.write(data)


def _corrupt_token(d, split, value):
    ids = np.fromfile(d / f"{split}.bin", dtype=np.uint16)
    ids[len(ids) // 2] = value
    ids.tofile(d / f"{split}.bin")


# (name, how to break a good directory, the file the error must name)
DATA_FAULTS = [
    ("odd byte count", lambda d: _append_bytes(d, "train", b"\x00"), "train.bin"),
    ("meta says uint32", lambda d: _set_meta(d, dtype="uint32"), "train.bin"),
    ("meta dtype float32", lambda d: _set_meta(d, dtype="float32"), "meta.json"),
    ("train.bin shorter than meta",
     lambda d: _set_meta(d, train_tokens=_meta(d)["train_tokens"] + 1), "train.bin"),
    ("val.bin longer than meta", lambda d: _append_bytes(d, "val", b"\x01\x00"), "val.bin"),
    ("token id == vocab_size", lambda d: _corrupt_token(d, "val", 11), "val.bin"),
    ("token id 65535", lambda d: _corrupt_token(d, "train", 65535), "train.bin"),
    ("meta.json missing", lambda d: (d / "meta.json").unlink(), "meta.json"),
    ("meta.json not JSON", lambda d: (d / "meta.json").write_text('{"vocab_size": 11,'), "meta.json"),
    ("meta.json a list", lambda d: (d / "meta.json").write_text("[11]"), "meta.json"),
    ("meta.json binary", lambda d: (d / "meta.json").write_bytes(b"\xff\xfe\x00garbage"), "meta.json"),
    ("vocab_size a string", lambda d: _set_meta(d, vocab_size="11"), "meta.json"),
    ("vocab_size null", lambda d: _set_meta(d, vocab_size=None), "meta.json"),
    ("train.bin missing", lambda d: (d / "train.bin").unlink(), "train.bin"),
    ("data dir missing", shutil.rmtree, ""),
    ("val shorter than block_size + 1", lambda d: (
        np.arange(16, dtype=np.uint16).tofile(d / "val.bin"), _set_meta(d, val_tokens=16)), "val.bin"),
]


@pytest.mark.parametrize("fault", DATA_FAULTS, ids=[f[0] for f in DATA_FAULTS])
def test_bad_data_files_are_refused_by_name_with_exit_2(tmp_path, data, capsys, fault):
    _, breaker, filename = fault
    breaker(data)
    out = tmp_path / "out"
    rc, _, err = cli_train(args(data, out, "--max_iters=2"), capsys)
    assert rc == 2
    assert_one_error_line(err, data / filename if filename else data)
    assert not out.exists()  # refused before anything was written


@pytest.mark.slow
def test_bad_data_file_through_a_real_process(tmp_path, data):
    """The in-process tests above, once as a real command: exit status and stderr as a user sees."""
    _corrupt_token(data, "val", 11)
    argv = [sys.executable, "-m", "blockloop", "train", *args(data, tmp_path / "out", "--max_iters=2")]
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert proc.returncode == 2
    assert_one_error_line(proc.stderr, data / "val.bin", "vocab_size")


# ----------------------------------------------------------------------------------------------
# the command line: missing and unreadable paths


def deny_reads_under(monkeypatch, directory):
    """Make every open() of a file under `directory` fail with EACCES, as for a directory the
    user may not read. Simulated because the tests may run as root, whom chmod does not stop."""
    real_open = io.open
    directory = os.path.realpath(directory)

    def guarded_open(file, *a, **kw):
        if isinstance(file, (str, os.PathLike)) and os.path.realpath(file).startswith(directory + os.sep):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(file))
        return real_open(file, *a, **kw)

    # pathlib reads through io.open, numpy's memmap through the builtin.
    monkeypatch.setattr(io, "open", guarded_open)
    monkeypatch.setattr("builtins.open", guarded_open)


def test_unreadable_data_directory_is_a_clear_error(tmp_path, data, capsys, monkeypatch):
    deny_reads_under(monkeypatch, data)
    rc, _, err = cli_train(args(data, tmp_path / "out"), capsys)
    assert rc == 2
    assert_one_error_line(err, data / "meta.json", "Permission denied")


def test_unreadable_config_file_is_a_clear_error(tmp_path, data, capsys, monkeypatch):
    config = tmp_path / "conf" / "train_tiny.py"
    config.parent.mkdir()
    config.write_text("max_iters = 2\n")
    deny_reads_under(monkeypatch, config.parent)
    rc, _, err = cli_train([str(config), *args(data, tmp_path / "out")], capsys)
    assert rc == 2
    assert_one_error_line(err, config, "Permission denied")


@pytest.mark.parametrize("case", ["missing config", "config is a directory", "out_dir under a file",
                                  "missing init_from file", "resume without last.pt"])
def test_missing_paths_are_clear_errors(tmp_path, data, capsys, case):
    (tmp_path / "a_file").write_text("not a directory")
    argv, needle = {
        "missing config": ([str(tmp_path / "nope.py")], tmp_path / "nope.py"),
        "config is a directory": ([str(tmp_path)], tmp_path),
        "out_dir under a file": ([f"--out_dir={tmp_path / 'a_file' / 'out'}"], tmp_path / "a_file" / "out"),
        "missing init_from file": ([f"--init_from={tmp_path / 'none.pt'}"], "init_from"),
        "resume without last.pt": (["--init_from=resume"], tmp_path / "out" / "last.pt"),
    }[case]
    rc, _, err = cli_train([*args(data, tmp_path / "out"), *argv], capsys)
    assert rc == 2
    assert_one_error_line(err, needle)


# ----------------------------------------------------------------------------------------------
# full disk while writing a checkpoint


def test_full_disk_during_checkpoint_write_loses_no_earlier_checkpoint(tmp_path, data, capsys, monkeypatch):
    ref = tmp_path / "ref"
    run(args(data, ref, "--max_iters=12"))

    class FullDisk:
        """A checkpoint file on a disk that fills up after its first bytes."""

        def __init__(self, f):
            self._f = f

        def write(self, chunk):
            if self._f.tell() > 0:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return self._f.write(chunk)

        def __getattr__(self, name):
            return getattr(self._f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return self._f.__exit__(*exc)

    opened = {"data files": 0}

    def open_on_filling_disk(path, mode="r", *a, **kw):
        f = open(path, mode, *a, **kw)
        if mode == "xb":  # a checkpoint's temporary data file (sidecars are opened with "x")
            opened["data files"] += 1
            # The evaluation at 4 writes best.pt and last.pt; then the disk is full.
            if opened["data files"] >= 3:
                return FullDisk(f)
        return f

    # checkpoint.py's own `open`: the write fails below torch.save, as a full disk makes it.
    monkeypatch.setattr(ckpt, "open", open_on_filling_disk, raising=False)
    out = tmp_path / "out"
    rc, _, err = cli_train(args(data, out, "--max_iters=12"), capsys)
    assert rc == 2
    assert_one_error_line(err, "No space left on device", out, "unchanged")
    for name in ("last.pt", "best.pt"):
        assert load_checkpoint(out / name)["iter_num"] == 4, name
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")]

    monkeypatch.undo()  # disk space freed: resuming loses nothing
    run(args(data, out, "--max_iters=12", "--init_from=resume"))
    assert_same_training(ref, out)


# ----------------------------------------------------------------------------------------------
# checkpoints that would run code, or are not training checkpoints


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


def _write_malicious(path, marker):
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": {}, "model_config": {}, "iter_num": 4, "x": _RunsCode(marker)}, path)


def test_malicious_last_pt_is_refused_by_resume_and_never_runs(tmp_path, data, capsys):
    control = tmp_path / "CONTROL"  # the payload really runs code when unpickled normally
    pickle.loads(pickle.dumps(_RunsCode(control)))
    assert control.exists()

    marker, out = tmp_path / "PWNED", tmp_path / "out"
    _write_malicious(out / "last.pt", marker)
    rc, _, err = cli_train(args(data, out, "--init_from=resume"), capsys)
    assert rc == 2
    assert "error: " in err and "refusing to load" in err and str(out / "last.pt") in err
    assert "Traceback" not in err
    assert not marker.exists()


@pytest.mark.filterwarnings("ignore:the newest checkpoint could not be loaded", "ignore:not keeping")
def test_malicious_last_pt_falls_back_to_good_prev_without_running(tmp_path, data):
    out, marker = tmp_path / "out", tmp_path / "PWNED"
    run(args(data, out, "--max_iters=8"))
    payload = load_checkpoint(out / "last.pt")
    assert load_checkpoint(out / "last.pt.prev")["iter_num"] == 4 and payload["iter_num"] == 8
    (out / "last.pt.json").unlink()
    _write_malicious(out / "last.pt", marker)
    run(args(data, out, "--max_iters=8", "--init_from=resume"))
    assert load_checkpoint(out / "last.pt")["iter_num"] == 8
    assert not marker.exists()


def test_malicious_checkpoint_is_refused_by_sample(tmp_path, capsys):
    from blockloop import sampling

    marker, out = tmp_path / "PWNED", tmp_path / "out"
    _write_malicious(out / "best.pt", marker)
    capsys.readouterr()
    rc = sampling.main([f"--out_dir={out}", "--num_samples=1", "--max_new_tokens=2", "--device=cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and "refusing to load" in err and str(out / "best.pt") in err
    assert not marker.exists()


@pytest.mark.parametrize("payload", [
    {"model": {}},  # e.g. a nanoGPT ckpt.pt copied into out_dir
    {"format": "blockloop-ckpt-v1", "model": {"w": torch.zeros(2)}, "optimizer": {},
     "model_config": {"n_layer": 2, "n_head": 2, "n_embd": 16, "block_size": 16, "vocab_size": 11},
     "iter_num": 4, "best_val_loss": 1.0},  # the right keys, weights of another model
])
def test_resume_from_a_file_that_is_not_a_training_checkpoint_is_a_clear_error(
    tmp_path, data, capsys, payload
):
    out = tmp_path / "out"
    out.mkdir()
    ckpt.save_checkpoint(out / "last.pt", payload)
    rc, _, err = cli_train(args(data, out, "--init_from=resume"), capsys)
    assert rc == 2
    assert_one_error_line(err, out / "last.pt")
