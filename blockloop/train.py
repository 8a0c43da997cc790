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

import math
import os
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from blockloop.checkpoint import (
    BEST_CKPT,
    CHECKPOINT_FORMAT,
    LAST_CKPT,
    load_latest_good,
    prev_path,
    save_checkpoint,
    sidecar_path,
)
from blockloop.checkpoint import build_model as build_checkpoint_model
from blockloop.config import (
    TRAIN_MODEL_DEFAULTS,
    TrainConfig,
    help_text,
    parse_train_args,
    save_resolved_config,
)
from blockloop.data import TokenDataset
from blockloop.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    DivergedError,
    run_command,
)
from blockloop.evaluation import evaluate
from blockloop.looping import (
    check_num_loops,
    group_means,
    is_looped,
    may_skip_gradients,
    step_num_loops,
)
from blockloop.model import GPT, LOOP_KEYS, GPTConfig
from blockloop.monitor import MONITOR_SEQUENCES, loop_monitor
from blockloop.pretrained import ROPE_ON_TRAINED_WEIGHTS, load_pretrained
from blockloop.records import append_jsonl, code_identity, read_jsonl, write_jsonl
from blockloop.runtime import (
    autocast_context,
    device_type,
    dtype_reason,
    keep_freed_memory,
    mix_seed,
    resolve_device,
    resolve_dtype,
)
from blockloop.tasks import heldout_set, task_from_config
from blockloop.tokenizers import check_same_tokenizer, decoding_meta

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
            self.dataset = TokenDataset(cfg.resolved_data_dir())
            self.dataset.check_block_size(cfg.block_size)
            self.vocab_size = self.dataset.vocab_size
            self.meta = self.dataset.meta

    def check_trained_on(self, checkpoint_meta: dict) -> None:
        """Raise DataError naming meta.json if this token data decodes ids differently from
        the data a checkpoint (its `meta` entry) was trained on; tasks have nothing to check."""
        if self.task is not None:
            return
        try:
            check_same_tokenizer(checkpoint_meta, self.meta, self.dataset.data_dir / "meta.json")
        except ValueError as e:
            raise DataError(str(e)) from None

    def train_batch(self, step: int, micro_step: int, rank: int = 0):
        """The (x, y) micro-batch `micro_step` of training step `step`."""
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
        """Catch SIGINT and SIGTERM until `restore`."""
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        """Put back the handlers `install` replaced."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        self.signal_name = signal.Signals(signum).name


@dataclass
class TrainResult:
    """What `train` returns: where the run is, how far it got and what it cost."""

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
        """The fields as a plain dict."""
        return dict(self.__dict__)


class MetricsLog:
    """Append-only JSON lines (`metrics.jsonl`), written by the master process only.

    The first record is a header, `{"kind": "header", "iter": 0, "code": code_identity()}`, so
    that the curve names the code that made it; then "eval", "train" and "skipped" records.
    A log that replaces another run's (`pending=True`) is kept in memory until `commit()`, which
    the run calls once it has saved its first checkpoint: a run killed before then leaves the
    old run's log as it was.
    """

    def __init__(self, path: Path, enabled: bool, pending: bool = False):
        self.path = path
        self.enabled = enabled
        self.pending = [] if (enabled and pending) else None

    def start(self, iter_num: int) -> None:
        """Keep the records before `iter_num` (those of the run being resumed, header included)
        and drop the rest; a log without a header (a fresh run) starts with one."""
        if not self.enabled:
            return
        old = [] if self.pending is not None else read_jsonl(self.path)
        kept = [r for r in old if r.get("iter", 0) < iter_num]
        if not any(r.get("kind") == "header" for r in kept):
            kept.insert(0, {"kind": "header", "iter": 0, "code": code_identity()})
        if self.pending is not None:
            self.pending = kept
        else:
            write_jsonl(self.path, kept)

    def write(self, record: dict) -> None:
        """Append one record (to memory while the log is pending)."""
        if self.pending is not None:
            self.pending.append(record)
        elif self.enabled:
            append_jsonl(self.path, record)

    def commit(self) -> bool:
        """Replace the old log with the pending one; False if nothing was pending."""
        if self.pending is None:
            return False
        write_jsonl(self.path, self.pending)
        self.pending = None
        return True


def build_model(cfg: TrainConfig, model_overrides: dict, vocab_size: int) -> GPTConfig:
    """The model config of a run from scratch: the command line's model keys, the dataset's
    vocabulary size unless given, and the run's block size."""
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


