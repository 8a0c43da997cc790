"""Training configuration: a typed dataclass filled from a config file and `--key=value` flags.

Keys keep nanoGPT's names and meaning. Model keys (`n_layer`, `loop_center_idx`, ...) belong to
`GPTConfig`; training keys to `TrainConfig`; one flat namespace serves both, as in nanoGPT.

Config files look like nanoGPT's (`key = value` lines of Python) but are never executed: they are
parsed with `ast` and only literal values (and arithmetic on literals, e.g. `5 * 8`) are accepted,
so reading a config cannot run code. Every value is type-checked and range-checked before any
work starts; an error names the key and what is allowed.
"""

from __future__ import annotations

import ast
import copy
import difflib
import operator
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from blockloop.errors import ConfigError
from blockloop.looping import MAX_LOOPS_LIMIT
from blockloop.model import GPTConfig, check_field_types
from blockloop.records import atomic_write_json, code_identity
from blockloop.runtime import DTYPES, check_device_name

NAN_POLICIES = ("stop", "skip")
TASK_DATASETS = ("phop", "pointer")
# nanoGPT's train.py trains without biases by default; its model.py defaults to biases.
TRAIN_MODEL_DEFAULTS = {"bias": False}


@dataclass
class TrainConfig:
    # I/O
    out_dir: str = "out"
    eval_interval: int = 2000
    log_interval: int = 1
    eval_iters: int = 200
    eval_only: bool = False
    always_save_checkpoint: bool = True
    # Starting from scratch in an out_dir that holds a run is refused unless this is set; the
    # old run's files are then replaced only once the new run has saved its first checkpoint.
    overwrite_out_dir: bool = False
    init_from: str = "scratch"  # 'scratch', 'resume', 'gpt2*' or a nanoGPT/HF checkpoint path
    # logging
    wandb_log: bool = False
    wandb_project: str = "blockloop"
    wandb_run_name: str = "run"
    progress: bool = True
    # data
    dataset: str = "openwebtext"
    data_dir: str = ""  # default: data/<dataset>
    gradient_accumulation_steps: int = 40
    batch_size: int = 12
    block_size: int = 1024
    # synthetic depth-sensitive tasks (dataset = 'phop' or 'pointer')
    phop_n: int = 16
    phop_alphabet: int = 4
    phop_hops: int = 2
    phop_no_adjacent_repeat: bool = True
    pointer_items: int = 8
    pointer_hops: int = 2
    task_eval_size: int = 1024
    # optimiser
    learning_rate: float = 6e-4
    max_iters: int = 600000
    weight_decay: float = 1e-1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    decay_lr: bool = True
    warmup_iters: int = 2000
    lr_decay_iters: int = 600000
    min_lr: float = 6e-5
    # looping during training and evaluation
    eval_loops: list = field(default_factory=list)  # extra iteration counts to evaluate at
    # At each evaluation of a looped model, log per group the last iteration's relative change
    # and a Lipschitz estimate of the iteration map (blockloop.monitor).
    loop_monitor: bool = True
    # system
    backend: str = "auto"  # DDP backend: nccl on CUDA, gloo on CPU
    device: str = "auto"
    dtype: str = "auto"
    compile: bool = False
    threads: int = 0  # torch intra-op threads; 0 leaves torch's default
    seed: int = 1337
    nan_policy: str = "stop"

    def validate(self) -> None:
        check_field_types(self, ConfigError)
        positive = (
            "eval_interval", "log_interval", "eval_iters", "gradient_accumulation_steps",
            "batch_size", "block_size", "phop_n", "phop_alphabet", "phop_hops",
            "pointer_items", "pointer_hops", "task_eval_size",
        )
        for key in positive:
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}={getattr(self, key)}: must be a positive integer")
        # seed: batches are drawn from it by generators that take no negative seeds.
        non_negative = ("max_iters", "warmup_iters", "lr_decay_iters", "threads", "seed")
        for key in non_negative:
            if getattr(self, key) < 0:
                raise ConfigError(f"{key}={getattr(self, key)}: must be >= 0")
        for key in ("learning_rate", "min_lr", "weight_decay", "grad_clip"):
            value = getattr(self, key)
            if not (value >= 0 and value < float("inf")):
                raise ConfigError(f"{key}={value}: must be a finite number >= 0")
        for key in ("beta1", "beta2"):
            if not 0 <= getattr(self, key) < 1:
                raise ConfigError(f"{key}={getattr(self, key)}: must be in [0, 1)")
        if self.min_lr > self.learning_rate:
            raise ConfigError(
                f"min_lr={self.min_lr} is above learning_rate={self.learning_rate}; "
                f"min_lr is the floor the schedule decays to"
            )
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype={self.dtype!r}: must be one of {', '.join(DTYPES)}")
        if self.nan_policy not in NAN_POLICIES:
            raise ConfigError(
                f"nan_policy={self.nan_policy!r}: must be one of {', '.join(NAN_POLICIES)}"
            )
        if self.backend not in ("auto", "nccl", "gloo"):
            raise ConfigError(f"backend={self.backend!r}: must be auto, nccl or gloo")
        check_device_name(self.device)
        for n in self.eval_loops:
            if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MAX_LOOPS_LIMIT:
                raise ConfigError(
                    f"eval_loops={self.eval_loops!r}: must be a list of integers in "
                    f"[1, {MAX_LOOPS_LIMIT}], e.g. --eval_loops=1,2,4,8"
                )
        if not self.out_dir:
            raise ConfigError("out_dir is empty: name the directory for checkpoints and logs")
        if self.eval_only and self.init_from == "scratch":
            raise ConfigError(
                "eval_only=True with init_from='scratch' would evaluate an untrained model; add "
                "--init_from=resume to evaluate the run in out_dir (or init_from=<weights>)"
            )
        if not self.dataset:
            raise ConfigError("dataset is empty: name a prepared dataset, 'phop' or 'pointer'")

    @property
    def is_task(self) -> bool:
        return self.dataset in TASK_DATASETS

    def resolved_data_dir(self) -> Path:
        return Path(self.data_dir) if self.data_dir else Path("data") / self.dataset

    def to_dict(self) -> dict:
        return asdict(self)


