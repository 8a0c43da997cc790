"""The training loop: one process, or DDP under `torchrun` (nccl on CUDA, gloo on CPU).

nanoGPT's loop, with what a long research run needs: every random draw is a function of
(seed, step, micro-step, rank) rather than of hidden global state, so a resumed run continues
bit for bit; evaluation uses the same fixed batches in every run, so variants are compared on the
same data; checkpoints are atomic (`blockloop.checkpoint`); SIGINT/SIGTERM finish the current step
and save; a non-finite loss stops the run (or skips the batch) with the last good checkpoint kept.

    python -m blockloop.train config/train_shakespeare_char.py --max_iters=100
    torchrun --nproc_per_node=2 -m blockloop.train config/train_shakespeare_char.py
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from blockloop.checkpoint import (
    BEST_CKPT,
    CHECKPOINT_FORMAT,
    LAST_CKPT,
    CheckpointError,
    load_latest_good,
    save_checkpoint,
)
from blockloop.config import (
    TRAIN_MODEL_DEFAULTS,
    ConfigError,
    TrainConfig,
    parse_train_args,
    save_resolved_config,
)
from blockloop.evaluation import evaluate
from blockloop.looping import check_num_loops, is_looped, may_skip_gradients, sample_num_loops
from blockloop.model import GPT, LOOP_KEYS, GPTConfig
from blockloop.records import read_jsonl
from blockloop.runtime import autocast_context, mix_seed, resolve_device, resolve_dtype

METRICS_FILE = "metrics.jsonl"
# Evaluation batches come from this seed whatever the run's seed, so every run of an experiment
# is scored on the same batches.
EVAL_SEED = 20240601


def get_lr(it: int, cfg: TrainConfig) -> float:
    """Linear warmup, then cosine decay to min_lr at lr_decay_iters, then min_lr."""
    if not cfg.decay_lr:
        return cfg.learning_rate
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    if it >= cfg.lr_decay_iters:
        return cfg.min_lr
    decay_ratio = (it - cfg.warmup_iters) / (cfg.lr_decay_iters - cfg.warmup_iters)
    coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio))
    return cfg.min_lr + coeff * (cfg.learning_rate - cfg.min_lr)


class TrainingData:
    """Training batches and fixed evaluation batches, from a token dataset or a synthetic task."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.task = None
        if cfg.is_task:
            from blockloop.tasks import heldout_set, task_from_config

            try:
                self.task = task_from_config(cfg.dataset, cfg.to_dict())
            except ValueError as e:
                raise ConfigError(str(e)) from None
            if self.task.seq_len > cfg.block_size:
                raise ConfigError(
                    f"block_size={cfg.block_size} is shorter than the {cfg.dataset} sequence "
                    f"length {self.task.seq_len}; set --block_size={self.task.seq_len} or more"
                )
            self.vocab_size = self.task.vocab_size
            self.meta = {"dataset": cfg.dataset, "vocab_size": self.vocab_size, "task": True}
            try:
                self.heldout = heldout_set(self.task, cfg.task_eval_size, EVAL_SEED)
            except ValueError as e:  # too few distinct examples for a held-out set
                raise ConfigError(str(e)) from None
        else:
            from blockloop.data import TokenDataset

            self.dataset = TokenDataset(cfg.resolved_data_dir())
            self.dataset.check_block_size(cfg.block_size)
            self.vocab_size = self.dataset.vocab_size
            self.meta = self.dataset.meta

    def train_batch(self, step: int, micro_step: int, rank: int = 0):
        if self.task is not None:
            return self.task.get_batch(self.cfg.batch_size, self.cfg.seed, step, micro_step, rank)
        return self.dataset.get_batch(
            "train", self.cfg.batch_size, self.cfg.block_size, self.cfg.seed, step,
            micro_step, rank,
        )

    def eval_batches(self, split: str):
        """The fixed evaluation batches of a split ('train' or 'val')."""
        cfg = self.cfg
        if self.task is not None:
            if split == "val":
                x, y = self.heldout
                return list(zip(x.split(cfg.batch_size), y.split(cfg.batch_size)))
            return [
                self.task.get_batch(cfg.batch_size, EVAL_SEED, k) for k in range(cfg.eval_iters)
            ]
        return [
            self.dataset.get_batch(split, cfg.batch_size, cfg.block_size, EVAL_SEED, k)
            for k in range(cfg.eval_iters)
        ]


