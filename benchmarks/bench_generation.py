"""Generation benchmark: the loop-aware KV cache against recomputation, and per-token exit.

Two questions, each answered side by side in one process (runs alternate, medians reported, so
a machine that slows down mid-benchmark affects both sides alike):

1. How much faster is cached generation than nanoGPT's recomputation of the whole context per
   token (`GPT.generate`)? 500 new tokens at block_size 256 from a one-token prompt, for a plain
   and a looped model of the same depth (random weights: speed does not depend on them). Past
   block_size the cache either re-prefills every step (`refill_keep = block_size`, exact, the
   default) or re-prefills half a window every half window (`refill_keep = block_size // 2`);
   both are measured, and a run that stays within block_size shows the cache's own speed.
2. Generation past block_size with rotary positions: a RoPE model (6x384, nanoGPT's Shakespeare
   shape, random weights) is given a full window (block_size 256 tokens) and generates 500 more,
   with its rolling cache (one cached single-token step per token; sliding-window attention, see
   blockloop/sampling.py) against recomputing the last block_size tokens for every new token.
   With --rope_out_dir (a trained RoPE run), also the validation loss of both past block_size:
   the rolling cache computes sliding-window attention, not the recomputed window, and only a
   trained model tells how far apart the two are.
3. What does per-token adaptive exit buy and cost? On a looped model trained briefly on
   shakespeare_char (or a checkpoint given with --out_dir), held-out sequences are decoded token
   by token through the cache (teacher-forced) with adaptive exit, at thresholds taken from the
   per-token deltas the model actually shows; reported: mean iterations per token, the decoding
   time against fixed iterations, and the validation loss against the full forward pass. The
   same timing on a 4x wider model with random weights shows the speed once blocks, not the
   per-iteration exit check, dominate a decoding step.

`python benchmarks/bench_generation.py [--quick] [--only cache|rope|exit] [--out_dir DIR]
[--rope_out_dir DIR] [--threads N]` prints one JSON object per measurement; `run(quick)`
returns them as a list of dicts.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from blockloop.model import GPT, GPTConfig  # noqa: E402
from blockloop.checkpoint import find_run_checkpoint, load_model  # noqa: E402
from blockloop.sampling import generate, teacher_forced_logits  # noqa: E402
DEFAULT_DATA_DIR = REPO / "data" / "shakespeare_char"

# Same depth (6 block applications per token) with and without looping, so the two rows differ
# only in how the depth is obtained.
SPEED_MODELS = {
    "plain": dict(n_layer=6),
    "looped": dict(n_layer=3, loop_center_idx=1, max_loops=4, loop_input_injection="add"),
}


def _model(block_size: int, vocab_size: int, n_embd: int = 128, **kw) -> GPT:
    torch.manual_seed(0)
    cfg = GPTConfig(block_size=block_size, vocab_size=vocab_size, n_head=4, n_embd=n_embd,
                    dropout=0.0, **kw)
    return GPT(cfg).eval()


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def _alternate(fns: dict, repeats: int) -> tuple[dict, dict]:
    """Each callable run in turn `repeats` times (order rotated per round): median seconds, and
    each one's last result."""
    times = {name: [] for name in fns}
    results = {}
    names = list(fns)
    for r in range(repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:
            seconds, results[name] = _timed(fns[name])
            times[name].append(seconds)
    return {name: statistics.median(ts) for name, ts in times.items()}, results


def cache_speed(quick: bool) -> list[dict]:
    block_size = 64 if quick else 256
    new_tokens = 120 if quick else 500
    within = block_size - 1
    repeats = 1 if quick else 3
    rows = []
    prompt = torch.zeros((1, 1), dtype=torch.long)
    for name, kw in SPEED_MODELS.items():
        model = _model(block_size, 65, **kw)

        def cached(n, keep=None):
            return lambda: generate(model, prompt, n, temperature=1.0,
                                    generator=torch.Generator().manual_seed(0), refill_keep=keep)

        def recompute(n):
            return lambda: model.generate(prompt, n, temperature=1.0,
                                          generator=torch.Generator().manual_seed(0))

        with torch.no_grad():
            med, out = _alternate(
                {
                    "recompute": recompute(new_tokens),
                    "cache_exact": cached(new_tokens),
                    "cache_half": cached(new_tokens, block_size // 2),
                    "recompute_within": recompute(within),
                    "cache_within": cached(within),
                },
                repeats,
            )
        # The exact cache must reproduce GPT.generate token for token.
        same = torch.equal(out["cache_exact"][0], out["recompute"])
        for mode, n, cache_key, ref_key in [
            ("exact refill (refill_keep=block_size)", new_tokens, "cache_exact", "recompute"),
            ("half-window refill (refill_keep=block_size//2)", new_tokens, "cache_half", "recompute"),
            ("within block_size", within, "cache_within", "recompute_within"),
        ]:
            rows.append({
                "benchmark": "cache_vs_recompute",
                "model": name,
                "block_size": block_size,
                "new_tokens": n,
                "mode": mode,
                "recompute_s": round(med[ref_key], 4),
                "cache_s": round(med[cache_key], 4),
                "speedup": round(med[ref_key] / med[cache_key], 2),
                "repeats": repeats,
                "exact_equals_generate": same,
            })
    return rows


# nanoGPT's Shakespeare shape with rotary positions (quick: a small one).
ROPE_MODEL = {"n_layer": 6, "n_head": 6, "n_embd": 384, "position_embedding": "rope"}
ROPE_MODEL_QUICK = {"n_layer": 2, "n_head": 4, "n_embd": 64, "position_embedding": "rope"}


def rope_rolling(quick: bool) -> list[dict]:
    """A RoPE model generating past a full window: rolling cache against recomputation."""
    block_size = 64 if quick else 256
    new_tokens = 120 if quick else 500
    repeats = 1 if quick else 3
    shape = ROPE_MODEL_QUICK if quick else ROPE_MODEL
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=block_size, vocab_size=65, dropout=0.0, **shape)).eval()
    prompt = torch.randint(0, 65, (1, block_size), generator=torch.Generator().manual_seed(1))

    def run(use_cache):
        return lambda: generate(model, prompt, new_tokens, temperature=1.0, use_cache=use_cache,
                                generator=torch.Generator().manual_seed(0))

    with torch.no_grad():
        med, out = _alternate({"recompute": run(False), "rolling": run(True)}, repeats)
    stats = out["rolling"][1]
    return [{
        "benchmark": "rope_rolling_cache_vs_recompute",
        "model": dict(shape),
        "block_size": block_size,
        "prompt_tokens": block_size,
        "new_tokens": new_tokens,
        "recompute_s": round(med["recompute"], 3),
        "rolling_s": round(med["rolling"], 3),
        "speedup": round(med["recompute"] / med["rolling"], 2),
        "rolling_full_forwards": stats["full_forwards"],
        "rolling_cached_steps": stats["cached_steps"],
        "repeats": repeats,
        "threads": torch.get_num_threads(),
        "note": "rolling = sliding-window attention, not the recomputed window (sampling.py)",
    }]


