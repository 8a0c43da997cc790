"""Training benchmarks: against nanoGPT, CPU dropout, loop overhead, MFU, compile, memory, bf16.

Timings on a shared machine are noisy, so every comparison is paired: the contenders run
alternately in one process, many rounds, and we report medians and their ratio. Absolute
numbers are only meaningful on a GPU (or a quiet machine) and are labelled as such.

    python benchmarks/bench_training.py [--quick] [--nanogpt_dir DIR] [--json OUT]

`--nanogpt_dir` points at a checkout of karpathy/nanoGPT (not shipped with blockloop); its
`model.py` is imported from there to time nanoGPT's training step on the same batches.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import blockloop.dropout as dropout_module  # noqa: E402
from blockloop.dropout import causal_attention, dropout  # noqa: E402
from blockloop.model import GPT, GPTConfig  # noqa: E402
from blockloop.runtime import keep_freed_memory  # noqa: E402
from blockloop.stats import mean_interval  # noqa: E402

BABY = dict(n_layer=4, n_head=4, n_embd=128, block_size=64, vocab_size=65, bias=False, dropout=0.0)
BABY_BATCH = 12
SHAKESPEARE = dict(n_layer=6, n_head=6, n_embd=384, block_size=256, vocab_size=65, bias=False, dropout=0.0)
# nanoGPT's config/train_shakespeare_char.py trains this model with dropout 0.2.
SHAKESPEARE_DROPOUT = {**SHAKESPEARE, "dropout": 0.2}


def measure_peak_flops(dtype=torch.float32, n=2048, repeats=5) -> float:
    """FLOP/s of the best of several large square matmuls: the peak MFU is measured against."""
    a = torch.randn(n, n, dtype=dtype)
    b = torch.randn(n, n, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def training_step(model, optimizer, ctx, x, y):
    """One optimiser step as `blockloop.train` takes it: forward under `ctx`, backward,
    gradient clipping at 1.0, the optimizer step, gradients cleared. x, y: (B, T) token ids.
    Returns the loss tensor (no `.item()`: a host sync would be timed too)."""
    with ctx:
        _, loss = model(x, y)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss


def make_step(model, batch, block_size, vocab, autocast_dtype=None, opt=None):
    """A closure running one optimiser step of `model` on fixed random tokens (`opt`: the
    optimizer, default plain AdamW)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, vocab, (batch, block_size), generator=g)
    y = torch.randint(0, vocab, (batch, block_size), generator=g)
    opt = opt if opt is not None else torch.optim.AdamW(model.parameters(), lr=1e-4)
    ctx = torch.autocast("cpu", dtype=autocast_dtype) if autocast_dtype else nullcontext()

    def step():
        training_step(model, opt, ctx, x, y)

    return step