TRAIN_KEYS = {f.name: f for f in fields(TrainConfig)}
MODEL_KEYS = {f.name: f for f in fields(GPTConfig) if f.name not in ("block_size",)}


def all_keys() -> dict[str, tuple[str, object]]:
    """Every configurable key -> (type name, default), for --help and validation messages."""
    keys = {}
    defaults = TrainConfig()
    for name, f in TRAIN_KEYS.items():
        keys[name] = (_type_name(f.type), getattr(defaults, name))
    model_defaults = GPTConfig(**TRAIN_MODEL_DEFAULTS)
    for name, f in MODEL_KEYS.items():
        keys[name] = (_type_name(f.type), getattr(model_defaults, name))
    return keys


def _type_name(annotation) -> str:
    return annotation if isinstance(annotation, str) else annotation.__name__


_BINOPS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Pow: operator.pow,
    ast.Mod: operator.mod,
}


def literal_value(node, where: str, constants: dict | None = None, kind: str = "config"):
    """The value of one parsed expression: a literal, or arithmetic on literals.

    Numbers, strings, booleans, None, lists and tuples (as lists) are allowed, with `+ - * / //
    % **` on numbers and `+` on strings. With `constants` (experiment files) dicts with string
    keys are allowed too, and a name refers to a constant assigned earlier (also as `**NAME`
    inside a dict; the value is copied). Anything else raises ConfigError naming `where`;
    `kind` names the file type in that message.
    """
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, (ast.List, ast.Tuple)):
        return [literal_value(e, where, constants, kind) for e in node.elts]
    if constants is not None and isinstance(node, ast.Name):
        if node.id not in constants:
            raise ConfigError(
                f"{where}: unknown name '{node.id}'; only upper-case constants assigned earlier "
                f"in the file can be used (e.g. LOOP = {{...}})"
            )
        return copy.deepcopy(constants[node.id])
    if constants is not None and isinstance(node, ast.Dict):
        return _dict_value(node, where, constants, kind)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        v = literal_value(node.operand, where, constants, kind)
        return -v if isinstance(node.op, ast.USub) else v
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        left = literal_value(node.left, where, constants, kind)
        right = literal_value(node.right, where, constants, kind)
        if isinstance(left, (int, float)) and isinstance(right, (int, float)):
            if isinstance(node.op, ast.Pow) and abs(right) > 64:
                raise ConfigError(f"{where}: exponent too large")
            return _BINOPS[type(node.op)](left, right)
        if isinstance(node.op, ast.Add) and isinstance(left, str) and isinstance(right, str):
            return left + right
    raise ConfigError(
        f"{where}: only literal values (numbers, strings, booleans, lists) and arithmetic on "
        f"numbers are allowed in {kind} files; {kind} files are parsed, never executed"
    )