def not_resumable(path, error: BaseException) -> CheckpointError:
    """The error for a checkpoint at `path` that `error` shows is not this run's to resume."""
    detail = " ".join(str(error).split())[:300]
    return CheckpointError(
        f"{path} is not a training checkpoint this run can resume ({type(error).__name__}: "
        f"{detail}); it was not written by `blockloop train` or holds another model"
    )


# ----------------------------------------------------------------------------------------------
# Setup


@dataclass
class Distributed:
    """This process's place in a `torchrun` job (one process: rank 0 of 1, no DDP)."""

    ddp: bool = False
    rank: int = 0
    world: int = 1

    @property
    def master(self) -> bool:
        """Rank 0: the process that logs, writes metrics and saves checkpoints."""
        return self.rank == 0


@dataclass
class Start:
    """The model a run starts from, and where it starts: iteration, best validation loss, FLOPs
    spent so far (all from the checkpoint when resuming, whose payload and path it keeps)."""

    model: GPT
    iter_num: int = 0
    best_val_loss: float = float("inf")
    train_flops: float = 0.0
    checkpoint: dict | None = None
    source: Path | None = None


@dataclass
class Trainer:
    """What the steps of a run share, built by `setup`: the model (`model` runs forward and
    backward, possibly compiled and in DDP; `raw_model` is the GPT inside), optimizer, data,
    device, logs, and the run's running totals (`best_val_loss`, `train_flops`)."""

    cfg: TrainConfig
    model: torch.nn.Module
    raw_model: GPT
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    data: TrainingData
    dist: Distributed
    device: str
    ctx: object  # the autocast context (runtime.autocast_context)
    out_dir: Path
    metrics: MetricsLog
    eval_sets: dict
    loop_counts: list
    log: object = print
    start_iter: int = 0
    best_val_loss: float = float("inf")
    train_flops: float = 0.0
    wandb_run: object = None
    bar: object = None
    stop: StopRequest = field(default_factory=StopRequest)

    @property
    def master(self) -> bool:
        """Whether this process logs and saves (rank 0)."""
        return self.dist.master

    @property
    def accum_per_rank(self) -> int:
        """Micro-steps each rank runs per step."""
        return self.cfg.gradient_accumulation_steps // self.dist.world

    @property
    def tokens_per_iter(self) -> int:
        """Tokens one step trains on, over all ranks."""
        return self.cfg.gradient_accumulation_steps * self.cfg.batch_size * self.cfg.block_size

    def say(self, message: str) -> None:
        """Print a line on the master process (through the progress bar when there is one)."""
        if self.master:
            (self.bar.write if self.bar is not None else self.log)(message)

    def publish(self, record: dict, iter_num: int) -> None:
        """Append a record to metrics.jsonl and send it to wandb when wandb is on."""
        self.metrics.write(record)
        if self.wandb_run is not None:
            self.wandb_run.log(record, step=iter_num)


def init_distributed(cfg: TrainConfig) -> tuple[Distributed, str]:
    """(this process's place, its device); joins the process group under `torchrun`."""
    device = resolve_device(cfg.device)
    if int(os.environ.get("RANK", -1)) == -1:
        return Distributed(), device
    dist = Distributed(True, int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]))
    if device.startswith("cuda"):
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(device)
    backend = cfg.backend if cfg.backend != "auto" else (
        "nccl" if device.startswith("cuda") else "gloo"
    )
    torch.distributed.init_process_group(backend=backend)
    if cfg.gradient_accumulation_steps % dist.world != 0:
        raise ConfigError(
            f"gradient_accumulation_steps={cfg.gradient_accumulation_steps} must be "
            f"divisible by the number of processes ({dist.world})"
        )
    return dist, device


RUN_FILES = (LAST_CKPT, BEST_CKPT, METRICS_FILE)


def existing_run(out_dir: Path) -> list[str]:
    """The files of a run already in `out_dir` (checkpoints, metrics log); [] if none."""
    return [name for name in RUN_FILES if (out_dir / name).exists()]


