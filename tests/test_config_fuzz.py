"""Random configurations, hostile ones included, through `blockloop train` end to end.

Each drawn configuration goes through the real command (`blockloop.train.main`), as command-line
flags, as a config file, or split between the two. Every key is drawn either from a range of
legal values (kept small, so that a legal configuration trains one step in a blink) or from
hostile values: negative and zero sizes, sizes no machine can hold, iteration counts beyond
`MAX_LOOPS_LIMIT`, non-integral numbers, NaN and infinity, booleans, None, strings where numbers
belong, numbers where strings belong, and unknown keys. The oracle below derives from the drawn
values which keys are at fault (a hostile value, or legal values that contradict each other);
the command must then

- with no key at fault: exit 0 after a training step with a finite loss, and
- with some key at fault: exit 2 with one line `error: ...` naming one of those keys,

and never let an exception out (a traceback from deep inside torch fails the test).
"""

import io
import json
import keyword
import math
import re
import tempfile
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from blockloop.config import all_keys
from blockloop.looping import MAX_LOOPS_LIMIT
from blockloop.train import main as train_main
from tests.conftest import write_token_dataset

# Legal names of devices this machine lacks: refused before any work.
UNAVAILABLE = ([] if torch.cuda.is_available() else ["cuda", "cuda:0"]) + (
    [] if torch.backends.mps.is_available() else ["mps"])
TINY_VOCAB = 11  # write_token_dataset's vocabulary
# Sizes too large for any machine: refused, never allocated.
HUGE = st.sampled_from([10**15, 2**62, 10**30])
NOT_NUMBERS = st.sampled_from(["abc", "twelve", "1e3x", "", "None"]) | st.none() | st.booleans()
NOT_STRINGS = st.integers(-3, 3) | st.floats(allow_nan=False, allow_infinity=False) | st.booleans()


def ints(lo, hi):
    return st.integers(lo, hi)


def bad_int(minimum, huge=False):
    """Below `minimum`, non-integral, not a number; sizes no machine holds where `huge`."""
    bad = st.integers(minimum - 10**6, minimum - 1) | st.sampled_from([2.5, -0.5, float("nan")]) | NOT_NUMBERS
    return bad | HUGE if huge else bad


def floats(lo, hi):
    return st.floats(lo, hi, allow_nan=False, allow_infinity=False)


BAD_NON_NEGATIVE_FLOAT = (st.floats(max_value=-1e-9, allow_nan=False, allow_infinity=False)
                          | st.sampled_from([float("nan"), float("inf"), -float("inf")]) | NOT_NUMBERS)
# Text the command line would not read as a boolean (it accepts true/false/1/0/yes/no).
BAD_BOOL = st.sampled_from([2, -1, 0.5, "maybe", "oui", None])


def choice(*legal):
    return st.sampled_from(legal)


def bad_choice(*legal):
    text = st.text("abcdefghijklmnopqrstuvwxyz0123456789_:", max_size=8)
    return text.filter(lambda s: s not in legal) | NOT_STRINGS