def rope_window_loss(out_dir: str, quick: bool) -> list[dict]:
    """Teacher-forced validation loss of a trained RoPE run over 4 x block_size tokens, within
    and past block_size, rolling cache against the recomputed window (`refill_keep`)."""
    model, payload = load_model(find_run_checkpoint(out_dir), "cpu")
    if model.config.position_embedding != "rope":
        return [{"benchmark": "rope_window_loss", "skipped": f"{out_dir} is not a RoPE model"}]
    block = model.config.block_size
    val = _val_tokens(Path((payload.get("meta") or {}).get("data_dir", DEFAULT_DATA_DIR)))
    length, n_seq = 4 * block, 4 if quick else 24
    starts = np.linspace(0, len(val) - length - 1, n_seq).astype(np.int64)
    idx = torch.from_numpy(np.stack([val[s: s + length] for s in starts]))
    rows = []
    for mode, keep in (("recomputed window", block), ("rolling cache", None)):
        seconds, (logits, stats) = _timed(lambda k=keep: teacher_forced_logits(model, idx, 1,
                                                                               refill_keep=k))
        ce = F.cross_entropy(logits.transpose(1, 2), idx[:, 1:], reduction="none")
        rows.append({
            "benchmark": "rope_window_loss", "model": out_dir, "mode": mode,
            "block_size": block, "sequences": n_seq, "tokens_per_sequence": length,
            # Logit row j predicts token j + 1 from j + 1 tokens of context: rows 0 .. block-1
            # fit in one window, the rest are past it.
            "val_loss_within_block": round(float(ce[:, :block].mean()), 4),
            "val_loss_past_block": round(float(ce[:, block:].mean()), 4),
            "seconds": round(seconds, 2), "full_forwards": stats["full_forwards"],
        })
    return rows