def prepare_out_dir(cfg: TrainConfig, master: bool) -> Path:
    """The run directory, created (by the master) and checked writable. Starting a new run
    where one exists is refused unless `overwrite_out_dir` (ConfigError naming the files)."""
    out_dir = Path(cfg.out_dir)
    found = existing_run(out_dir) if out_dir.is_dir() else []
    if found and cfg.init_from != "resume" and not cfg.eval_only and not cfg.overwrite_out_dir:
        raise ConfigError(
            f"out_dir={cfg.out_dir!r} already holds a run ({', '.join(found)}); continue it "
            f"with --init_from=resume, choose another --out_dir, or pass "
            f"--overwrite_out_dir=True to replace it (its files stay until the new run saves "
            f"its first checkpoint)"
        )
    if master and not cfg.eval_only:
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"out_dir={cfg.out_dir!r} cannot be created: {e}") from None
        if not os.access(out_dir, os.W_OK):
            raise ConfigError(f"out_dir={cfg.out_dir!r} is not writable")
    return out_dir


def replaces_a_run(cfg: TrainConfig, out_dir: Path) -> bool:
    """Whether this run starts over another run's files (`overwrite_out_dir`)."""
    return cfg.init_from != "resume" and not cfg.eval_only and bool(existing_run(out_dir))


def build_or_resume_model(
    cfg: TrainConfig, model_overrides: dict, data: TrainingData, out_dir: Path, device: str, log
) -> Start:
    """The model to train, on `device`: new (init_from='scratch'), the run's last checkpoint
    ('resume') or trained weights (a nanoGPT checkpoint or GPT-2), cropped to `cfg.block_size`.
    Raises ConfigError for sizes that do not fit the data or the machine."""
    if cfg.init_from == "resume":
        start = resume(cfg, model_overrides, out_dir, device, log)
        data.check_trained_on(start.checkpoint.get("meta") or {})
    elif cfg.init_from == "scratch":
        model_config = build_model(cfg, model_overrides, data.vocab_size)
        check_memory(cfg, model_config, device)
        torch.manual_seed(mix_seed(cfg.seed, 0, 0))
        start = Start(GPT(model_config))
    else:
        start = Start(pretrained_model(cfg, model_overrides))
    model = start.model
    if model.config.vocab_size < data.vocab_size:
        raise ConfigError(
            f"the model's vocab_size={model.config.vocab_size} is smaller than the dataset's "
            f"{data.vocab_size}"
        )
    if cfg.block_size > model.config.block_size:
        raise ConfigError(
            f"block_size={cfg.block_size} is larger than the model's {model.config.block_size}"
        )
    if cfg.block_size < model.config.block_size:
        model.crop_block_size(cfg.block_size)
    model.to(device)
    return start


def resume(cfg: TrainConfig, model_overrides: dict, out_dir: Path, device: str, log) -> Start:
    """The run's newest good checkpoint (last.pt, else last.pt.prev), its model rebuilt.

    Model keys on the command line must match the checkpoint's (a resumed run keeps its model).
    """
    ckpt_path = out_dir / LAST_CKPT
    if not ckpt_path.exists():
        raise ConfigError(
            f"init_from='resume' but {ckpt_path} does not exist; train from scratch first"
        )
    checkpoint, used = load_latest_good(ckpt_path, map_location=device)
    try:
        model = build_checkpoint_model(checkpoint, used)
    except CheckpointError as e:
        if e.__context__ is None:  # no 'model'/'model_config' entry: the message says so
            raise
        # It names the error behind it (raised `from None`, it is still the context).
        raise not_resumable(used, e.__context__) from None
    try:
        start = Start(model, int(checkpoint["iter_num"]), float(checkpoint["best_val_loss"]),
                      float(checkpoint.get("train_flops", 0.0)), checkpoint, used)
    except (KeyError, TypeError, ValueError) as e:
        raise not_resumable(used, e) from None
    saved = model.config.to_dict()
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
    if cfg.block_size != model.config.block_size:
        # The optimizer's moments for the position embeddings have the checkpoint's length.
        raise ConfigError(
            f"block_size={cfg.block_size} differs from the checkpoint being resumed, {used} "
            f"(block_size={model.config.block_size}); a resumed run keeps its model, so drop "
            f"the flag or start a new out_dir"
        )
    log(f"resuming from {used} at iteration {start.iter_num}")
    check_memory(cfg, model.config, device)
    return start


