"""GPU check: training throughput of GPT-2 124M, plain and looped, with MFU and peak memory.

    python benchmarks/gpu_check.py [--batch_size 16] [--steps 50] [--json OUT]
    python benchmarks/gpu_check.py --dry_run      # CPU, tiny model: checks the script itself

Two variants of the same effective depth are timed on synthetic random tokens, each with
AdamW (fused on CUDA, through `GPT.configure_optimizers`), bf16 autocast and torch.compile, as
`blockloop.train` runs them:

    plain    GPT-2 124M: 12 blocks, width 768, 12 heads, context 1024, vocabulary 50304
    looped   6 blocks, the whole range looped twice (`loop_groups=[[0, 5]]`, `max_loops=2`,
             "add" injection as config/train_gpt2_loop_*.py): 12 block applications, the
             parameters of 6 blocks

After `--warmup` steps (compilation happens in the first), `--steps` steps are timed between
`torch.cuda.synchronize()` calls. MFU is `GPT.flops_per_token()` (every iteration of the loop
counted) times tokens/s over the datasheet's dense bf16 tensor-core peak of the device
(`PEAK_BF16_FLOPS`, or `--peak_flops`); a device missing from the table gets MFU "n/a" and the
reason, never a guessed peak. Peak memory is `torch.cuda.max_memory_allocated()` per variant.
Each finished variant is printed and written to `--json` at once, so a run stopped by a timeout
keeps what it measured.

`--dry_run` runs the same code on the CPU with a tiny model (4 blocks of width 64, context 32;
the looped variant loops blocks 0-1 twice), float32, no compile, 3 + 5 steps: MFU and peak
memory are n/a there. The test suite runs it through `benchmarks/gpu_check.sh`.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import re
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_training import training_step  # noqa: E402
from blockloop.model import GPT, GPTConfig  # noqa: E402
from blockloop.runtime import autocast_context  # noqa: E402

# nanoGPT's GPT-2 small as config/train_gpt2.py trains it (no biases, no dropout).
GPT2_124M = dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50304,
                 bias=False, dropout=0.0)
DRY_RUN_MODEL = dict(n_layer=4, n_head=2, n_embd=64, block_size=32, vocab_size=256,
                     bias=False, dropout=0.0)
VARIANTS = ("plain", "looped")

# Dense (no sparsity) bf16 tensor-core peaks from NVIDIA's datasheets, keyed by a full match of
# `torch.cuda.get_device_name()` without its "NVIDIA " prefix. Datasheets quote the sparse
# figure, twice these. Only parts whose reported name identifies the peak are listed: an "H100"
# could be SXM (989.4), PCIe (756) or NVL, and a name we cannot tell apart gets no number.
PEAK_BF16_FLOPS = (
    (r"H100 80GB HBM3|H100 SXM5?( 80GB)?", 989.4e12, "H100 SXM"),
    (r"H100 PCIe", 756e12, "H100 PCIe"),
    # H200 SXM: the H100 SXM's tensor cores with more memory. "H200 NVL" does not match.
    (r"H200( 141GB HBM3e)?", 989.4e12, "H200 SXM"),
    # Every A100 (SXM4 or PCIe, 40 or 80 GB) has the same tensor-core peak.
    (r"A100[- ].*", 312e12, "A100"),
    (r"L4", 121e12, "L4"),
)


def peak_bf16_flops(device_name: str) -> tuple[float | None, str]:
    """(dense bf16 peak FLOP/s, where it comes from) for a CUDA device name; (None, why) for a
    device not in `PEAK_BF16_FLOPS`."""
    name = re.sub(r"^NVIDIA\s+", "", device_name.strip())
    for pattern, peak, part in PEAK_BF16_FLOPS:
        if re.fullmatch(pattern, name):
            return peak, f"{part} datasheet, dense bf16"
    return None, (f"device {device_name!r} is not in the peak table (PEAK_BF16_FLOPS in "
                  f"benchmarks/gpu_check.py); pass --peak_flops to compute MFU")


def variant_config(base: dict, variant: str) -> GPTConfig:
    """The GPTConfig of `variant`: `base` itself ("plain"), or its first half of blocks with
    the whole range looped twice ("looped", the same effective depth)."""
    if variant == "plain":
        return GPTConfig(**base)
    half = base["n_layer"] // 2
    return GPTConfig(**{**base, "n_layer": half, "loop_groups": [[0, half - 1]], "max_loops": 2,
                        "loop_input_injection": "add"})


@dataclass
class Settings:
    """How the variants are timed (resolved from the command line)."""

    dry_run: bool
    device: str
    dtype: str
    compile: bool
    batch_size: int
    warmup: int
    steps: int
    peak_flops: float | None
    peak_source: str
    model: dict


def resolve_settings(args) -> Settings:
    """Settings for `args`: the GPU defaults, or the CPU dry run. Exits (status 1) when no
    CUDA device is there and `--dry_run` was not given."""
    if args.dry_run:
        peak, source = args.peak_flops, "--peak_flops"
        if peak is None:
            source = "dry run on the CPU: no datasheet peak"
        return Settings(True, "cpu", args.dtype or "float32", bool(args.compile),
                        args.batch_size or 4,
                        3 if args.warmup is None else args.warmup,
                        5 if args.steps is None else args.steps, peak, source, DRY_RUN_MODEL)
    if not torch.cuda.is_available():
        sys.exit("gpu_check: CUDA is not available here; use --dry_run for the CPU check")
    if args.peak_flops is not None:
        peak, source = args.peak_flops, "--peak_flops"
    elif args.dtype == "float32":
        # The table holds bf16 tensor-core peaks; float32 runs against another peak.
        peak, source = None, "the peak table is for bf16; pass --peak_flops for float32"
    else:
        peak, source = peak_bf16_flops(torch.cuda.get_device_name())
    compile_ = True if args.compile is None else args.compile
    return Settings(False, "cuda", args.dtype or "bfloat16", compile_, args.batch_size or 16,
                    5 if args.warmup is None else args.warmup,
                    50 if args.steps is None else args.steps, peak, source, GPT2_124M)


def environment(settings: Settings) -> dict:
    """The machine and software the figures were measured with."""
    cuda = settings.device == "cuda"
    cpu = f"CPU ({platform.processor() or platform.machine()})"
    return {
        "device": torch.cuda.get_device_name() if cuda else cpu,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "python": platform.python_version(),
        "peak_flops": settings.peak_flops,
        "peak_source": settings.peak_source,
    }


def synthetic_batches(vocab: int, batch: int, block: int, device: str, n: int = 2):
    """`n` (x, y) batches of uniform random token ids, made once on the device: no data loading
    in the timed loop, and more than one batch so nothing is tuned to a single input."""
    g = torch.Generator().manual_seed(1337)
    out = []
    for _ in range(n):
        xy = torch.randint(0, vocab, (2, batch, block), generator=g)
        out.append((xy[0].to(device), xy[1].to(device)))
    return out


def make_step(model, optimizer, ctx, batches):
    """A closure running training step i: forward under autocast, backward, gradient
    clipping at 1.0 and the AdamW step, as `blockloop.train` does. Returns the loss tensor
    (not `.item()`: a host sync per step would be timed too)."""

    def step(i: int):
        return training_step(model, optimizer, ctx, *batches[i % len(batches)])

    return step


def synchronize(device: str) -> None:
    """Wait for queued device work, so wall-clock intervals cover it."""
    if device == "cuda":
        torch.cuda.synchronize()


def timed_steps(step, settings: Settings) -> tuple[float, float, float]:
    """(warm-up seconds, seconds for the timed steps, last loss)."""
    t0 = time.perf_counter()
    for i in range(settings.warmup):
        step(i)
    synchronize(settings.device)
    t1 = time.perf_counter()
    for i in range(settings.steps):
        loss = step(settings.warmup + i)
    synchronize(settings.device)
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1, float(loss.detach())


def build(settings: Settings, variant: str):
    """(the GPT of `variant` on the device, what runs its step: compiled or not)."""
    torch.manual_seed(0)
    model = GPT(variant_config(settings.model, variant)).to(settings.device).train()
    return model, torch.compile(model) if settings.compile else model


def run_variant(settings: Settings, variant: str) -> dict:
    """Train `variant` for the warm-up and timed steps; its figures as a dict."""
    if settings.device == "cuda":
        gc.collect()  # the previous variant's model and optimizer, so its memory is not counted
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    model, runner = build(settings, variant)
    optimizer = model.configure_optimizers(0.1, 6e-4, (0.9, 0.95), settings.device)
    cfg = model.config
    batches = synthetic_batches(cfg.vocab_size, settings.batch_size, cfg.block_size,
                                settings.device)
    step = make_step(runner, optimizer, autocast_context(settings.device, settings.dtype),
                     batches)
    warmup_s, seconds, loss = timed_steps(step, settings)
    tokens_per_s = settings.steps * settings.batch_size * cfg.block_size / seconds
    flops = model.flops_per_token()
    mfu = None if settings.peak_flops is None else flops * tokens_per_s / settings.peak_flops
    peak_mem = torch.cuda.max_memory_allocated() if settings.device == "cuda" else None
    return {
        "variant": variant, "n_layer": cfg.n_layer, "effective_depth": model.effective_depth(),
        "loop_groups": cfg.loop_groups, "max_loops": cfg.max_loops,
        "params": model.get_num_params(), "flops_per_token": flops,
        "optimizer_fused": bool(optimizer.defaults.get("fused")),
        "step_ms": 1000 * seconds / settings.steps, "warmup_s": warmup_s,
        "tokens_per_s": tokens_per_s, "mfu": mfu, "peak_memory_bytes": peak_mem,
        "last_loss": loss,
    }


def format_row(r: dict) -> str:
    """One table row for a result of `run_variant`."""
    mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
    mem = "n/a" if r["peak_memory_bytes"] is None else f"{r['peak_memory_bytes'] / 2**30:.2f} GiB"
    blocks = f"{r['n_layer']} -> {r['effective_depth']}"
    return (f"| {r['variant']} | {blocks} | {r['params'] / 1e6:.1f}M | {r['step_ms']:.1f} | "
            f"{r['tokens_per_s']:,.0f} | {mfu} | {mem} | {r['warmup_s']:.1f} | "
            f"{r['last_loss']:.3f} |")


TABLE_HEADER = (
    "| variant | blocks -> depth | params | step ms | tokens/s | MFU | peak memory | "
    "warm-up s | last loss |\n|---|---|---|---|---|---|---|---|---|"
)


def describe(settings: Settings, env: dict) -> str:
    """The lines printed before the table: what runs where."""
    peak = "n/a" if settings.peak_flops is None else f"{settings.peak_flops / 1e12:.1f} TFLOP/s"
    m = settings.model
    return "\n".join([
        f"device: {env['device']}",
        f"torch {env['torch']}, CUDA {env['cuda']}, cuDNN {env['cudnn']}, "
        f"Python {env['python']}",
        f"peak: {peak} ({settings.peak_source})",
        f"model: {m['n_layer']} x {m['n_embd']}, {m['n_head']} heads, context "
        f"{m['block_size']}, vocabulary {m['vocab_size']}; batch {settings.batch_size}; "
        f"{settings.dtype}; compile {settings.compile}; "
        f"{settings.warmup} warm-up + {settings.steps} timed steps",
    ])


def write_json(path: str | None, settings: Settings, env: dict, results: list) -> None:
    """Write what has been measured so far to `path` (if given)."""
    if path:
        payload = {"environment": env, "settings": asdict(settings), "results": results}
        Path(path).write_text(json.dumps(payload, indent=2) + "\n")


def build_parser() -> argparse.ArgumentParser:
    """The command line (defaults depend on --dry_run, so most default to None here)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dry_run", action="store_true", help="CPU, tiny model, float32, no compile")
    p.add_argument("--batch_size", type=int, default=None, help="sequences per step (16; dry 4)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (5; dry 3)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (50; dry 5)")
    p.add_argument("--peak_flops", type=float, default=None,
                   help="peak FLOP/s for MFU (default: the device's datasheet dense bf16 peak)")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default=None,
                   help="autocast dtype (bfloat16 on the GPU, float32 in the dry run)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile (default on the GPU, off in the dry run)")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--json", default=None, help="write the settings and results here")
    return p


def main(argv: list[str] | None = None) -> int:
    """Time the variants, print the table, write the JSON. Returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if (args.steps is not None and args.steps < 1) or (args.warmup is not None and args.warmup < 0):
        parser.error("--steps must be >= 1 and --warmup >= 0")
    settings = resolve_settings(args)
    env = environment(settings)
    print(describe(settings, env), flush=True)
    print(TABLE_HEADER, flush=True)
    results = []
    for variant in args.variants:
        results.append(run_variant(settings, variant))
        print(format_row(results[-1]), flush=True)
        write_json(args.json, settings, env, results)
        if settings.compile:
            torch._dynamo.reset()  # each variant compiles from a clean slate
    if settings.peak_flops is None:
        print(f"MFU n/a: {settings.peak_source}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
