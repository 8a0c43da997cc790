"""Loss parity with nanoGPT: the same CPU "baby" run with both codebases, best validation loss.

    python benchmarks/bench_loss_vs_nanogpt.py --nanogpt_dir DIR [--iters 2000] [--json OUT]

Runs nanoGPT's `train.py` (from a checkout at DIR; not shipped with blockloop) and `blockloop
train` one after the other with nanoGPT's CPU baby settings (4 layers x 128, context 64, batch
12, no dropout, no compile) on the same prepared `data/shakespeare_char` (linked into the
checkout as data/blockloop_shakespeare_char, so its own data is left alone), and reports each run's best validation loss, its wall time per
iteration and the difference. The two draw different batches (each has its own sampler), so a
difference of a few thousandths is expected from the data order alone; issue 16 asks for 0.02.
"""

from __future__ import annotations

import argparse
import json
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


def run_nanogpt(nanogpt_dir: Path, iters: int, out_dir: Path) -> dict:
    """nanoGPT's best val loss and the run's wall time."""
    cmd = [sys.executable, "train.py", "config/train_shakespeare_char.py", *BABY_FLAGS,
           f"--dataset={NANO_DATASET}",
           f"--max_iters={iters}", f"--lr_decay_iters={iters}", f"--out_dir={out_dir}",
           "--always_save_checkpoint=False"]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=nanogpt_dir, capture_output=True, text=True, check=True)
    wall = time.time() - t0
    vals = [float(m.group(3)) for m in NANO_VAL.finditer(proc.stdout)]
    return {"best_val_loss": min(vals), "evals": len(vals), "wall_s": wall}


def run_blockloop(iters: int, out_dir: Path) -> dict:
    """blockloop's best val loss (from metrics.jsonl) and the run's wall time."""
    cmd = [sys.executable, "-m", "blockloop", "train", "config/train_shakespeare_char.py",
           *BABY_FLAGS, f"--max_iters={iters}", f"--lr_decay_iters={iters}",
           f"--out_dir={out_dir}", "--progress=False"]
    t0 = time.time()
    subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=True)
    wall = time.time() - t0
    vals = [json.loads(line)["val_loss"] for line in (out_dir / "metrics.jsonl").open()
            if '"kind": "eval"' in line]
    return {"best_val_loss": min(vals), "evals": len(vals), "wall_s": wall}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nanogpt_dir", required=True, help="a karpathy/nanoGPT checkout")
    parser.add_argument("--data_dir", default=str(REPO / "data" / "shakespeare_char"))
    parser.add_argument("--iters", type=int, default=2000)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    nanogpt_dir, data_dir = Path(args.nanogpt_dir), Path(args.data_dir)
    link_data(nanogpt_dir, data_dir)
    with tempfile.TemporaryDirectory() as tmp:
        nano = run_nanogpt(nanogpt_dir, args.iters, Path(tmp) / "nano")
        print("nanoGPT  ", nano, flush=True)
        ours = run_blockloop(args.iters, Path(tmp) / "ours")
        print("blockloop", ours, flush=True)
    diff = ours["best_val_loss"] - nano["best_val_loss"]
    result = {"iters": args.iters, "nanogpt": nano, "blockloop": ours,
              "best_val_loss_difference": diff, "within_0.02": abs(diff) <= 0.02,
              "wall_ratio_nanogpt_over_blockloop": nano["wall_s"] / ours["wall_s"]}
    print(f"best val loss: blockloop {ours['best_val_loss']:.4f}, nanoGPT "
          f"{nano['best_val_loss']:.4f}, difference {diff:+.4f} (within 0.02: "
          f"{result['within_0.02']}); whole-run wall ratio {result['wall_ratio_nanogpt_over_blockloop']:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