def _train_looped(data_dir: Path, steps: int) -> tuple[GPT, np.ndarray]:
    """A small looped model trained for `steps` AdamW steps on the dataset; and its val tokens."""
    from blockloop.data import TokenDataset

    data = TokenDataset(data_dir)
    model = _model(128, data.vocab_size, n_layer=3, loop_center_idx=1, max_loops=4,
                   loop_input_injection="add")
    opt = model.configure_optimizers(0.1, 2e-3, (0.9, 0.99), "cpu")
    model.train()
    for step in range(steps):
        x, y = data.get_batch("train", 8, 128, seed=0, step=step)
        _, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    val = np.memmap(data.bin_path("val"), dtype=np.dtype(data.meta["dtype"]), mode="r")
    return model.eval(), np.asarray(val, dtype=np.int64)


def _token_deltas(model: GPT, seqs: list[torch.Tensor]) -> torch.Tensor:
    """Per-token delta_t for t = 2 .. max_loops-1 (those the exit rule compares), full loops."""
    traced = GPT(GPTConfig(**dict(model.config.to_dict(), loops_representation=True))).eval()
    traced.load_state_dict(model.state_dict())
    out = []
    with torch.no_grad():
        for seq in seqs:
            traced(seq, loop_exit=False)
            for unit in traced.last_loop_trace.units:
                for t in range(2, traced.config.max_loops):
                    new, old = unit.states[t], unit.states[t - 1]
                    out.append(((new - old).norm(dim=-1) / (old.norm(dim=-1) + 1e-6)).flatten())
    return torch.cat(out)


def _exit_rows(model: GPT, seqs: list[torch.Tensor], quantiles, repeats: int, source: str) -> list[dict]:
    """Adaptive against fixed iterations, decoding `seqs` one at a time (batch 1, so a token's
    exit really skips work), at thresholds = quantiles of the model's own token deltas."""
    deltas = _token_deltas(model, seqs)
    with torch.no_grad():
        full_loss = statistics.fmean(
            float(model(s[:, :-1], s[:, 1:], loop_exit=False)[1]) for s in seqs
        )

    def decode(threshold):
        def fn():
            losses, iters, blocks = [], [], []
            for s in seqs:
                logits, stats = teacher_forced_logits(
                    model, s, 1, adaptive_exit=threshold is not None, exit_threshold=threshold
                )
                losses.append(float(F.cross_entropy(logits[0], s[0, 1:])))
                iters.append(stats["mean_iterations"])
                blocks.append(stats["mean_block_applications"])
            return statistics.fmean(losses), statistics.fmean(iters), statistics.fmean(blocks)
        return fn

    rows = []
    for q in quantiles:
        threshold = float(torch.quantile(deltas, q))
        med, out = _alternate({"fixed": decode(None), "adaptive": decode(threshold)}, repeats)
        fixed_loss, _, fixed_blocks = out["fixed"]
        loss, iters, blocks = out["adaptive"]
        rows.append({
            "benchmark": "adaptive_exit",
            "model": source,
            "n_embd": model.config.n_embd,
            "max_loops": model.config.max_loops,
            "threshold": round(threshold, 5),
            "threshold_quantile_of_token_deltas": q,
            "sequences": len(seqs),
            "tokens_per_sequence": seqs[0].shape[1],
            "mean_iterations": round(iters, 3),
            # Hardware-independent: block applications per token, fixed over adaptive.
            "block_applications_ratio": round(fixed_blocks / blocks, 3),
            "fixed_s": round(med["fixed"], 4),
            "adaptive_s": round(med["adaptive"], 4),
            "speedup_vs_fixed": round(med["fixed"] / med["adaptive"], 3),
            "val_loss_full_forward": round(full_loss, 5),
            "val_loss_cached_fixed": round(fixed_loss, 5),
            "val_loss_adaptive": round(loss, 5),
            "val_loss_change": round(loss - full_loss, 5),
            "repeats": repeats,
        })
    return rows


