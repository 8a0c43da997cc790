"""Loss parity with nanoGPT: the same CPU "baby" run with both codebases, best validation loss.

    python benchmarks/bench_loss_vs_nanogpt.py --nanogpt_dir DIR [--size baby|6x384]
        [--iters 2000] [--json OUT]

Runs nanoGPT's `train.py` (from a checkout at DIR; not shipped with blockloop) and `blockloop
train` side by side, one thread each, on the same prepared `data/shakespeare_char` (linked into
the checkout as data/blockloop_shakespeare_char, so its own data is left alone), with nanoGPT's
CPU baby settings (4 layers x 128, context 64, batch 12, no dropout, no compile) or, with
`--size 6x384`, its Shakespeare config (6 layers x 384, context 256, dropout 0.2) at batch 8
instead of 64, evaluated every 100 iterations on 20 batches (a 2000-iteration 6x384 run took
2.4 hours side by side on a 2-core CPU: pass fewer `--iters`). The logs go to `--work_dir` (default: a
temporary folder), so a long run can be watched and its evaluations read if it is stopped. Reports each run's best validation loss, its wall time and
the difference. The two draw different batches (each has its own sampler), so a difference of
a few thousandths is expected from the data order alone; issue 16 asks for 0.02. The wall
times are not a speed comparison (`bench_training.py` is).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pickle
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BABY_FLAGS = ["--device=cpu", "--compile=False", "--eval_iters=200", "--eval_interval=250",
              "--log_interval=50", "--block_size=64", "--batch_size=12", "--n_layer=4",
              "--n_head=4", "--n_embd=128", "--dropout=0.0"]
SIZE_FLAGS = {
    "baby": BABY_FLAGS,
    "6x384": ["--device=cpu", "--compile=False", "--eval_iters=20", "--eval_interval=100",
              "--log_interval=50", "--batch_size=8", "--dropout=0.2"],
}
NANO_VAL = re.compile(r"step (\d+): train loss ([0-9.]+), val loss ([0-9.]+)")


NANO_DATASET = "blockloop_shakespeare_char"  # a folder of its own: the checkout's data stays


def link_data(nanogpt_dir: Path, data_dir: Path) -> None:
    """Make nanoGPT read blockloop's prepared Tiny Shakespeare from data/NANO_DATASET of the
    checkout: train.bin and val.bin linked, and the meta.pkl nanoGPT reads its vocabulary size
    from (without it nanoGPT would build a 50304-entry embedding). The pickle is written here,
    for nanoGPT; blockloop never reads one."""
    target = nanogpt_dir / "data" / NANO_DATASET
    target.mkdir(parents=True, exist_ok=True)
    for name in ("train.bin", "val.bin"):
        link = target / name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to((data_dir / name).resolve())
    vocab_size = json.loads((data_dir / "meta.json").read_text())["vocab_size"]
    with open(target / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": vocab_size}, f)


def nanogpt_command(flags: list, iters: int, out_dir: Path) -> list:
    return [sys.executable, "train.py", "config/train_shakespeare_char.py", *flags,
            f"--dataset={NANO_DATASET}", f"--max_iters={iters}", f"--lr_decay_iters={iters}",
            f"--out_dir={out_dir}", "--always_save_checkpoint=False"]


def blockloop_command(flags: list, iters: int, out_dir: Path) -> list:
    return [sys.executable, "-m", "blockloop", "train", "config/train_shakespeare_char.py",
            *flags, f"--max_iters={iters}", f"--lr_decay_iters={iters}",
            f"--out_dir={out_dir}", "--progress=False"]


def run_side_by_side(commands: dict, log_dir: Path) -> dict:
    """Start every `{name: (command, cwd)}` at once with one thread each, output into
    log_dir/<name>.log; {name: (output, seconds until that command ended)}. Raises
    CalledProcessError for a command that fails."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    t0, procs, ended = time.time(), {}, {}
    for name, (cmd, cwd) in commands.items():
        with open(log_dir / f"{name}.log", "w") as log:
            procs[name] = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log,
                                           stderr=subprocess.STDOUT)
    try:
        # Until both end, or one fails (no point waiting hours for the other).
        while len(ended) < len(procs) and not any(p.returncode for p in procs.values()):
            time.sleep(0.5)
            for name, proc in procs.items():
                if name not in ended and proc.poll() is not None:
                    ended[name] = time.time() - t0
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.terminate()
                proc.wait()
    for name in ended:
        if procs[name].returncode:
            raise subprocess.CalledProcessError(procs[name].returncode, commands[name][0],
                                                (log_dir / f"{name}.log").read_text())
    return {name: ((log_dir / f"{name}.log").read_text(), ended[name]) for name in procs}


def nanogpt_result(stdout: str, wall: float) -> dict:
    """nanoGPT's best val loss (from its log) and the run's wall time."""
    vals = [float(m.group(3)) for m in NANO_VAL.finditer(stdout)]
    return {"best_val_loss": min(vals), "evals": len(vals), "wall_s": wall}


def blockloop_result(out_dir: Path, wall: float) -> dict:
    """blockloop's best val loss (from metrics.jsonl) and the run's wall time."""
    vals = [json.loads(line)["val_loss"] for line in (out_dir / "metrics.jsonl").open()
            if '"kind": "eval"' in line]
    return {"best_val_loss": min(vals), "evals": len(vals), "wall_s": wall}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nanogpt_dir", required=True, help="a karpathy/nanoGPT checkout")
    parser.add_argument("--data_dir", default=str(REPO / "data" / "shakespeare_char"))
    parser.add_argument("--size", choices=tuple(SIZE_FLAGS), default="baby")
    parser.add_argument("--iters", type=int, default=2000)
    parser.add_argument("--json", default=None)
    parser.add_argument("--work_dir", default=None,
                        help="folder for both runs' logs and outputs (default: a temporary one)")
    args = parser.parse_args(argv)
    nanogpt_dir, data_dir = Path(args.nanogpt_dir), Path(args.data_dir)
    link_data(nanogpt_dir, data_dir)
    flags = SIZE_FLAGS[args.size]
    with contextlib.ExitStack() as cleanup:
        work = Path(args.work_dir or cleanup.enter_context(tempfile.TemporaryDirectory()))
        work.mkdir(parents=True, exist_ok=True)
        nano_dir, our_dir = work / "nano", work / "ours"
        runs = run_side_by_side({
            "nanogpt": (nanogpt_command(flags, args.iters, nano_dir), nanogpt_dir),
            "blockloop": (blockloop_command(flags, args.iters, our_dir), REPO)}, work)
        nano = nanogpt_result(*runs["nanogpt"])
        ours = blockloop_result(our_dir, runs["blockloop"][1])
    print("nanoGPT  ", nano, flush=True)
    print("blockloop", ours, flush=True)
    diff = ours["best_val_loss"] - nano["best_val_loss"]
    result = {"size": args.size, "iters": args.iters, "nanogpt": nano, "blockloop": ours,
              "best_val_loss_difference": diff, "within_0.02": abs(diff) <= 0.02}
    print(f"best val loss: blockloop {ours['best_val_loss']:.4f}, nanoGPT "
          f"{nano['best_val_loss']:.4f}, difference {diff:+.4f} (within 0.02: "
          f"{result['within_0.02']})")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
