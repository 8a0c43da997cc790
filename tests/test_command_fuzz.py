"""Every command's options driven with hostile values, as test_config_fuzz does for `train`'s keys.

Each (command, option, value) below is one that the command must refuse: it exits 2 (1 for
`prepare`, its established code), prints nothing on stdout, and says why on stderr in one
`error:` line (argparse's own type errors keep argparse's usage line above theirs), never a
traceback. A test checks that the table names every option of every command, so a new option
cannot be added without its hostile values.
"""


import pytest

from blockloop.analysis import build_parser as analyze_parser
from blockloop.analysis import main as analyze_main
from blockloop.experiment.command import build_parser as experiment_parser
from blockloop.experiment.command import main as experiment_main
from blockloop.prepare import build_parser as prepare_parser
from blockloop.prepare import main as prepare_main
from blockloop.sampling import build_parser as sample_parser
from blockloop.sampling import main as sample_main
from tests.conftest import run, tiny_args, write_token_dataset

NUMBER_JUNK = ["abc", "", "1e400x", "0x"]
INT_JUNK = NUMBER_JUNK + ["1.5", "nan"]

HOSTILE = {
    "sample": {
        "--out_dir": ["{missing}", "{file}"],
        "--start": ["FILE:{missing}", "FILE:{latin1}", "FILE:{dir}", "", "Ω"],
        "--num_samples": INT_JUNK + ["0", "-1"],
        "--max_new_tokens": INT_JUNK + ["-1"],
        "--temperature": NUMBER_JUNK + ["nan", "-1", "inf", "-inf"],
        "--top_k": INT_JUNK + ["-1"],
        "--seed": INT_JUNK,
        "--device": ["gpu", "cuda", "cuda:1", "", "cpu:0:1"],
        "--num_loops": INT_JUNK + ["0", "-1", "4097"],
        "--exit_threshold": NUMBER_JUNK + ["nan", "-1"],
        "--refill_keep": INT_JUNK + ["0", "-1", "100000"],
        "--data_dir": [],  # used only by checkpoints that do not carry their tokenizer
        "--adaptive_exit": [], "--no_cache": [],  # flags: no value to spoil
    },
    "analyze": {
        "--out_dir": ["{missing}", "{file}"],
        "--num_loops": INT_JUNK + ["0", "-1", "4097"],
        "--batches": INT_JUNK + ["0", "-1"],
        "--device": ["gpu", "cuda", "cuda:1", ""],
        "--report_dir": ["{file}"],
        "--checkpoint": ["newest", ""],
        "--data_dir": ["{missing}", "{file}"],
        "--thresholds": NUMBER_JUNK + ["nan", "-1", ",", "1,,x"],
        # {dir}: no checkpoint in it; {out}: a looped run, not a plain one.
        "--compare_to": ["{missing}", "{file}", "{dir}", "{out}"],
        "--fate_factor": INT_JUNK + ["0", "-1", "65"],
        "--lipschitz_sequences": INT_JUNK + ["0", "-1", "4097"],
        "--lipschitz_iters": INT_JUNK + ["0", "-1", "1001"],
    },
    "prepare": {
        "--data_dir": ["{file}", "{file}/below"],
        "--source": ["{missing}", "{dir}", "{latin1}"],
        "--offline": [],
    },
    "experiment": {
        "--out": ["{file}"],
        "--jobs": INT_JUNK + ["0", "-1"],
        "--force": [], "--keep_other_code": [], "--report-only": [],
    },
}