def _dict_value(node: ast.Dict, where: str, constants: dict, kind: str) -> dict:
    out = {}
    for k, v in zip(node.keys, node.values):
        if k is None:  # `**NAME`
            merged = literal_value(v, where, constants, kind)
            if not isinstance(merged, dict):
                raise ConfigError(f"{where}: '**' needs a dict")
            out.update(merged)
            continue
        if not (isinstance(k, ast.Constant) and isinstance(k.value, str)):
            raise ConfigError(f"{where}: dict keys must be strings")
        out[k.value] = literal_value(v, where, constants, kind)
    return out


def parse_assignments(path: str | os.PathLike, kind: str = "config",
                      constants: bool = False) -> list[tuple[str, object, str]]:
    """The `key = value` lines of a Python-syntax file as `(key, value, where)`, in file order.

    The file is parsed with `ast` and never executed; a docstring is skipped. Config files
    (`kind="config"`) may contain imports (nanoGPT configs sometimes do), which are skipped.
    With `constants` (experiment files) imports are refused, upper-case names are constants
    usable in later values (and are not returned), and dicts are allowed (see `literal_value`).
    `where` names the file and line for messages. Raises ConfigError.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{kind} file {path} not found")
    try:
        tree = ast.parse(path.read_text(), filename=str(path))
    except OSError as e:
        raise ConfigError(f"{kind} file {path}: cannot be read: {e}") from None
    except SyntaxError as e:
        raise ConfigError(f"{kind} file {path}, line {e.lineno}: syntax error: {e.msg}") from None
    names = {} if constants else None
    out = []
    for node in tree.body:
        where = f"{kind} file {path}, line {getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            continue  # a docstring
        if not constants and isinstance(node, (ast.Import, ast.ImportFrom)):
            continue  # the values read are literals
        if not (
            isinstance(node, ast.Assign)
            and len(node.targets) == 1
            and isinstance(node.targets[0], ast.Name)
        ):
            raise ConfigError(f"{where}: expected 'key = value'")
        key = node.targets[0].id
        value = literal_value(node.value, where, names, kind)
        if constants and key.isupper():
            names[key] = value  # a reusable constant, not a key
        else:
            out.append((key, value, where))
    return out


# A config file may start from another one: `base_config = "train_gpt2.py"` (relative to the
# file) reads that file first and lets this one override it, so variants repeat no settings.
BASE_CONFIG_KEY = "base_config"


def read_config_file(path: str | os.PathLike, _chain: tuple = ()) -> dict:
    """`key = value` assignments from a nanoGPT-style Python config file, parsed safely."""
    path = Path(path)
    if path.resolve() in _chain:
        raise ConfigError(f"config file {path}: {BASE_CONFIG_KEY} chain loops back to itself")
    values = {key: value for key, value, _ in parse_assignments(path)}
    if BASE_CONFIG_KEY in values:
        base_name = values.pop(BASE_CONFIG_KEY)
        if not isinstance(base_name, str):
            raise ConfigError(f"config file {path}: {BASE_CONFIG_KEY} must be a file name string")
        base = read_config_file(path.parent / base_name, _chain + (path.resolve(),))
        base.update(values)
        values = base
    return values


def parse_value(key: str, text: str, type_name: str):
    """A command-line string converted to the key's type."""
    if type_name == "str":
        return text
    if type_name == "bool":
        low = text.lower()
        if low in ("true", "1", "yes"):
            return True
        if low in ("false", "0", "no"):
            return False
        raise ConfigError(f"--{key}={text}: must be True or False")
    if type_name == "list" and text.strip().startswith("[["):
        try:  # a list of lists, e.g. --loop_groups=[[1,2],[4,4]]
            return ast.literal_eval(text)
        except (ValueError, SyntaxError):
            raise ConfigError(f"--{key}={text}: must be a list such as [[1,2],[4,4]]") from None
    if type_name == "list":
        stripped = text.strip().strip("[]()")
        if not stripped:
            return []
        try:
            return [int(part) for part in stripped.split(",")]
        except ValueError:
            raise ConfigError(
                f"--{key}={text}: must be a comma-separated list of integers, e.g. 1,2,4"
            ) from None
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        raise ConfigError(f"--{key}={text}: must be a number of type {type_name}") from None
    # The type itself is checked once, with every other value, when the configs are built.
    return coerce_value(value, type_name)


