"""Loss parity of blockloop's CPU dropout with torch's: same code, seeds and batches, two masks.

    python benchmarks/bench_dropout_loss.py [--seeds 1 2 3 4] [--iters 1000] [--json OUT]

Trains nanoGPT's CPU baby model (4 x 128, context 64, batch 12, lr 1e-3) with dropout 0.2 on the
prepared `data/shakespeare_char`, once per seed with blockloop's dropout (`blockloop/dropout.py`)
and once with torch's (`nn.Dropout` and `scaled_dot_product_attention` patched into the model
for that run). Everything else is shared: initial weights, batches (a function of seed and
step) and the schedule, so the two runs of a seed differ only in the dropout draws. Reports
both best validation losses per seed and the seed-paired difference with its 95% Student-t
interval (`blockloop.stats.paired_difference`). This checks what `bench_loss_vs_nanogpt.py`
cannot separate from data order: that the faster masks train like torch's.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import blockloop.model as model_module  # noqa: E402
from blockloop.config import parse_train_args  # noqa: E402
from blockloop.stats import paired_difference  # noqa: E402
from blockloop.train import train  # noqa: E402

BABY_DROPOUT = ["--device=cpu", "--compile=False", "--block_size=64", "--batch_size=12",
                "--n_layer=4", "--n_head=4", "--n_embd=128", "--dropout=0.2",
                "--eval_interval=250", "--eval_iters=100", "--log_interval=1000",
                "--progress=False"]


def torch_attention(q, k, v, dropout_p):
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)


@contextmanager
def torch_dropout():
    """Models built inside use torch's dropout module and attention dropout."""
    saved = model_module.Dropout, model_module.causal_attention
    model_module.Dropout, model_module.causal_attention = torch.nn.Dropout, torch_attention
    try:
        yield
    finally:
        model_module.Dropout, model_module.causal_attention = saved


def best_val_loss(seed: int, iters: int, out_dir: Path) -> float:
    argv = [str(REPO / "config" / "train_shakespeare_char.py"), *BABY_DROPOUT,
            f"--seed={seed}", f"--max_iters={iters}", f"--lr_decay_iters={iters}",
            f"--out_dir={out_dir}"]
    cfg, overrides = parse_train_args(argv)
    return train(cfg, overrides, log=lambda *args, **kwargs: None).best_val_loss


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4])
    parser.add_argument("--iters", type=int, default=1000)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if len(args.seeds) < 2:
        parser.error("--seeds: give at least 2 (the difference needs an interval)")
    losses = {"blockloop": [], "torch": []}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            losses["blockloop"].append(best_val_loss(seed, args.iters, Path(tmp) / f"b{seed}"))
            with torch_dropout():
                losses["torch"].append(best_val_loss(seed, args.iters, Path(tmp) / f"t{seed}"))
            print(f"seed {seed}: blockloop {losses['blockloop'][-1]:.4f}, "
                  f"torch {losses['torch'][-1]:.4f}", flush=True)
    diff = paired_difference(losses["blockloop"], losses["torch"])
    print(f"blockloop - torch: {diff['mean_diff']:+.4f} [{diff['low']:+.4f}, {diff['high']:+.4f}]"
          f" (95% t interval, {diff['n']} seeds), p = {diff['p_value']:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"iters": args.iters, "seeds": args.seeds,
                                               "best_val_loss": losses,
                                               "difference": diff}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