class StopRequest:
    """Turns SIGINT/SIGTERM into a flag the loop checks after each step."""

    def __init__(self):
        self.signal_name = None
        self._previous = {}

    def install(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        self.signal_name = signal.Signals(signum).name


@dataclass
class TrainResult:
    out_dir: str
    iter_num: int
    best_val_loss: float
    final_val_loss: float | None
    tokens_per_sec: float
    wall_time_s: float
    train_flops: float
    stopped_by: str | None
    metrics_path: str

    def to_dict(self) -> dict:
        return dict(self.__dict__)


class MetricsLog:
    """Append-only JSON lines, truncated on resume to the records before the resumed step."""

    def __init__(self, path: Path, enabled: bool):
        self.path = path
        self.enabled = enabled

    def truncate_from(self, iter_num: int) -> None:
        if not self.enabled or not self.path.exists():
            return
        kept = [r for r in read_jsonl(self.path) if r.get("iter", 0) < iter_num]
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        os.replace(tmp, self.path)

    def write(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


def build_model(cfg: TrainConfig, model_overrides: dict, vocab_size: int) -> GPTConfig:
    kwargs = dict(model_overrides)
    kwargs.setdefault("vocab_size", vocab_size)
    if kwargs["vocab_size"] < vocab_size:
        raise ConfigError(
            f"vocab_size={kwargs['vocab_size']} is smaller than the dataset's {vocab_size}"
        )
    try:
        return GPTConfig(block_size=cfg.block_size, **kwargs)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def check_memory(cfg: TrainConfig, model_config: GPTConfig, device: str) -> None:
    """Refuse sizes that cannot fit in the device's memory, before anything is allocated.

    The estimate is a lower bound (fp32 weights, gradients and AdamW's two moments of the block
    matrices and embeddings, 16 bytes a parameter; the fixed evaluation batches, int64 inputs and
    targets for two splits; one micro-batch of logits, 2 bytes an entry at best), so a refusal is
    always right. It turns a typo such as n_embd=76800000 into an error naming the sizes rather
    than an allocator failure deep inside torch, or the OOM killer.
    """
    c = model_config
    params = 12 * c.n_layer * c.n_embd**2 + (c.vocab_size + c.block_size) * c.n_embd
    tokens = cfg.batch_size * cfg.block_size
    need = 16 * params + 32 * cfg.eval_iters * tokens + 2 * tokens * c.vocab_size
    try:
        if device.startswith("cuda"):
            have = torch.cuda.get_device_properties(torch.device(device)).total_memory
        else:
            have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return  # memory size unknown here (no sysconf): nothing to compare against
    if need > have:
        raise ConfigError(
            f"n_layer={c.n_layer}, n_embd={c.n_embd}, vocab_size={c.vocab_size}, "
            f"block_size={cfg.block_size}, batch_size={cfg.batch_size}, "
            f"eval_iters={cfg.eval_iters}: training needs at least {need / 2**30:.3g} GiB, "
            f"but {device} has {have / 2**30:.3g} GiB; reduce these sizes"
        )


def not_resumable(path, error: Exception) -> CheckpointError:
    detail = " ".join(str(error).split())[:300]
    return CheckpointError(
        f"{path} is not a training checkpoint this run can resume ({type(error).__name__}: "
        f"{detail}); it was not written by `blockloop train` or holds another model"
    )


def train(cfg: TrainConfig, model_overrides: dict, log=print) -> TrainResult:
    """Train according to `cfg`; returns a summary. Raises ConfigError before any work."""
    ddp = int(os.environ.get("RANK", -1)) != -1
    device = resolve_device(cfg.device)
    if ddp:
        rank = int(os.environ["RANK"])
        local_rank = int(os.environ["LOCAL_RANK"])
        world = int(os.environ["WORLD_SIZE"])
        if device.startswith("cuda"):
            device = f"cuda:{local_rank}"
            torch.cuda.set_device(device)
        backend = cfg.backend if cfg.backend != "auto" else (
            "nccl" if device.startswith("cuda") else "gloo"
        )
        torch.distributed.init_process_group(backend=backend)
        if cfg.gradient_accumulation_steps % world != 0:
            raise ConfigError(
                f"gradient_accumulation_steps={cfg.gradient_accumulation_steps} must be "
                f"divisible by the number of processes ({world})"
            )
    else:
        rank, world = 0, 1
    master = rank == 0
    device_type = "cuda" if device.startswith("cuda") else "cpu"
    dtype = resolve_dtype(cfg.dtype, device)
    ctx = autocast_context(device, dtype)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    accum_per_rank = cfg.gradient_accumulation_steps // world

    data = TrainingData(cfg)
    out_dir = Path(cfg.out_dir)
    if master:
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"out_dir={cfg.out_dir!r} cannot be created: {e}") from None
        if not os.access(out_dir, os.W_OK):
            raise ConfigError(f"out_dir={cfg.out_dir!r} is not writable")

    iter_num, best_val_loss, checkpoint = 0, float("inf"), None
    # train_flops is cumulative over the whole run, so a resumed run continues the count.
    start_flops = 0.0
    if cfg.init_from == "resume":
        ckpt_path = out_dir / LAST_CKPT
        if not ckpt_path.exists():
            raise ConfigError(
                f"init_from='resume' but {ckpt_path} does not exist; train from scratch first"
            )
        checkpoint, used = load_latest_good(ckpt_path, map_location=device)
        try:
            model_config = GPTConfig(**checkpoint["model_config"])
            iter_num = int(checkpoint["iter_num"])
            best_val_loss = float(checkpoint["best_val_loss"])
            start_flops = float(checkpoint.get("train_flops", 0.0))
        except (KeyError, TypeError, ValueError) as e:
            raise not_resumable(used, e) from None
        saved = model_config.to_dict()
        changed = sorted(
            k for k, v in model_overrides.items()
            if k in saved and saved[k] != v and TRAIN_MODEL_DEFAULTS.get(k, object()) != v
        )
        if changed:
            raise ConfigError(
                f"{', '.join(f'{k}={model_overrides[k]!r}' for k in changed)}: differs from the "
                f"checkpoint being resumed, {used} "
                f"({', '.join(f'{k}={saved[k]!r}' for k in changed)}); "
                f"a resumed run keeps its model, so drop these flags or start a new out_dir"
            )
        log(f"resuming from {used} at iteration {iter_num}")
    elif cfg.init_from == "scratch":
        model_config = build_model(cfg, model_overrides, data.vocab_size)
    else:
        from blockloop.pretrained import load_pretrained

        fixed = sorted(
            k for k, v in model_overrides.items()
            if k not in LOOP_KEYS and TRAIN_MODEL_DEFAULTS.get(k, object()) != v
        )
        if fixed:
            raise ConfigError(
                f"{', '.join(fixed)}: the architecture comes from init_from={cfg.init_from!r}; "
                f"only looping keys can be set when starting from trained weights"
            )
        loop_keys = {k: v for k, v in model_overrides.items() if k in LOOP_KEYS}
        model = load_pretrained(cfg.init_from, **loop_keys)
        model_config = model.config
    if cfg.init_from in ("scratch", "resume"):
        check_memory(cfg, model_config, device)
        torch.manual_seed(mix_seed(cfg.seed, 0, 0))
        model = GPT(model_config)
    if model_config.vocab_size < data.vocab_size:
        raise ConfigError(
            f"the model's vocab_size={model_config.vocab_size} is smaller than the dataset's "
            f"{data.vocab_size}"
        )
    if cfg.block_size > model_config.block_size:
        raise ConfigError(
            f"block_size={cfg.block_size} is larger than the model's {model_config.block_size}"
        )
    if cfg.block_size < model_config.block_size:
        model.crop_block_size(cfg.block_size)
    if checkpoint is not None:
        try:
            model.load_state_dict(checkpoint["model"])
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise not_resumable(used, e) from None
    model.to(device)

    optimizer = model.configure_optimizers(
        cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2), device_type
    )
    scaler = torch.amp.GradScaler(device_type, enabled=(dtype == "float16"))
    if checkpoint is not None:
        try:
            optimizer.load_state_dict(checkpoint["optimizer"])
            if "scaler" in checkpoint and checkpoint["scaler"]:
                scaler.load_state_dict(checkpoint["scaler"])
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise not_resumable(used, e) from None
    checkpoint = None

    raw_model = model
    if cfg.compile:
        model = torch.compile(model)
    if ddp:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(
            model,
            device_ids=[int(device.split(":")[1])] if device_type == "cuda" else None,
            find_unused_parameters=may_skip_gradients(model_config),
        )

    metrics = MetricsLog(out_dir / METRICS_FILE, enabled=master)
    # Also for a fresh run (iter_num 0, log emptied): records left by an earlier run in this
    # out_dir, e.g. one killed before its first checkpoint, must not mix into this run's log.
    metrics.truncate_from(iter_num)
    if master:
        save_resolved_config(out_dir / "config.json", cfg, model_config)

    wandb_run = None
    if cfg.wandb_log and master:
        try:
            import wandb
        except ImportError:
            raise ConfigError("wandb_log=True needs wandb: pip install 'blockloop[online]'") from None
        wandb_run = wandb.init(project=cfg.wandb_project, name=cfg.wandb_run_name, config=cfg.to_dict())

    n_params = raw_model.get_num_params()
    tokens_per_iter = cfg.gradient_accumulation_steps * cfg.batch_size * cfg.block_size
    if master:
        log(
            f"model: {n_params / 1e6:.2f}M unique parameters, effective depth "
            f"{raw_model.effective_depth()}, {raw_model.flops_per_token() / 1e6:.2f} MFLOPs/token "
            f"(training); {tokens_per_iter:,} tokens/iteration; device {device}, dtype {dtype}"
        )

    eval_sets = {"train": data.eval_batches("train"), "val": data.eval_batches("val")}
    # A plain model has no loop to run at other counts: eval_loops does not apply to it.
    loop_counts = list(cfg.eval_loops) if is_looped(model_config) else []
    for n in loop_counts:
        try:
            check_num_loops(model_config, n, key="eval_loops")
        except ValueError as e:
            raise ConfigError(str(e)) from None

    def run_eval(it: int) -> dict:
        # Loop noise in evaluation draws from the global generator: seed it from the iteration,
        # or a resumed run's first evaluation would see other noise than the uninterrupted run's.
        torch.manual_seed(mix_seed(EVAL_SEED, it))
        record = {"iter": it, "kind": "eval"}
        for split, batches in eval_sets.items():
            res = evaluate(model, batches, device=device, ctx=ctx)
            record[f"{split}_loss"] = res.loss
            if data.task is not None:
                record[f"{split}_accuracy"] = res.accuracy
            if split == "val" and res.iterations:
                record["val_mean_iterations"] = res.mean_iterations
        for n in loop_counts:
            res = evaluate(model, eval_sets["val"], device=device, ctx=ctx, num_loops=n,
                           loop_exit=False)
            record[f"val_loss@{n}"] = res.loss
            if data.task is not None:
                record[f"val_accuracy@{n}"] = res.accuracy
        return record

    def checkpoint_payload(it: int) -> dict:
        return {
            "format": CHECKPOINT_FORMAT,
            "model": raw_model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict() if scaler.is_enabled() else {},
            "model_config": model_config.to_dict(),
            "train_config": cfg.to_dict(),
            "iter_num": it,
            "best_val_loss": best_val_loss,
            "train_flops": train_flops,
            "meta": data.meta if data.task is not None else {"data_dir": str(cfg.resolved_data_dir())},
        }

    stop = StopRequest()
    stop.install()
    t_start = time.time()
    train_flops = start_flops
    tokens_done = 0
    final_val = None
    stopped_by = None
    bar = None
    if master and cfg.progress and not cfg.eval_only:
        from tqdm import tqdm

        bar = tqdm(total=cfg.max_iters, initial=iter_num, desc="train", dynamic_ncols=True, leave=False)
    write = (bar.write if bar is not None else log) if master else (lambda *_: None)
    try:
        while True:
            if iter_num % cfg.eval_interval == 0 or iter_num >= cfg.max_iters or cfg.eval_only:
                record = run_eval(iter_num)
                record["time_s"] = time.time() - t_start
                final_val = record["val_loss"]
                metrics.write(record)
                if wandb_run is not None:
                    wandb_run.log(record, step=iter_num)
                extra = "".join(
                    f", {k} {v:.4f}" for k, v in record.items() if k.startswith("val_") and k != "val_loss"
                )
                write(
                    f"step {iter_num}: train loss {record['train_loss']:.4f}, "
                    f"val loss {record['val_loss']:.4f}{extra}"
                )
                if not (math.isfinite(record["train_loss"]) and math.isfinite(record["val_loss"])):
                    # A step with a finite loss can still leave NaN weights (an overflow in the
                    # backward pass); saving them would push the last good checkpoint out of
                    # .prev, and skipping batches cannot bring them back.
                    raise FloatingPointError(
                        f"non-finite evaluation loss at iteration {iter_num}: the weights have "
                        f"diverged and are not saved; the last good checkpoint is kept in "
                        f"{out_dir}. Try a lower learning_rate (now {cfg.learning_rate}) or "
                        f"dtype=float32/bfloat16 instead of float16"
                    )
                improved = record["val_loss"] < best_val_loss
                if improved:
                    best_val_loss = record["val_loss"]
                if master and iter_num > 0 and not cfg.eval_only:
                    # best.pt is only ever replaced by a better model; last.pt is what resumes.
                    # best.pt first: a run killed between the two saves resumes from the older
                    # last.pt and redoes this evaluation, saves included; in the other order it
                    # would resume with best_val_loss already lowered and never write best.pt.
                    payload = checkpoint_payload(iter_num)
                    if improved:
                        save_checkpoint(out_dir / BEST_CKPT, payload)
                    if improved or cfg.always_save_checkpoint:
                        save_checkpoint(out_dir / LAST_CKPT, payload)
            if cfg.eval_only or iter_num >= cfg.max_iters:
                break

            num_loops = None
            if raw_model.loop_plan is not None and model_config.loop_sampling != "fixed":
                gen = torch.Generator().manual_seed(mix_seed(cfg.seed, iter_num, 2))
                num_loops = sample_num_loops(model_config, gen)
            lr = get_lr(iter_num, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            t0 = time.time()
            loss_sum = torch.zeros((), device=device)
            iter_counts = []
            for micro in range(accum_per_rank):
                global_micro = micro * world + rank
                # Dropout and loop noise draw from the global generator: reseed it per global
                # micro-step, so that their draws depend neither on how the run got here (resume
                # is exact) nor on how micro-steps are split across ranks (DDP = one process).
                torch.manual_seed(mix_seed(cfg.seed, iter_num, global_micro, 1))
                x, y = data.train_batch(iter_num, global_micro)
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                sync = nullcontext()
                if ddp and micro < accum_per_rank - 1:
                    sync = model.no_sync()
                with sync:
                    with ctx:
                        _, loss = model(x, y, num_loops=num_loops)
                        loss = loss / accum_per_rank
                    scaler.scale(loss).backward()
                loss_sum += loss.detach()
                if raw_model.last_loop_iterations is not None:
                    iter_counts.append(
                        torch.stack([i.float() for i in raw_model.last_loop_iterations]).mean()
                    )
            loss_value = loss_sum.item()
            stop_requested = stop.signal_name is not None
            if ddp:
                # The stop flag travels with the loss: a signal that reaches the ranks at
                # different steps must still stop them all after the same one, or the ranks
                # still training would wait forever for the ones that left.
                t = torch.tensor([loss_value, float(stop_requested)], device=device)
                torch.distributed.all_reduce(t)
                loss_value = t[0].item() / world
                stop_requested = t[1].item() > 0
            if not math.isfinite(loss_value):
                if cfg.nan_policy == "skip":
                    optimizer.zero_grad(set_to_none=True)
                    write(f"step {iter_num}: non-finite loss {loss_value}; batch skipped (nan_policy=skip)")
                    metrics.write({"iter": iter_num, "kind": "skipped", "loss": str(loss_value)})
                    iter_num += 1
                    continue
                raise FloatingPointError(
                    f"non-finite training loss ({loss_value}) at iteration {iter_num}; the last "
                    f"good checkpoint is kept in {out_dir}. Try a lower learning_rate "
                    f"(now {cfg.learning_rate}) or dtype=float32/bfloat16 instead of float16, "
                    f"or --nan_policy=skip to skip such batches"
                )
            if cfg.grad_clip > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            if device_type == "cuda":
                torch.cuda.synchronize()
            dt = time.time() - t0
            mean_iters = (
                torch.stack(iter_counts).mean().item() if iter_counts else
                (num_loops if num_loops is not None else model_config.max_loops)
            )
            flops = raw_model.flops_per_token(mean_iters) * tokens_per_iter
            train_flops += flops
            tokens_done += tokens_per_iter
            if iter_num % cfg.log_interval == 0 and master:
                rec = {
                    "iter": iter_num, "kind": "train", "loss": loss_value, "lr": lr,
                    "time_ms": dt * 1000, "tokens_per_sec": tokens_per_iter / max(dt, 1e-9),
                    "train_flops": train_flops, "loops": mean_iters,
                }
                metrics.write(rec)
                if wandb_run is not None:
                    wandb_run.log(rec, step=iter_num)
                if bar is not None:
                    bar.set_postfix(loss=f"{loss_value:.4f}", ms=f"{dt * 1000:.0f}")
            if bar is not None:
                bar.update(1)
            iter_num += 1
            if stop_requested:
                stopped_by = stop.signal_name or "a signal to another rank"
                if master:
                    save_checkpoint(out_dir / LAST_CKPT, checkpoint_payload(iter_num))
                    write(
                        f"stopped by {stopped_by}: saved {out_dir / LAST_CKPT} at iteration "
                        f"{iter_num}. To resume, run the same command with --init_from=resume"
                    )
                break
    finally:
        stop.restore()
        if bar is not None:
            bar.close()
        if wandb_run is not None:
            wandb_run.finish()
        if ddp:
            torch.distributed.destroy_process_group()
    wall = time.time() - t_start
    return TrainResult(
        out_dir=str(out_dir),
        iter_num=iter_num,
        best_val_loss=best_val_loss,
        final_val_loss=final_val,
        tokens_per_sec=tokens_done / max(wall, 1e-9),
        wall_time_s=wall,
        train_flops=train_flops,
        stopped_by=stopped_by,
        metrics_path=str(out_dir / METRICS_FILE),
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        from blockloop.config import help_text

        print("usage: blockloop train [CONFIG_FILE ...] [--key=value ...]\n")
        print(help_text())
        return 0
    from blockloop.data import DataError

    try:
        cfg, model_overrides = parse_train_args(argv)
        result = train(cfg, model_overrides)
    # OSError: an unreadable file or directory, a full disk outside checkpoints; its message
    # names the path, which is all the user needs (a traceback would bury it).
    except (ConfigError, CheckpointError, DataError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except FloatingPointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    if result.stopped_by is None and int(os.environ.get("RANK", 0)) == 0:
        print(f"done: best val loss {result.best_val_loss:.4f}; checkpoints in {result.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