def coerce_value(value, type_name: str):
    """The one coercion of a parsed value to its key's type: int -> float, integral floats
    (1e4) -> int, a single int -> [int] for lists, None -> "" for strings. Whatever cannot be
    coerced is returned as it is, for the type checker to name."""
    if type_name == "float" and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if type_name == "int" and isinstance(value, float) and value.is_integer():
        return int(value)
    if type_name == "list" and isinstance(value, int) and not isinstance(value, bool):
        return [value]
    if type_name == "str" and value is None:
        return ""
    return value


def unknown_key_error(key: str, where: str) -> ConfigError:
    close = difflib.get_close_matches(key, list(all_keys()), n=1)
    hint = f"; did you mean '{close[0]}'?" if close else "; see 'blockloop train --help'"
    return ConfigError(f"unknown config key '{key}' ({where}){hint}")


def build_configs(values: dict) -> tuple[TrainConfig, dict]:
    """Split flat key/values into a validated TrainConfig and model keyword overrides."""
    keys = all_keys()
    train_values, model_values = {}, dict(TRAIN_MODEL_DEFAULTS)
    for key, value in values.items():
        if key not in keys:
            raise unknown_key_error(key, "config")
        value = coerce_value(value, keys[key][0])
        if key in TRAIN_KEYS:
            train_values[key] = value
        else:
            model_values[key] = value
    train = TrainConfig(**train_values)
    train.validate()
    # Validate the model keys now (with placeholder sizes the data will fix), so that a bad
    # looping key stops the run before any data is read.
    probe = dict(model_values)
    probe.setdefault("vocab_size", 1)
    try:
        GPTConfig(block_size=train.block_size, **probe)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return train, model_values


def parse_train_args(argv: list[str]) -> tuple[TrainConfig, dict]:
    """`[CONFIG_FILE ...] [--key=value ...]` -> (TrainConfig, model overrides)."""
    keys = all_keys()
    values: dict = {}
    for arg in argv:
        if arg.startswith("--"):
            if "=" not in arg:
                raise ConfigError(f"{arg}: overrides are written --key=value")
            key, text = arg[2:].split("=", 1)
            if key not in keys:
                raise unknown_key_error(key, "command line")
            values[key] = parse_value(key, text, keys[key][0])
        else:
            values.update(read_config_file(arg))
    return build_configs(values)


def save_resolved_config(path: Path, train: TrainConfig, model_config: GPTConfig) -> None:
    """Write a run's `config.json`: the resolved train and model keys, and the code identity
    (`records.code_identity`) of the code that runs them, atomically."""
    data = {"train": train.to_dict(), "model": model_config.to_dict(), "code": code_identity()}
    atomic_write_json(path, data, indent=2)


def help_text() -> str:
    lines = ["Keys (--key=value, or key = value in a config file), with defaults:"]
    for key, (type_name, default) in all_keys().items():
        lines.append(f"  --{key}={default!r}  ({type_name})")
    return "\n".join(lines)