BOOL = (st.booleans(), BAD_BOOL)
# key -> (legal values, hostile values)
SPACE = {
    # training loop
    "eval_interval": (ints(1, 1000), bad_int(1)),
    "log_interval": (ints(1, 3), bad_int(1)),
    "eval_iters": (ints(1, 2), bad_int(1, huge=True)),
    "always_save_checkpoint": BOOL,
    "init_from": (choice("scratch"), st.sampled_from(["resume", "gpt9", "nonexistent/ckpt.pt"]) | NOT_STRINGS),
    "gradient_accumulation_steps": (ints(1, 2), bad_int(1)),
    "batch_size": (ints(1, 4), bad_int(1, huge=True)),
    "block_size": (ints(8, 24), bad_int(1, huge=True)),
    "max_iters": (choice(1), bad_int(0)),
    "learning_rate": (floats(0, 1e-2), BAD_NON_NEGATIVE_FLOAT),
    "min_lr": (floats(0, 1e-3), BAD_NON_NEGATIVE_FLOAT),
    "weight_decay": (floats(0, 0.2), BAD_NON_NEGATIVE_FLOAT),
    "beta1": (floats(0, 0.99), st.sampled_from([1.0, 1.5, -0.1, float("nan")]) | NOT_NUMBERS),
    "beta2": (floats(0, 0.99), st.sampled_from([1.0, 7.0, -2.0, float("inf")]) | NOT_NUMBERS),
    "grad_clip": (floats(0, 2), BAD_NON_NEGATIVE_FLOAT),
    "decay_lr": BOOL,
    "warmup_iters": (ints(0, 5), bad_int(0)),
    "lr_decay_iters": (ints(0, 20), bad_int(0)),
    "eval_loops": (st.lists(ints(1, 3), max_size=2),
                   st.lists(st.sampled_from([0, -1, 10**9, MAX_LOOPS_LIMIT + 1]), min_size=1, max_size=2)
                   | st.sampled_from(["abc", [1.5], ["x"], [True]])),
    "backend": (choice("auto", "gloo", "nccl"), bad_choice("auto", "gloo", "nccl")),
    "device": (choice("cpu"),
               st.sampled_from(["tpu", "cuda:x", "cuda:", "cuda:99", "gpu0", "", *UNAVAILABLE]) | NOT_STRINGS),
    # float16 is legal, but not on the CPU the fuzz runs on.
    "dtype": (choice("auto", "float32", "bfloat16"),
              st.just("float16") | bad_choice("auto", "float32", "bfloat16", "float16")),
    "threads": (choice(1), bad_int(0)),
    "seed": (ints(0, 10**30), bad_int(0)),
    "nan_policy": (choice("stop", "skip"), bad_choice("stop", "skip")),
    # synthetic tasks (their cross-key rules only matter when the dataset is the task)
    "phop_n": (ints(1, 12), bad_int(1)),
    "phop_alphabet": (ints(1, 6), bad_int(1)),
    "phop_hops": (ints(1, 3), bad_int(1)),
    "phop_no_adjacent_repeat": BOOL,
    "pointer_items": (ints(1, 12), bad_int(1)),
    "pointer_hops": (ints(1, 3), bad_int(1)),
    "task_eval_size": (ints(1, 32), bad_int(1)),
    # model
    "vocab_size": (ints(1, 40), bad_int(1, huge=True)),
    "n_layer": (ints(1, 3), bad_int(1, huge=True)),
    "n_head": (ints(1, 4), bad_int(1, huge=True)),
    "n_embd": (st.sampled_from([4, 6, 8, 12, 16, 24]), bad_int(1, huge=True)),
    "dropout": (floats(0, 0.5), st.sampled_from([1.0, 1.5, -0.1, float("nan")]) | NOT_NUMBERS),
    "bias": BOOL,
    "gelu_approximate": (choice("none", "tanh"), bad_choice("none", "tanh")),
    "position_embedding": (choice("learned", "rope"), bad_choice("learned", "rope")),
    # Only the default is legal for every draw (another base needs position_embedding="rope").
    "rope_base": (st.just(10000.0),
                  st.sampled_from([1.0, 0.5, -3.0, float("nan"), float("inf")]) | NOT_NUMBERS),
    "loop_center_idx": (ints(-1, 2), st.integers(-10**6, -2) | st.sampled_from([1.5]) | NOT_NUMBERS),
    "loop_radius": (ints(0, 1), bad_int(0)),
    "max_loops": (ints(1, 3), st.integers(MAX_LOOPS_LIMIT + 1, 10**18) | bad_int(1)),
    "tied_looping": BOOL,
    "loop_input_injection": (choice("none", "add", "concat"), bad_choice("none", "add", "concat")),
    "concatenate_initial_representation": BOOL,
    "loop_noise_scale": (floats(0, 0.5), BAD_NON_NEGATIVE_FLOAT),
    "loop_noise_in_eval": BOOL,
    "automatic_loop_exit": BOOL,
    "automatic_loop_exit_threshold": (floats(0, 0.1), BAD_NON_NEGATIVE_FLOAT),
    "automatic_loop_exit_in_training": BOOL,
    "loops_representation": BOOL,
    "loop_sampling": (choice("fixed", "uniform", "poisson_lognormal"),
                      bad_choice("fixed", "uniform", "poisson_lognormal")),
    "loop_schedule": (choice("constant", "progressive", "curriculum"),
                      bad_choice("constant", "progressive", "curriculum")),
    "loop_schedule_fraction": (floats(0.01, 1), st.sampled_from([0.0, -0.5, 1.5, float("nan"),
                                                                  float("inf")]) | NOT_NUMBERS),
    "loop_backprop_depth": (ints(0, 3), bad_int(0)),
    "loop_checkpointing": BOOL,
    # Second-generation looping. The legal draws keep the centre/radius form (their cross-key
    # rules with loop_groups are tested in test_loop_groups.py); the hostile ones are refused
    # on their own.
    "loop_groups": (st.just([]), st.sampled_from([[[5, 2]], [[0]], "abc", [[1.5, 2]], [[-1, 0]],
                                                  [[0, 10**9]], [[1, 1], [0, 0]]])),
    "loop_counts": (st.just([]), st.sampled_from([[0], [10**9], ["x"], [1.5], [-2]])),
    "loop_state_init": (choice("input"), bad_choice("input", "noise")),
    "loop_state_norm": (choice("none", "layernorm"), bad_choice("none", "layernorm")),
    "automatic_loop_exit_criterion": (choice("relative_change", "kl", "entropy", "delta_change"),
                                      bad_choice("relative_change", "kl", "entropy",
                                                 "delta_change")),
    "automatic_loop_exit_granularity": (choice("sequence", "token"),
                                        bad_choice("sequence", "token")),
}
# Set by the harness, not drawn: where to write, quiet output, and no compilation or wandb
# (both legal, neither about validation, and compiling takes seconds per configuration).
FIXED = {"progress": False, "compile": False, "wandb_log": False, "eval_only": False, "overwrite_out_dir": False, "loop_monitor": True,
         "wandb_project": "blockloop", "wandb_run_name": "fuzz"}