def pretrained_model(cfg: TrainConfig, model_overrides: dict) -> GPT:
    """The model of `cfg.init_from` (a nanoGPT checkpoint or GPT-2), with the looping keys of
    `model_overrides`; any other model key is refused (the architecture is the weights')."""
    if model_overrides.get("position_embedding", "learned") != "learned":
        raise ConfigError(ROPE_ON_TRAINED_WEIGHTS)
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
    return load_pretrained(cfg.init_from, **loop_keys)


def build_optimizer(cfg: TrainConfig, start: Start, device: str, dtype: str):
    """(AdamW, gradient scaler) for the model, with their state when resuming."""
    kernels = "cuda" if device.startswith("cuda") else "cpu"
    optimizer = start.model.configure_optimizers(
        cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2), kernels
    )
    scaler = torch.amp.GradScaler(kernels, enabled=(dtype == "float16"))
    checkpoint = start.checkpoint
    if checkpoint is not None:
        try:
            # load_state_dict also restores each group's "fused"/"foreach" choice from the
            # checkpoint; the update kernel is this machine's business, so it is set again.
            kernel = {k: optimizer.param_groups[0].get(k) for k in ("fused", "foreach")}
            optimizer.load_state_dict(checkpoint["optimizer"])
            for group in optimizer.param_groups:
                group.update(kernel)
            if "scaler" in checkpoint and checkpoint["scaler"]:
                scaler.load_state_dict(checkpoint["scaler"])
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise not_resumable(start.source, e) from None
    return optimizer, scaler


def wrap_model(cfg: TrainConfig, model: GPT, dist: Distributed, device: str) -> torch.nn.Module:
    """`model` compiled (compile=True) and in DDP (under torchrun), as training runs it."""
    raw_model = model
    if cfg.compile:
        model = torch.compile(model)
    if dist.ddp:
        model = DistributedDataParallel(
            model,
            device_ids=[int(device.split(":")[1])] if device.startswith("cuda") else None,
            find_unused_parameters=may_skip_gradients(raw_model.config),
        )
    return model


def speed_choices(cfg: TrainConfig, optimizer, model_config: GPTConfig, device: str) -> str:
    """The training log's account of the per-step levers in use (issue 16): fused AdamW,
    compile, and which dropout runs (blockloop's CPU masks in eager CPU training, torch's
    elsewhere; `blockloop/dropout.py`)."""
    fused = "fused" if optimizer.defaults.get("fused") else "multi-tensor"
    if model_config.dropout == 0.0:
        dropout = "no dropout"
    elif device_type(device) == "cpu" and not cfg.compile:
        dropout = f"dropout {model_config.dropout} with blockloop's CPU masks"
    else:
        dropout = f"dropout {model_config.dropout} with torch's kernels"
    return f"AdamW {fused}; compile {'on' if cfg.compile else 'off'}; {dropout}"


def eval_plan(cfg: TrainConfig, data: TrainingData, model_config: GPTConfig) -> tuple[dict, list]:
    """(the fixed evaluation batches by split, the extra loop counts to evaluate at)."""
    eval_sets = {"train": data.eval_batches("train"), "val": data.eval_batches("val")}
    # A plain model has no loop to run at other counts: eval_loops does not apply to it.
    loop_counts = list(cfg.eval_loops) if is_looped(model_config) else []
    for n in loop_counts:
        try:
            check_num_loops(model_config, n, key="eval_loops")
        except ValueError as e:
            raise ConfigError(str(e)) from None
    return eval_sets, loop_counts


def init_wandb(cfg: TrainConfig, master: bool):
    """The wandb run (wandb_log=True, master only), else None."""
    if not (cfg.wandb_log and master):
        return None
    try:
        import wandb  # optional: only runs that log to wandb need it
    except ImportError:
        raise ConfigError("wandb_log=True needs wandb: pip install 'blockloop[online]'") from None
    return wandb.init(project=cfg.wandb_project, name=cfg.wandb_run_name, config=cfg.to_dict())


