"""DDP on CPU: `torchrun --nproc_per_node=2 -m blockloop.train` against one process.

Training splits the `gradient_accumulation_steps` micro-batches of a step across ranks by a
global micro-step index, seeds dropout and loop noise by that index, and draws loop counts from
(seed, step) only; so two ranks must end with the parameters of one process running the same
total accumulation, up to the float32 rounding of a differently ordered gradient sum. Each
launch runs under a timeout, with the whole process group killed if it hangs, and talks over
loopback only (`--standalone` rendezvous on localhost, gloo pinned to the loopback interface).

The workers import a `sitecustomize` written by the test that records each process's pid and
every checkpoint save with its rank, to check that only rank 0 writes and to signal one rank.
"""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from blockloop.checkpoint import load_checkpoint
from blockloop.config import parse_train_args
from blockloop.model import GPT
from blockloop.train import TrainingData, build_model, mix_seed
from tests.conftest import read_metrics, run, tiny_args, write_token_dataset

REPO = Path(__file__).resolve().parents[1]
LAUNCH_TIMEOUT_S = 120
ACCUM = 4  # two micro-batches per rank
# Parameters after a few AdamW steps; the only difference is the order of a gradient sum.
PARAM_TOL = dict(rtol=1e-5, atol=1e-6)

pytestmark = pytest.mark.slow

SITECUSTOMIZE = '''
import os
from pathlib import Path

_log = Path(os.environ["BLOCKLOOP_TEST_LOG"])
_rank = os.environ.get("RANK")
if _rank is not None:
    (_log / f"pid-rank{_rank}").write_text(str(os.getpid()))
    import blockloop.checkpoint as _checkpoint

    _save = _checkpoint.save_checkpoint

    def _recording_save(path, *args, **kwargs):
        with open(_log / f"saves-rank{_rank}", "a") as f:
            f.write(f"{path}\\n")
        return _save(path, *args, **kwargs)

    _checkpoint.save_checkpoint = _recording_save
'''


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_token_dataset(tmp_path_factory.mktemp("ddp") / "data")


def loopback_interface():
    return next((name for _, name in socket.if_nameindex() if name.startswith("lo")), None)


def start_ddp(args, log_dir):
    """Start 2 CPU ranks under torchrun in their own process group; returns the Popen."""
    log_dir.mkdir(parents=True, exist_ok=True)
    hook = log_dir / "hook"
    hook.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join([str(hook), str(REPO), os.environ.get("PYTHONPATH", "")]),
        BLOCKLOOP_TEST_LOG=str(log_dir),
    )
    lo = loopback_interface()
    if lo is not None:
        env["GLOO_SOCKET_IFNAME"] = lo
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "blockloop.train", *args]
    return subprocess.Popen(cmd, env=env, cwd=log_dir, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def finish(proc, timeout=LAUNCH_TIMEOUT_S):
    """Wait for a launch; a hang fails the test after killing every process it started."""
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"torchrun did not finish within {timeout} s (deadlock?):\n{output[-4000:]}")
    assert proc.returncode == 0, output[-4000:]
    return output


def train_both(data, tmp_path, *extra):
    """The same run in one process and on two ranks; returns (single out_dir, ddp out_dir, log)."""
    single, ddp, log = tmp_path / "single", tmp_path / "ddp", tmp_path / "log"
    common = ("--max_iters=4", "--eval_interval=2", f"--gradient_accumulation_steps={ACCUM}",
              *extra)
    run(tiny_args(data, single, *common))
    output = finish(start_ddp(tiny_args(data, ddp, *common), log))
    assert output.count("done: best val loss") == 1, output  # only rank 0 reports
    return single, ddp, log