# Small sizes wherever a key is not drawn, so that the defaults (a 124M model) never train here.
BASE = {"batch_size": 2, "block_size": 24, "n_layer": 2, "n_head": 2, "n_embd": 16, "eval_iters": 1,
        "gradient_accumulation_steps": 1, "max_iters": 1, "eval_interval": 1000, "threads": 1,
        "device": "cpu", "task_eval_size": 16}
UNKNOWN = st.from_regex(r"[a-z][a-z_]{0,14}", fullmatch=True).filter(
    lambda k: k not in all_keys() and not keyword.iskeyword(k))


def test_space_covers_every_key():
    assert set(SPACE) | set(FIXED) | {"out_dir", "dataset", "data_dir"} == set(all_keys())


@st.composite
def configurations(draw):
    dataset = draw(st.sampled_from(["tiny", "phop", "pointer"]))
    n_bad = draw(st.sampled_from([0, 0, 0, 0, 1, 1, 2, 3]))
    bad = set(draw(st.lists(st.sampled_from(sorted(SPACE)), min_size=n_bad, max_size=n_bad, unique=True)))
    values = dict(BASE)
    for key in sorted(SPACE):
        legal, hostile = SPACE[key]
        if key in bad:
            values[key] = draw(hostile)
        elif draw(st.integers(0, 3)) == 0:
            values[key] = draw(legal)
    unknown = draw(st.lists(UNKNOWN, max_size=1)) if draw(st.integers(0, 9)) == 0 else []
    for key in unknown:
        values[key] = draw(ints(0, 5))
    where = {key: draw(st.sampled_from(["flag", "file"])) for key in values}
    return dataset, values, bad | set(unknown), where