def paired_times(steps: dict, rounds: int, warmup: int = 2) -> dict:
    """Median seconds per call of each step, called alternately so load drifts hit all alike."""
    for fn in steps.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in steps}
    for _ in range(rounds):
        for name, fn in steps.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def load_nanogpt(nanogpt_dir: str):
    spec = importlib.util.spec_from_file_location("nanogpt_model", Path(nanogpt_dir) / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def own_optimizer(model):
    """The optimizer each project's training script builds, with nanoGPT's Shakespeare
    settings: both GPTs have `configure_optimizers(weight_decay, lr, betas, device_type)`
    (blockloop fuses the AdamW update on CPU, nanoGPT on CUDA only)."""
    return model.configure_optimizers(0.1, 1e-3, (0.9, 0.99), "cpu")


def bench_vs_nanogpt(nanogpt_dir, config, batch, rounds) -> dict:
    """blockloop's training step against nanoGPT's on the same batches, each with its own
    optimizer (`own_optimizer`), alternating in this one process: the difference of the model
    and optimizer code alone. Medians and their ratio."""
    nano = load_nanogpt(nanogpt_dir)
    torch.manual_seed(0)
    ours = GPT(GPTConfig(**config))
    nano_model = nano.GPT(nano.GPTConfig(**config))
    block, vocab = config["block_size"], config["vocab_size"]
    med = paired_times(
        {
            "blockloop": make_step(ours, batch, block, vocab, opt=own_optimizer(ours)),
            "nanogpt": make_step(nano_model, batch, block, vocab, opt=own_optimizer(nano_model)),
        },
        rounds,
    )
    return {
        "blockloop_ms": med["blockloop"] * 1e3,
        "nanogpt_ms": med["nanogpt"] * 1e3,
        "speedup_vs_nanogpt": med["nanogpt"] / med["blockloop"],
        "blockloop_tokens_per_s": batch * block / med["blockloop"],
    }


# The comparisons with nanoGPT: its CPU baby config, its Shakespeare config (batch 8 instead of
# 64, a CPU budget) and the same without dropout.
CONFIGS = {"baby": (BABY, BABY_BATCH), "6x384": (SHAKESPEARE_DROPOUT, 8),
           "6x384_no_dropout": (SHAKESPEARE, 8)}


def worker_step_ms(project: str, nanogpt_dir: str, config_name: str, steps: int) -> float:
    """Median ms of `steps` training steps (after warm-up) in this process, set up as that
    project's training script sets up its process: `blockloop train` keeps freed memory
    (`runtime.keep_freed_memory`), nanoGPT's train.py changes nothing."""
    config, batch = CONFIGS[config_name]
    torch.manual_seed(0)
    if project == "blockloop":
        keep_freed_memory()
        model = GPT(GPTConfig(**config))
    else:
        nano = load_nanogpt(nanogpt_dir)
        model = nano.GPT(nano.GPTConfig(**config))
    step = make_step(model, batch, config["block_size"], config["vocab_size"],
                     opt=own_optimizer(model))
    return paired_times({project: step}, steps, warmup=3)[project] * 1e3


def bench_vs_nanogpt_processes(nanogpt_dir, config_name, rounds, steps) -> dict:
    """The training step as each project's own training process runs it (`worker_step_ms`):
    one fresh process per project per round, alternating (the order swapped every round);
    medians over rounds of each process's median step, and their ratio. This is the
    comparison a user sees, process-wide settings included."""
    times = {"blockloop": [], "nanogpt": []}
    for r in range(rounds):
        for project in (("blockloop", "nanogpt") if r % 2 == 0 else ("nanogpt", "blockloop")):
            out = subprocess.run(
                [sys.executable, __file__, "--worker", project, "--nanogpt_dir", nanogpt_dir,
                 "--worker_config", config_name, "--worker_steps", str(steps)],
                check=True, capture_output=True, text=True)
            times[project].append(float(out.stdout.split()[-1]))
    ours, theirs = statistics.median(times["blockloop"]), statistics.median(times["nanogpt"])
    ratios = [n / b for b, n in zip(times["blockloop"], times["nanogpt"])]
    return {"blockloop_ms": ours, "nanogpt_ms": theirs, "speedup_vs_nanogpt": theirs / ours,
            "rounds": rounds, "steps_per_process": steps, "round_ratios": ratios,
            "median_round_ratio": statistics.median(ratios), **ratio_interval(ratios)}


def ratio_interval(ratios) -> dict:
    """Geometric mean of per-round speed ratios with its 95% t interval (on log ratios, so a
    round twice as fast and one twice as slow cancel), and whether it clears issue 16's 1.10x."""
    if len(ratios) < 2:
        return {}
    log = mean_interval(np.log(ratios))
    mean, low, high = (math.exp(log[k]) for k in ("mean", "low", "high"))
    return {"geometric_mean_ratio": mean, "ratio_95ci": [low, high],
            "target_1.10x": "met" if mean >= 1.10 else "not met",
            "interval_above_1.10x": low >= 1.10}


def bench_loop_overhead(rounds) -> dict:
    """A block looped to effective depth D against a plain D-layer model of the same width, each
    with the optimizer `blockloop train` builds (fused AdamW): at the baby size (2 blocks, one
    looped 3 times, against 4 layers; also with the loop trace on) and at nanoGPT's 6x384
    Shakespeare size with dropout 0.2 (4 blocks, one looped 3 times, against 6 layers; batch 8,
    a third of the rounds)."""
    def step(config, batch, **extra):
        torch.manual_seed(0)
        model = GPT(GPTConfig(**{**config, **extra}))
        return make_step(model, batch, config["block_size"], config["vocab_size"],
                         opt=own_optimizer(model))

    looped = dict(loop_center_idx=1, max_loops=3)
    baby = paired_times({
        "looped": step(BABY, BABY_BATCH, n_layer=2, **looped),
        "plain": step(BABY, BABY_BATCH, n_layer=4),
        "traced": step(BABY, BABY_BATCH, n_layer=2, loops_representation=True, **looped),
    }, rounds)
    big = paired_times({
        "looped": step(SHAKESPEARE_DROPOUT, 8, n_layer=4, **looped),
        "plain": step(SHAKESPEARE_DROPOUT, 8, n_layer=6),
    }, max(3, rounds // 3), warmup=1)
    return {
        "looped_ms": baby["looped"] * 1e3,
        "plain_ms": baby["plain"] * 1e3,
        "looped_over_plain": baby["looped"] / baby["plain"],
        "trace_on_over_off": baby["traced"] / baby["looped"],
        "6x384_dropout_looped_ms": big["looped"] * 1e3,
        "6x384_dropout_plain_ms": big["plain"] * 1e3,
        "6x384_dropout_looped_over_plain": big["looped"] / big["plain"],
    }


def bench_dropout(rounds) -> dict:
    """blockloop's CPU dropout against torch's at the 6x384 shapes (batch 8, context 256,
    p = 0.2): mask draws per second, the residual dropout of a (8, 256, 384) activation, and
    causal attention with dropout, forward and backward, for each query block size of
    `blockloop.dropout` against `scaled_dot_product_attention` (its math fallback)."""
    n = 8 * 6 * 256 * 256
    draws = paired_times({
        "bernoulli_": lambda: torch.empty(n).bernoulli_(0.8),
        "int32 random_": lambda: torch.empty(n, dtype=torch.int32).random_()}, rounds)
    x = torch.randn(8, 256, 384)
    residual = paired_times({"torch": lambda: F.dropout(x, 0.2, True),
                             "blockloop": lambda: dropout(x, 0.2, True)}, rounds)
    q, k, v = (torch.randn(8, 6, 256, 64, requires_grad=True) for _ in range(3))
    grad = torch.randn(8, 6, 256, 64)

    def attention(fn, block=None):
        def run():
            if block is not None:
                dropout_module.QUERY_BLOCK = block
            fn(q, k, v).backward(grad)
        return run

    default_block = dropout_module.QUERY_BLOCK
    sdpa = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, dropout_p=0.2, is_causal=True)  # noqa: E731
    steps = {"sdpa": attention(sdpa)}
    for block in (32, 64, 128, 256):
        steps[f"block_{block}"] = attention(lambda q, k, v: causal_attention(q, k, v, 0.2), block)
    try:
        attn = paired_times(steps, rounds)
    finally:
        dropout_module.QUERY_BLOCK = default_block
    return {
        "draws_per_s": {name: n / t for name, t in draws.items()},
        "residual_dropout_ms": {name: t * 1e3 for name, t in residual.items()},
        "residual_speedup": residual["torch"] / residual["blockloop"],
        "attention_ms": {name: t * 1e3 for name, t in attn.items()},
        "attention_speedup": {name: attn["sdpa"] / t for name, t in attn.items() if name != "sdpa"},
    }


def saved_activation_bytes(model, x, y) -> int:
    """Bytes of tensors autograd keeps for the backward pass (what grows with iterations)."""
    total = 0
    seen = set()

    def pack(t):
        nonlocal total
        key = (t.untyped_storage().data_ptr(), t.dtype)
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _, loss = model(x, y)
    loss.backward()
    return total


def bench_memory(loop_counts=(1, 2, 4, 8, 16)) -> list[dict]:
    """Activation memory of one training step against max_loops, three ways of backpropagating."""
    rows = []
    cfg = dict(BABY, n_layer=3)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 65, (BABY_BATCH, 64), generator=g)
    y = torch.randint(0, 65, (BABY_BATCH, 64), generator=g)
    for loops in loop_counts:
        row = {"max_loops": loops}
        for mode, extra in (
            ("full", {}),
            ("truncated_k2", {"loop_backprop_depth": 2}),
            ("checkpointed", {"loop_checkpointing": True}),
        ):
            torch.manual_seed(0)
            model = GPT(GPTConfig(**cfg, loop_center_idx=1, max_loops=loops, loop_input_injection="add", **extra))
            row[f"{mode}_MiB"] = saved_activation_bytes(model, x, y) / 2**20
        rows.append(row)
    return rows


def bench_cpu_bf16(rounds) -> dict:
    """fp32 against bf16 autocast on CPU for the 6x384 Shakespeare model (a GPU-sized config)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(**SHAKESPEARE))
    batch = 8
    med = paired_times(
        {
            "fp32": make_step(model, batch, 256, 65),
            "bf16": make_step(model, batch, 256, 65, autocast_dtype=torch.bfloat16),
        },
        rounds,
        warmup=1,
    )
    return {"fp32_ms": med["fp32"] * 1e3, "bf16_ms": med["bf16"] * 1e3, "bf16_speedup": med["fp32"] / med["bf16"]}


def bench_compile(rounds) -> dict:
    """torch.compile against eager for a training step (compile time excluded, reported apart)."""
    out = {}
    for name, extra in (("plain", {}), ("looped_1x3", {"n_layer": 2, "loop_center_idx": 1, "max_loops": 3})):
        torch.manual_seed(0)
        eager = GPT(GPTConfig(**{**BABY, **extra}))
        torch.manual_seed(0)
        compiled = torch.compile(GPT(GPTConfig(**{**BABY, **extra})))
        compiled_step = make_step(compiled, BABY_BATCH, 64, 65)
        t0 = time.perf_counter()
        compiled_step()
        out[f"{name}_compile_s"] = time.perf_counter() - t0
        med = paired_times({"eager": make_step(eager, BABY_BATCH, 64, 65), "compiled": compiled_step}, rounds)
        out[f"{name}_eager_ms"] = med["eager"] * 1e3
        out[f"{name}_compiled_ms"] = med["compiled"] * 1e3
        out[f"{name}_compiled_speedup"] = med["eager"] / med["compiled"]
    return out


def bench_mfu(rounds) -> dict:
    """Loop-aware MFU of the baby config, plain and looped, against the measured matmul peak."""
    peak = measure_peak_flops()
    out = {"cpu_peak_fp32_gflops": peak / 1e9}
    for name, extra in (("plain", {}), ("looped_1x3", {"n_layer": 2, "loop_center_idx": 1, "max_loops": 3})):
        torch.manual_seed(0)
        model = GPT(GPTConfig(**{**BABY, **extra}))
        med = paired_times({name: make_step(model, BABY_BATCH, 64, 65)}, rounds)[name]
        tokens_per_s = BABY_BATCH * 64 / med
        out[f"{name}_tokens_per_s"] = tokens_per_s
        out[f"{name}_mfu"] = model.estimate_mfu(tokens_per_s, peak)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer rounds (a smoke run)")
    parser.add_argument("--nanogpt_dir", default=None, help="a nanoGPT checkout to compare against")
    parser.add_argument("--json", default=None, help="write the results here as JSON")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    parser.add_argument("--worker", choices=("blockloop", "nanogpt"), help=argparse.SUPPRESS)
    parser.add_argument("--worker_config", choices=tuple(CONFIGS), help=argparse.SUPPRESS)
    parser.add_argument("--worker_steps", type=int, default=30, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        print(worker_step_ms(args.worker, args.nanogpt_dir, args.worker_config, args.worker_steps))
        return 0
    rounds = 5 if args.quick else 30
    keep_freed_memory()  # as `blockloop train` sets up its process (the workers set their own)
    results = {"date": time.strftime("%Y-%m-%d"), "threads": torch.get_num_threads(), "torch": torch.__version__}
    if args.nanogpt_dir:
        # As users run them: each project's training process (the bar of issue 16) ...
        for name, steps in (("baby", 40), ("6x384", 6), ("6x384_no_dropout", 6)):
            key = f"{name}_vs_nanogpt_processes"
            results[key] = bench_vs_nanogpt_processes(args.nanogpt_dir, name, 2 if args.quick else 8,
                                                      steps)
            print(f"{name} vs nanoGPT, own processes", results[key], flush=True)
        # ... and the model and optimizer code alone, in one process.
        results["baby_vs_nanogpt"] = bench_vs_nanogpt(args.nanogpt_dir, BABY, BABY_BATCH, rounds)
        print("baby vs nanoGPT, one process", results["baby_vs_nanogpt"], flush=True)
        results["shakespeare_vs_nanogpt"] = bench_vs_nanogpt(
            args.nanogpt_dir, SHAKESPEARE_DROPOUT, 8, max(3, rounds // 6)
        )
        print("6x384 vs nanoGPT (batch 8), one process", results["shakespeare_vs_nanogpt"],
              flush=True)
    results["dropout"] = bench_dropout(max(5, rounds // 3))
    print("dropout", results["dropout"], flush=True)
    results["loop_overhead"] = bench_loop_overhead(rounds)
    print("loop overhead", results["loop_overhead"], flush=True)
    results["mfu"] = bench_mfu(rounds)
    print("mfu", results["mfu"], flush=True)
    results["compile"] = bench_compile(rounds)
    print("compile", results["compile"], flush=True)
    results["memory"] = bench_memory()
    for row in results["memory"]:
        print("memory", row, flush=True)
    results["cpu_bf16"] = bench_cpu_bf16(max(3, rounds // 6))
    print("cpu bf16", results["cpu_bf16"], flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
