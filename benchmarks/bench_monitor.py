"""Cost of the training-time loop monitor (`loop_monitor`) against training time.

Times, in one process on the same model, the median training step (forward, backward, AdamW)
and the median monitor call (after one warm-up call, whose one-time cost is reported apart),
then the overhead the monitor adds to a run with a given number of iterations and evaluations:
(first call + calls x median call) / (iterations x median step).

    python benchmarks/bench_monitor.py                        # nanoGPT's CPU baby config, looped
    python benchmarks/bench_monitor.py --n_layer 6 --n_embd 384 --block_size 256 --batch_size 64
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from blockloop.model import GPT, GPTConfig
from blockloop.monitor import MONITOR_SEQUENCES, loop_monitor


def median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n_layer", type=int, default=4)
    p.add_argument("--n_head", type=int, default=4)
    p.add_argument("--n_embd", type=int, default=128)
    p.add_argument("--block_size", type=int, default=64)
    p.add_argument("--batch_size", type=int, default=12)
    p.add_argument("--max_loops", type=int, default=2)
    p.add_argument("--iters", type=int, default=5000, help="run length (nanoGPT baby: 5000)")
    p.add_argument("--eval_interval", type=int, default=250, help="nanoGPT baby: 250")
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args()
    torch.manual_seed(0)
    config = GPTConfig(block_size=args.block_size, vocab_size=65, n_layer=args.n_layer,
                       n_head=args.n_head, n_embd=args.n_embd, bias=False, loop_center_idx=1,
                       max_loops=args.max_loops)
    model = GPT(config)
    opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.99), "cpu")
    x = torch.randint(0, 65, (args.batch_size, args.block_size))

    def step():
        _, loss = model(x, x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    idx = x[:MONITOR_SEQUENCES]
    start = time.perf_counter()
    loop_monitor(model, idx)
    first = time.perf_counter() - start
    step_s = median_seconds(step, args.repeats)
    monitor_s = median_seconds(lambda: loop_monitor(model, idx), args.repeats)
    evals = args.iters // args.eval_interval + 1
    overhead = (first + evals * monitor_s) / (args.iters * step_s)
    print(f"threads {torch.get_num_threads()}; step {step_s * 1e3:.1f} ms (median of "
          f"{args.repeats}); monitor {monitor_s * 1e3:.1f} ms (median), first call "
          f"{first:.2f} s; {evals} evaluations over {args.iters} iterations: monitor overhead "
          f"{100 * overhead:.2f}% of training time")


if __name__ == "__main__":
    main()