@pytest.fixture(scope="module")
def places(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    data = write_token_dataset(root / "data")
    out = root / "out"
    run(tiny_args(data, out, "--max_iters=2", "--loop_center_idx=0", "--max_loops=2"))
    (root / "file").write_text("a file, not a directory")
    (root / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (root / "dir").mkdir()
    (root / "text.txt").write_text("to be or not to be, that is the question\n" * 300)
    experiment = root / "experiment.py"
    experiment.write_text(
        "name = 'fuzz'\nvariants = [{'name': 'a'}]\nbudget = {'iters': 1}\nseeds = [1]\n"
        f"base = {{'data_dir': '{data}', 'dataset': 'tiny', 'n_layer': 1, 'n_head': 1, "
        "'n_embd': 8, 'block_size': 8, 'batch_size': 2, 'gradient_accumulation_steps': 1, "
        "'eval_iters': 1, 'device': 'cpu'}\n"
    )
    return {"root": root, "out": out, "data": data, "experiment": experiment,
            "missing": root / "missing", "file": root / "file", "latin1": root / "latin1.txt",
            "dir": root / "dir"}


def fill(value: str, places: dict) -> str:
    return value.format(**{k: str(v) for k, v in places.items()})


def base_args(command: str, places: dict) -> list[str]:
    return {
        "sample": ["--out_dir", str(places["out"]), "--device", "cpu", "--num_samples", "1",
                   "--max_new_tokens", "2", "--start", "a"],
        "analyze": ["--out_dir", str(places["out"]), "--device", "cpu", "--batches", "1"],
        "prepare": ["shakespeare_char", "--offline", "--source", str(places["root"] / "text.txt"),
                    "--data_dir", str(places["root"] / "prep")],
        "experiment": [str(places["experiment"]), "--out", str(places["root"] / "exp")],
    }[command]


MAINS = {"sample": sample_main, "analyze": analyze_main, "prepare": prepare_main,
         "experiment": experiment_main}
PARSERS = {"sample": sample_parser, "analyze": analyze_parser, "experiment": experiment_parser}
CASES = [(c, opt, v) for c, opts in HOSTILE.items() for opt, vals in opts.items() for v in vals]


def with_option(args: list[str], option: str, value: str) -> list[str]:
    """`args` with `option` set to `value` (replacing its earlier value if any)."""
    out = list(args)
    if option in out:
        del out[out.index(option): out.index(option) + 2]
    return out + [f"{option}={value}"]


@pytest.mark.parametrize("command,option,value", CASES,
                         ids=[f"{c}{o}={v!r}" for c, o, v in CASES])
def test_hostile_value_is_refused_in_one_line(command, option, value, places, capsys):
    args = with_option(base_args(command, places), option, fill(value, places))
    try:
        code = MAINS[command](args)
    except SystemExit as e:  # argparse refuses inside parse_args for commands that let it
        code = e.code
    out, err = capsys.readouterr()
    assert code == (1 if command == "prepare" else 2), (args, err)
    assert out == "" or command == "prepare", out  # prepare prints its source first
    lines = err.strip().splitlines()
    assert "Traceback" not in err
    assert lines and "error:" in lines[-1], err
    assert len([line for line in lines if not line.startswith("usage:") and
                not line.startswith(" ")]) == 1, err


@pytest.mark.parametrize("command", sorted(PARSERS))
def test_every_option_has_hostile_values_listed(command):
    options = {
        s for action in PARSERS[command]()._actions for s in action.option_strings
        if s.startswith("--") and s != "--help"
    }
    listed = set(HOSTILE[command])
    # One spelling per option is enough (--keep_other_code / --keep-other-code).
    aliases = {s for action in PARSERS[command]()._actions for s in action.option_strings[1:]}
    assert options - aliases <= listed | aliases and listed <= options


@pytest.mark.parametrize("command", ["sample", "analyze", "prepare"])
def test_the_base_command_line_works(command, places, capsys):
    """Without a hostile value the command succeeds, so each refusal is the value's doing."""
    assert MAINS[command](base_args(command, places)) == 0, capsys.readouterr().err


def test_the_base_experiment_file_is_valid(places):
    from blockloop.experiment.spec import read_experiment_file

    assert read_experiment_file(places["experiment"]).name == "fuzz"


def test_prepare_options_are_listed():
    sub = prepare_parser()._subparsers._group_actions[0].choices["shakespeare_char"]
    options = {s for a in sub._actions for s in a.option_strings if s.startswith("--")} - {"--help"}
    assert options == set(HOSTILE["prepare"])