def assert_same_training(single, ddp, log):
    a, b = load_checkpoint(single / "last.pt"), load_checkpoint(ddp / "last.pt")
    assert a["iter_num"] == b["iter_num"] == 4
    for name, value in a["model"].items():
        torch.testing.assert_close(b["model"][name], value, **PARAM_TOL, msg=name)
    # One metrics line per record, as in one process: no rank but 0 appended to the file.
    ra, rb = read_metrics(single), read_metrics(ddp)
    assert [(r["iter"], r["kind"]) for r in rb] == [(r["iter"], r["kind"]) for r in ra]
    for x, y in zip(ra, rb):
        for key in ("loss", "val_loss", "train_loss"):
            if key in x:
                assert y[key] == pytest.approx(x[key], rel=1e-5), (x, y)
    saves = sorted(p.name for p in log.glob("saves-rank*"))
    assert saves == ["saves-rank0"]
    assert len((log / "saves-rank0").read_text().splitlines()) >= 2  # last.pt and best.pt


def test_ddp_matches_one_process_with_dropout_and_loop_noise(data, tmp_path):
    # Dropout and loop noise are the draws that depend on how micro-steps map to ranks.
    extra = ("--loop_center_idx=1", "--max_loops=2", "--loop_input_injection=add",
             "--dropout=0.1", "--loop_noise_scale=0.1")
    assert_same_training(*train_both(data, tmp_path, *extra))


def test_ddp_matches_one_process_with_sampled_loop_counts(data, tmp_path):
    # Uniform over 1..3 iterations; with concat injection a one-iteration step leaves the
    # adapters without gradients, which DDP must tolerate (and AdamW must then skip them, as
    # in one process, rather than see zeros).
    extra = ("--loop_center_idx=1", "--max_loops=2", "--loop_input_injection=concat",
             "--loop_sampling=uniform")
    single, ddp, log = train_both(data, tmp_path, *extra)
    loops = [r["loops"] for r in read_metrics(single) if r["kind"] == "train"]
    assert 1 in loops and max(loops) > 1, loops  # the seed gives both kinds of step
    assert_same_training(single, ddp, log)


def test_ddp_matches_one_process_with_automatic_exit_in_training(data, tmp_path):
    extra = ("--loop_center_idx=1", "--max_loops=4", "--automatic_loop_exit=True",
             "--automatic_loop_exit_in_training=True", "--automatic_loop_exit_threshold=0.12")
    # The threshold makes the ranks run different numbers of iterations at step 0: rank r
    # holds global micro-batches r and r + 2. Rebuild the initial model as training does.
    cfg, overrides = parse_train_args(tiny_args(data, tmp_path / "probe", *extra))
    training_data = TrainingData(cfg)
    torch.manual_seed(mix_seed(cfg.seed, 0, 0))
    model = GPT(build_model(cfg, overrides, training_data.vocab_size)).train()
    applied = [0, 0]
    for global_micro in range(ACCUM):
        with torch.no_grad():
            model(*training_data.train_batch(0, global_micro))
        applied[global_micro % 2] += int(model.last_loop_iterations[0].sum())
    assert applied[0] != applied[1], applied
    assert_same_training(*train_both(data, tmp_path, *extra))


def test_a_signal_to_one_rank_stops_both_after_the_same_step(data, tmp_path):
    out, log = tmp_path / "out", tmp_path / "log"
    proc = start_ddp(tiny_args(data, out, "--max_iters=100000", "--eval_interval=100000",
                               f"--gradient_accumulation_steps={ACCUM}"), log)
    deadline = time.monotonic() + LAUNCH_TIMEOUT_S
    metrics = out / "metrics.jsonl"
    # The header, the evaluation at 0 and two steps.
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 4):
        if proc.poll() is not None or time.monotonic() > deadline:
            finish(proc, timeout=1)
            pytest.fail("training did not start")
        time.sleep(0.2)
    os.kill(int((log / "pid-rank1").read_text()), signal.SIGTERM)
    output = finish(proc)
    assert "stopped by a signal to another rank" in output, output
    stopped_at = load_checkpoint(out / "last.pt")["iter_num"]
    trained = [r["iter"] for r in read_metrics(out) if r["kind"] == "train"]
    assert trained == list(range(stopped_at))