def setup(cfg: TrainConfig, model_overrides: dict, log=print) -> Trainer:
    """Everything a run needs before its first step: process group, data, run directory, model,
    optimizer, metrics log (truncated to the resumed step), config.json, wandb, progress bar.
    Raises ConfigError (or CheckpointError, DataError) before any training."""
    dist, device = init_distributed(cfg)
    dtype = resolve_dtype(cfg.dtype, device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    allocator = "glibc keeps freed blocks" if keep_freed_memory() else "system default"
    data = TrainingData(cfg)
    out_dir = prepare_out_dir(cfg, dist.master)
    start = build_or_resume_model(cfg, model_overrides, data, out_dir, device, log)
    optimizer, scaler = build_optimizer(cfg, start, device, dtype)
    raw_model = start.model
    model = wrap_model(cfg, raw_model, dist, device)

    # eval_only writes nothing into the run directory: it reports, and changes no history.
    metrics = MetricsLog(out_dir / METRICS_FILE, enabled=dist.master and not cfg.eval_only,
                         pending=replaces_a_run(cfg, out_dir))
    metrics.start(start.iter_num)
    if dist.master and not cfg.eval_only and metrics.pending is None:
        save_resolved_config(out_dir / "config.json", cfg, raw_model.config)
    eval_sets, loop_counts = eval_plan(cfg, data, raw_model.config)
    t = Trainer(
        cfg, model, raw_model, optimizer, scaler, data, dist, device,
        ctx=autocast_context(device, dtype), out_dir=out_dir, metrics=metrics,
        eval_sets=eval_sets, loop_counts=loop_counts, log=log, start_iter=start.iter_num,
        best_val_loss=start.best_val_loss, train_flops=start.train_flops,
        wandb_run=init_wandb(cfg, dist.master),
    )
    if dist.master:
        log(
            f"model: {raw_model.get_num_params() / 1e6:.2f}M unique parameters, effective depth "
            f"{raw_model.effective_depth()}, {raw_model.flops_per_token() / 1e6:.2f} MFLOPs/token "
            f"(training); {t.tokens_per_iter:,} tokens/iteration; device {device}, dtype {dtype} "
            f"({dtype_reason(cfg.dtype, device)}); CPU allocator: {allocator}"
        )
        log(f"speed: {speed_choices(cfg, optimizer, raw_model.config, device)}")
    if dist.master and cfg.progress and not cfg.eval_only:
        t.bar = tqdm(total=cfg.max_iters, initial=start.iter_num, desc="train",
                     dynamic_ncols=True, leave=False)
    return t


# ----------------------------------------------------------------------------------------------
# One step


@dataclass
class StepResult:
    """One training step: `loss` is the mean over the step's micro-batches (and ranks); `loops`
    the mean iterations the looped range ran, `group_loops` those of each loop group (None for
    a plain model); `flops` the step's training FLOPs, counted at the iterations run; `dt` its
    wall time in seconds. A step with a non-finite loss made no update (loops None, flops 0)."""

    loss: float
    lr: float
    loops: float | None
    flops: float
    dt: float
    stop_requested: bool
    group_loops: list[float] | None = None

    @property
    def finite(self) -> bool:
        """Whether the loss was finite, i.e. the optimizer stepped."""
        return math.isfinite(self.loss)


def train_step(t: Trainer, iter_num: int) -> StepResult:
    """Step `iter_num`: micro-steps with gradient accumulation, then clip and optimizer step.

    Every random draw is seeded from (seed, iter_num, global micro-step), so the result depends
    only on the model and optimizer state and `iter_num`. Under DDP the loss and the stop flag
    (a SIGINT/SIGTERM on any rank) are all-reduced. A non-finite loss drops the gradients and
    makes no update; what then happens (`nan_policy`) is the caller's decision.
    """
    cfg, raw = t.cfg, t.raw_model
    num_loops = None
    if raw.loop_plan is not None:
        # One draw per group from (seed, step, group); group 0's seed is the one-loop seed.
        gens = [torch.Generator().manual_seed(mix_seed(cfg.seed, iter_num, 2, *([g] if g else [])))
                for g in range(len(raw.loop_plan.groups))]
        num_loops = step_num_loops(raw.config, iter_num, cfg.max_iters, gens)
    lr = get_lr(iter_num, cfg)
    for group in t.optimizer.param_groups:
        group["lr"] = lr
    t0 = time.time()
    loss_sum, iter_counts = forward_backward(t, iter_num, num_loops)
    loss, stop_requested = all_reduce_step(t, loss_sum.item(), t.stop.signal_name is not None)
    if not math.isfinite(loss):
        t.optimizer.zero_grad(set_to_none=True)
        return StepResult(loss, lr, None, 0.0, time.time() - t0, stop_requested, None)
    if cfg.grad_clip > 0:
        t.scaler.unscale_(t.optimizer)
        torch.nn.utils.clip_grad_norm_(raw.parameters(), cfg.grad_clip)
    t.scaler.step(t.optimizer)
    t.scaler.update()
    t.optimizer.zero_grad(set_to_none=True)
    if t.device.startswith("cuda"):
        torch.cuda.synchronize()
    dt = time.time() - t0
    if iter_counts:  # looped: the mean over looped units for the log, per group for FLOPs
        loops = torch.stack([unit_mean for unit_mean, _ in iter_counts]).mean().item()
        per_group = torch.stack([groups for _, groups in iter_counts]).mean(dim=0).tolist()
    else:
        loops, per_group = raw.config.max_loops, None
    flops = raw.flops_per_token(per_group) * t.tokens_per_iter
    return StepResult(loss, lr, loops, flops, dt, stop_requested, per_group)


def forward_backward(t: Trainer, iter_num: int, num_loops: int | None):
    """(loss summed over this rank's micro-steps, each divided by their count; per micro-step,
    when the model loops, (mean iterations over looped units, mean per group (G,))). Gradients
    accumulate."""
    raw, world, rank = t.raw_model, t.dist.world, t.dist.rank
    loss_sum = torch.zeros((), device=t.device)
    iter_counts = []
    for micro in range(t.accum_per_rank):
        global_micro = micro * world + rank
        # Dropout and loop noise draw from the global generator: reseed it per global
        # micro-step, so that their draws depend neither on how the run got here (resume
        # is exact) nor on how micro-steps are split across ranks (DDP = one process).
        torch.manual_seed(mix_seed(t.cfg.seed, iter_num, global_micro, 1))
        x, y = t.data.train_batch(iter_num, global_micro)
        x, y = x.to(t.device, non_blocking=True), y.to(t.device, non_blocking=True)
        sync = nullcontext()
        if t.dist.ddp and micro < t.accum_per_rank - 1:
            sync = t.model.no_sync()
        with sync:
            with t.ctx:
                _, loss = t.model(x, y, num_loops=num_loops)
                loss = loss / t.accum_per_rank
            t.scaler.scale(loss).backward()
        loss_sum += loss.detach()
        if raw.last_loop_iterations is not None:
            its = raw.last_loop_iterations
            iter_counts.append((torch.stack([i.float().mean() for i in its]).mean(),
                                group_means(raw.loop_plan, its)))
    return loss_sum, iter_counts


def all_reduce_step(t: Trainer, loss: float, stop_requested: bool) -> tuple[float, bool]:
    """(mean loss over ranks, whether any rank was asked to stop); as given without DDP."""
    if not t.dist.ddp:
        return loss, stop_requested
    # The stop flag travels with the loss: a signal that reaches the ranks at different steps
    # must still stop them all after the same one, or the ranks still training would wait
    # forever for the ones that left.
    reduced = torch.tensor([loss, float(stop_requested)], device=t.device)
    torch.distributed.all_reduce(reduced)
    return reduced[0].item() / t.dist.world, reduced[1].item() > 0


def skip_batch(t: Trainer, iter_num: int, loss: float) -> None:
    """The non-finite loss policy: log the skipped batch (nan_policy=skip), else raise
    DivergedError (the last good checkpoint stays)."""
    if t.cfg.nan_policy != "skip":
        raise DivergedError(
            f"non-finite training loss ({loss}) at iteration {iter_num}; the last "
            f"good checkpoint is kept in {t.out_dir}. Try a lower learning_rate "
            f"(now {t.cfg.learning_rate}) or dtype=float32/bfloat16 instead of float16, "
            f"or --nan_policy=skip to skip such batches"
        )
    t.say(f"step {iter_num}: non-finite loss {loss}; batch skipped (nan_policy=skip)")
    t.metrics.write({"iter": iter_num, "kind": "skipped", "loss": str(loss)})


def log_step(t: Trainer, iter_num: int, step: StepResult) -> None:
    """The "train" record of a step (every log_interval steps) and the progress bar."""
    if iter_num % t.cfg.log_interval == 0 and t.master:
        t.publish({
            "iter": iter_num, "kind": "train", "loss": step.loss, "lr": step.lr,
            "time_ms": step.dt * 1000, "tokens_per_sec": t.tokens_per_iter / max(step.dt, 1e-9),
            "train_flops": t.train_flops, "loops": step.loops,
            **({"group_loops": step.group_loops} if step.group_loops is not None else {}),
        }, iter_num)
        if t.bar is not None:
            t.bar.set_postfix(loss=f"{step.loss:.4f}", ms=f"{step.dt * 1000:.0f}")
    if t.bar is not None:
        t.bar.update(1)


# ----------------------------------------------------------------------------------------------
# Evaluation and checkpoints


def run_eval(t: Trainer, iter_num: int) -> dict:
    """The "eval" record at `iter_num`: loss (and accuracy for a task) of both splits on the
    fixed batches, mean iterations, the validation loss at each of `eval_loops`, and (looped
    models, `loop_monitor`) per group the last iteration's relative change and Lipschitz
    estimate (`blockloop.monitor`)."""
    # Loop noise in evaluation draws from the global generator: seed it from the iteration,
    # or a resumed run's first evaluation would see other noise than the uninterrupted run's.
    torch.manual_seed(mix_seed(EVAL_SEED, iter_num))
    task = t.data.task is not None
    record = {"iter": iter_num, "kind": "eval"}
    for split, batches in t.eval_sets.items():
        res = evaluate(t.model, batches, device=t.device, ctx=t.ctx)
        record[f"{split}_loss"] = res.loss
        if task:
            record[f"{split}_accuracy"] = res.accuracy
        if split == "val" and res.iterations:
            record["val_mean_iterations"] = res.mean_iterations
    for n in t.loop_counts:
        res = evaluate(t.model, t.eval_sets["val"], device=t.device, ctx=t.ctx, num_loops=n,
                       loop_exit=False)
        record[f"val_loss@{n}"] = res.loss
        if task:
            record[f"val_accuracy@{n}"] = res.accuracy
    if t.cfg.loop_monitor and is_looped(t.raw_model.config):
        x, _ = t.eval_sets["val"][0]
        record.update(loop_monitor(t.raw_model, x[:MONITOR_SEQUENCES].to(t.device)))
    return record


def checkpoint_payload(t: Trainer, iter_num: int) -> dict:
    """What a checkpoint at `iter_num` holds: weights, optimizer, configs, progress, data."""
    cfg, data = t.cfg, t.data
    return {
        "format": CHECKPOINT_FORMAT,
        "model": t.raw_model.state_dict(),
        "optimizer": t.optimizer.state_dict(),
        "scaler": t.scaler.state_dict() if t.scaler.is_enabled() else {},
        "model_config": t.raw_model.config.to_dict(),
        "train_config": cfg.to_dict(),
        "iter_num": iter_num,
        "best_val_loss": t.best_val_loss,
        "train_flops": t.train_flops,
        # Token data: what decoding needs travels with the weights (sampling works from any
        # directory, and a re-prepared data directory is recognised as different).
        "meta": data.meta if data.task is not None else {
            "data_dir": str(cfg.resolved_data_dir()), **decoding_meta(data.meta)
        },
    }


def save_run_checkpoint(t: Trainer, names: list[str], iter_num: int) -> None:
    """Save the checkpoint of `iter_num` under each of `names`; the first save of a run that
    replaces another commits its pending log and config.json, and drops the old run's .prev
    copies, so that from then on the directory holds this run alone."""
    payload = checkpoint_payload(t, iter_num)
    for name in names:
        save_checkpoint(t.out_dir / name, payload)
    if t.metrics.commit():
        save_resolved_config(t.out_dir / "config.json", t.cfg, t.raw_model.config)
        for name in (BEST_CKPT, LAST_CKPT):
            if name not in names:
                continue
            for stale in (prev_path(t.out_dir / name), sidecar_path(prev_path(t.out_dir / name))):
                stale.unlink(missing_ok=True)


def evaluate_and_checkpoint(t: Trainer, iter_num: int, t_start: float) -> dict:
    """Evaluate at `iter_num`, log the record, then save best.pt (if better) and last.pt (if
    better, or always_save_checkpoint). Raises DivergedError, saving nothing, for a non-finite
    loss. Returns the record."""
    record = run_eval(t, iter_num)
    record["time_s"] = time.time() - t_start
    t.publish(record, iter_num)
    extra = "".join(
        f", {k} {v:.4f}" for k, v in record.items() if k.startswith("val_") and k != "val_loss"
    )
    t.say(
        f"step {iter_num}: train loss {record['train_loss']:.4f}, "
        f"val loss {record['val_loss']:.4f}{extra}"
    )
    if not (math.isfinite(record["train_loss"]) and math.isfinite(record["val_loss"])):
        # A step with a finite loss can still leave NaN weights (an overflow in the backward
        # pass); saving them would push the last good checkpoint out of .prev, and skipping
        # batches cannot bring them back.
        raise DivergedError(
            f"non-finite evaluation loss at iteration {iter_num}: the weights have "
            f"diverged and are not saved; the last good checkpoint is kept in "
            f"{t.out_dir}. Try a lower learning_rate (now {t.cfg.learning_rate}) or "
            f"dtype=float32/bfloat16 instead of float16"
        )
    improved = record["val_loss"] < t.best_val_loss
    if improved:
        t.best_val_loss = record["val_loss"]
    if t.master and iter_num > 0 and not t.cfg.eval_only:
        # best.pt is only ever replaced by a better model; last.pt is what resumes. best.pt
        # first: a run killed between the two saves resumes from the older last.pt and redoes
        # this evaluation, saves included; in the other order it would resume with
        # best_val_loss already lowered and never write best.pt.
        names = [BEST_CKPT] if improved else []
        if improved or t.cfg.always_save_checkpoint:
            names.append(LAST_CKPT)
        save_run_checkpoint(t, names, iter_num)
    return record


def stop_and_save(t: Trainer, iter_num: int) -> str:
    """After a SIGINT/SIGTERM: save last.pt at `iter_num` (master) and say how to resume;
    returns what stopped the run."""
    stopped_by = t.stop.signal_name or "a signal to another rank"
    if t.master:
        save_run_checkpoint(t, [LAST_CKPT], iter_num)
        t.say(
            f"stopped by {stopped_by}: saved {t.out_dir / LAST_CKPT} at iteration "
            f"{iter_num}. To resume, run the same command with --init_from=resume"
        )
    return stopped_by


def teardown(t: Trainer) -> None:
    """Restore the signal handlers, close the bar and wandb, leave the process group."""
    t.stop.restore()
    if t.bar is not None:
        t.bar.close()
    if t.wandb_run is not None:
        t.wandb_run.finish()
    if t.dist.ddp:
        torch.distributed.destroy_process_group()


# ----------------------------------------------------------------------------------------------
# The loop


def train(cfg: TrainConfig, model_overrides: dict, log=print) -> TrainResult:
    """Train according to `cfg`; returns a summary. Raises ConfigError before any work."""
    t = setup(cfg, model_overrides, log)
    t.stop.install()
    t_start = time.time()
    iter_num, tokens_done, final_val, stopped_by = t.start_iter, 0, None, None
    try:
        while True:
            if iter_num % cfg.eval_interval == 0 or iter_num >= cfg.max_iters or cfg.eval_only:
                final_val = evaluate_and_checkpoint(t, iter_num, t_start)["val_loss"]
            if cfg.eval_only or iter_num >= cfg.max_iters:
                break
            step = train_step(t, iter_num)
            if not step.finite:
                skip_batch(t, iter_num, step.loss)  # or stop, as nan_policy says
                iter_num += 1
                continue
            t.train_flops += step.flops
            tokens_done += t.tokens_per_iter
            log_step(t, iter_num, step)
            iter_num += 1
            if step.stop_requested:
                stopped_by = stop_and_save(t, iter_num)
                break
    finally:
        teardown(t)
    wall = time.time() - t_start
    return TrainResult(
        out_dir=str(t.out_dir),
        iter_num=iter_num,
        best_val_loss=t.best_val_loss,
        final_val_loss=final_val,
        tokens_per_sec=tokens_done / max(wall, 1e-9),
        wall_time_s=wall,
        train_flops=t.train_flops,
        stopped_by=stopped_by,
        metrics_path=str(t.out_dir / METRICS_FILE),
    )


def main(argv: list[str] | None = None) -> int:
    """`blockloop train [CONFIG_FILE ...] [--key=value ...]`: 0 when done or stopped by a
    signal, else one `error:` line and the error's exit code (2 bad input, 3 diverged)."""
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print("usage: blockloop train [CONFIG_FILE ...] [--key=value ...]\n")
        print(help_text())
        return 0
    return run_command(lambda: _train_command(argv))


def _train_command(argv: list[str]) -> int:
    cfg, model_overrides = parse_train_args(argv)
    result = train(cfg, model_overrides)
    if result.stopped_by is None and int(os.environ.get("RANK", 0)) == 0:
        print(f"done: best val loss {result.best_val_loss:.4f}; checkpoints in {result.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