def faults(dataset, values, bad):
    """(keys that must be named, keys that may be): the oracle for a drawn configuration."""
    must, maybe = set(bad), set()
    v = {key: default for key, (_, default) in all_keys().items()}
    v.update(values)

    def rule(broken, *keys):
        # A rule between legal values. It is not evaluated when one of its keys is hostile (the
        # run must fail anyway, and the rule could not be computed).
        if not (set(keys) & bad) and broken():
            must.update(keys)

    rule(lambda: v["min_lr"] > v["learning_rate"], "min_lr", "learning_rate")
    rule(lambda: v["n_embd"] % v["n_head"] != 0, "n_embd", "n_head")
    # RoPE rotates channel pairs: a head needs an even size.
    rule(lambda: v["position_embedding"] == "rope" and v["n_embd"] % v["n_head"] == 0
         and (v["n_embd"] // v["n_head"]) % 2 == 1, "position_embedding", "n_embd", "n_head")
    rule(lambda: v["loop_center_idx"] >= 0 and not (
        0 <= v["loop_center_idx"] - v["loop_radius"] and v["loop_center_idx"] + v["loop_radius"] < v["n_layer"]
    ), "loop_center_idx", "loop_radius", "n_layer")
    rule(lambda: v["concatenate_initial_representation"] and v["loop_input_injection"] == "add",
         "concatenate_initial_representation", "loop_input_injection")
    # Progressive looping switching at the very end would never train at the full count.
    rule(lambda: v["loop_schedule"] == "progressive" and v["loop_schedule_fraction"] == 1,
         "loop_schedule", "loop_schedule_fraction")
    # A loop schedule needs a loop (the drawn configurations loop through loop_center_idx only).
    rule(lambda: v["loop_schedule"] != "constant" and v["loop_center_idx"] < 0,
         "loop_schedule", "loop_center_idx")
    # Truncated backprop's gradient window could lie past an early exit in training.
    rule(lambda: v["loop_backprop_depth"] > 0 and v["automatic_loop_exit_in_training"],
         "loop_backprop_depth", "automatic_loop_exit_in_training")
    # A concat loop built for one iteration has no adapters to evaluate a second.
    rule(lambda: v["loop_center_idx"] >= 0 and v["max_loops"] == 1 and any(n > 1 for n in v["eval_loops"])
         and (v["concatenate_initial_representation"] or v["loop_input_injection"] == "concat"),
         "eval_loops", "max_loops", "loop_center_idx", "concatenate_initial_representation",
         "loop_input_injection")

    if dataset == "tiny":
        rule(lambda: "vocab_size" in values and values["vocab_size"] < TINY_VOCAB, "vocab_size")
    elif dataset == "phop":
        rule(lambda: v["phop_n"] < 2, "phop_n")
        rule(lambda: v["phop_alphabet"] < (3 if v["phop_no_adjacent_repeat"] else 2),
             "phop_alphabet", "phop_no_adjacent_repeat")
        rule(lambda: v["phop_no_adjacent_repeat"] and v["phop_n"] < v["phop_hops"] + 2,
             "phop_n", "phop_hops", "phop_no_adjacent_repeat")
        rule(lambda: v["phop_n"] + 1 > v["block_size"], "block_size", "phop_n")
        rule(lambda: "vocab_size" in values and values["vocab_size"] < v["phop_alphabet"] + 1,
             "vocab_size", "phop_alphabet")
        # Whether enough sequences have a defined hop chain is a property of the example space:
        # a refusal is legal, if it names the task's keys.
        maybe.update(("phop_n", "phop_alphabet", "phop_hops", "phop_no_adjacent_repeat"))
    else:
        rule(lambda: v["pointer_items"] < 2, "pointer_items")
        rule(lambda: v["pointer_items"] + 2 > v["block_size"], "block_size", "pointer_items")
        rule(lambda: "vocab_size" in values and values["vocab_size"] < v["pointer_items"] + 1,
             "vocab_size", "pointer_items")
        maybe.add("pointer_items")  # too few distinct examples for a held-out set
    return must, maybe


def render(value, where):
    """A value as the command line or a config file spells it."""
    if where == "file":
        if isinstance(value, float) and not math.isfinite(value):
            # Config files hold literals: infinity is 1e999, NaN the arithmetic 1e999 - 1e999.
            return "(1e999 - 1e999)" if math.isnan(value) else ("1e999" if value > 0 else "-1e999")
        return repr(value)
    if isinstance(value, list):
        return ",".join(str(x) for x in value)
    return str(value)


def names(message, key):
    return re.search(rf"(?<![\w]){re.escape(key)}(?![\w])", message) is not None


def hostile(dataset, render_in, legal=(), **values):
    """An explicit example: BASE with the legal `legal` and the hostile `values`, all given as
    flags or all in the config file."""
    drawn = {**BASE, **dict(legal), **values}
    return dataset, drawn, set(values), {k: render_in for k in drawn}


@pytest.mark.slow
# Sizes no machine can hold and iteration counts in the billions, always tried: each must be
# refused by name before anything is allocated or looped (random draws reach them less often).
@example(hostile("phop", "flag", n_layer=10**15))
@example(hostile("tiny", "file", n_embd=2**62))
@example(hostile("pointer", "flag", block_size=10**30))
@example(hostile("tiny", "file", vocab_size=10**15))
@example(hostile("tiny", "flag", batch_size=10**15))
@example(hostile("phop", "file", eval_iters=10**15))
@example(hostile("tiny", "flag", {"loop_center_idx": 1}, max_loops=10**18))
@example(hostile("tiny", "file", {"loop_center_idx": 1}, eval_loops=[10**9]))
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(configurations())
def test_every_configuration_trains_or_is_refused_naming_the_key(tiny_data, drawn):
    dataset, values, bad, where = drawn
    must, maybe = faults(dataset, values, bad)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        harness = {**FIXED, "dataset": dataset, "out_dir": str(tmp / "out")}
        if dataset == "tiny":
            harness["data_dir"] = str(tiny_data)
        flags = [f"--{k}={render(v, 'flag')}" for k, v in harness.items()]
        flags += [f"--{k}={render(v, 'flag')}" for k, v in values.items() if where[k] == "flag"]
        in_file = [f"{k} = {render(v, 'file')}" for k, v in values.items() if where[k] == "file"]
        config = tmp / "config.py"
        config.write_text("\n".join(in_file) + "\n")
        argv = [str(config), *flags]
        out, err = io.StringIO(), io.StringIO()
        threads = torch.get_num_threads()
        try:
            with redirect_stdout(out), redirect_stderr(err):
                rc = train_main(argv)
        finally:
            torch.set_num_threads(threads)
        err = err.getvalue()
        if must:
            assert rc == 2, (argv, must, err)
        event("refused" if rc == 2 else "trained")
        if rc == 2:
            lines = err.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("error: "), err
            assert any(names(lines[0], k) for k in must | maybe), (lines[0], must, maybe, argv)
        else:
            assert rc == 0, (argv, err)
            records = [json.loads(line) for line in (tmp / "out" / "metrics.jsonl").read_text().splitlines()]
            step = [r for r in records if r["kind"] == "train"]
            assert [r["iter"] for r in step] == [0] and math.isfinite(step[0]["loss"]), records
            final = [r for r in records if r["kind"] == "eval"][-1]
            assert final["iter"] == 1 and math.isfinite(final["val_loss"]), records


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return write_token_dataset(tmp_path_factory.mktemp("fuzz") / "tiny")