def _val_tokens(data_dir: Path) -> np.ndarray:
    from blockloop.data import TokenDataset

    data = TokenDataset(data_dir)
    val = np.memmap(data.bin_path("val"), dtype=np.dtype(data.meta["dtype"]), mode="r")
    return np.asarray(val, dtype=np.int64)


def adaptive_exit(quick: bool, out_dir: str | None, data_dir: Path) -> list[dict]:
    """Loss and speed of per-token exit on a trained model, and speed alone on a wider one."""
    if out_dir is not None:
        model, payload = load_model(find_run_checkpoint(out_dir), "cpu")
        meta = payload.get("meta") or {}
        if model.loop_plan is None:
            return [{"benchmark": "adaptive_exit", "skipped": f"{out_dir} holds a model without looping"}]
        val = _val_tokens(Path(meta.get("data_dir", data_dir)))
        source = str(out_dir)
    else:
        if not (data_dir / "meta.json").is_file():
            return [{"benchmark": "adaptive_exit",
                     "skipped": f"no dataset at {data_dir}; run `blockloop prepare shakespeare_char`"}]
        steps = 40 if quick else 300
        model, val = _train_looped(data_dir, steps)
        source = f"looped n_layer=3 loop 1x4 add, trained {steps} steps on {data_dir.name}"
    length = min(model.config.block_size, 64 if quick else 128)
    n_seq = 2 if quick else 8
    starts = np.linspace(0, len(val) - length - 1, n_seq).astype(np.int64)
    seqs = [torch.from_numpy(val[s : s + length].copy())[None] for s in starts]
    repeats = 1 if quick else 3
    rows = _exit_rows(model, seqs, (0.25, 0.5, 0.75), repeats, source)
    # At n_embd 128 a token's exit check costs about what a block application does on CPU; a
    # wider model (random weights: its losses mean nothing) shows the speed once blocks dominate.
    wide = _model(length, model.config.vocab_size, n_embd=512, n_layer=3, loop_center_idx=1,
                  max_loops=4, loop_input_injection="add")
    return rows + _exit_rows(wide, seqs, (0.5,), repeats, "same shape, n_embd=512, random weights")


def run(quick: bool, out_dir: str | None = None, data_dir: Path = DEFAULT_DATA_DIR,
        only: str | None = None, rope_out_dir: str | None = None) -> list[dict]:
    parts = {
        "cache": lambda: cache_speed(quick),
        "rope": lambda: rope_rolling(quick) + (
            rope_window_loss(rope_out_dir, quick) if rope_out_dir else []),
        "exit": lambda: adaptive_exit(quick, out_dir, Path(data_dir)),
    }
    return [row for name, part in parts.items() if only in (None, name) for row in part()]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small sizes, one repeat (a smoke run)")
    p.add_argument("--only", choices=["cache", "rope", "exit"], default=None,
                   help="run one part: the cache, RoPE's rolling cache, or adaptive exit")
    p.add_argument("--rope_out_dir", default=None,
                   help="a trained RoPE run: its loss past block_size, rolling vs recomputed")
    p.add_argument("--out_dir", default=None, help="use this run's checkpoint for adaptive exit")
    p.add_argument("--data_dir", default=str(DEFAULT_DATA_DIR), help="dataset for the trained model")
    # One thread by default: the figures are ratios, and the machine is often shared.
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    for row in run(args.quick, args.out_dir, Path(args.data_dir), args.only, args.rope_out_dir):
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
