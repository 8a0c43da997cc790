"""Configuration: safe config files, typed --key=value overrides, clear errors."""

from pathlib import Path

import pytest

from blockloop.config import ConfigError, parse_train_args, read_config_file

ROOT = Path(__file__).resolve().parent.parent


def test_shipped_configs_parse(tmp_path):
    for path in sorted((ROOT / "config").glob("train_*.py")):
        cfg, model = parse_train_args([str(path)])
        assert cfg.out_dir


def test_nanogpt_shakespeare_char_values():
    cfg, model = parse_train_args([str(ROOT / "config/train_shakespeare_char.py")])
    assert (cfg.batch_size, cfg.block_size, cfg.max_iters, cfg.learning_rate) == (64, 256, 5000, 1e-3)
    assert (cfg.min_lr, cfg.beta2, cfg.warmup_iters, cfg.eval_interval) == (1e-4, 0.99, 100, 250)
    assert model["n_layer"] == 6 and model["n_embd"] == 384 and model["dropout"] == 0.2
    assert model["bias"] is False  # nanoGPT's train.py default


def test_overrides_are_typed_and_win_over_the_file():
    cfg, model = parse_train_args(
        [str(ROOT / "config/train_shakespeare_char.py"), "--batch_size=12", "--learning_rate=3e-4",
         "--compile=False", "--n_layer=4", "--eval_loops=1,2,4", "--loop_center_idx=1", "--max_loops=3"]
    )
    assert cfg.batch_size == 12 and isinstance(cfg.batch_size, int)
    assert cfg.learning_rate == 3e-4 and cfg.compile is False
    assert cfg.eval_loops == [1, 2, 4]
    assert model["n_layer"] == 4 and model["max_loops"] == 3


def test_config_file_arithmetic_and_no_code_execution(tmp_path):
    marker = tmp_path / "ran"
    ok = tmp_path / "ok.py"
    ok.write_text('"""doc"""\nbatch_size = 4 * 3\nout_dir = "out-" + "x"\nlearning_rate = 6e-4\n')
    assert read_config_file(ok) == {"batch_size": 12, "out_dir": "out-x", "learning_rate": 6e-4}
    evil = tmp_path / "evil.py"
    evil.write_text(f"batch_size = __import__('pathlib').Path({str(marker)!r}).touch()\n")
    with pytest.raises(ConfigError, match="never executed"):
        parse_train_args([str(evil)])
    assert not marker.exists()


@pytest.mark.parametrize(
    "args,key",
    [
        (["--batch_sise=4"], "batch_size"),  # unknown, with a suggestion
        (["--batch_size=four"], "batch_size"),
        (["--batch_size=0"], "batch_size"),
        (["--learning_rate=-1"], "learning_rate"),
        (["--compile=maybe"], "compile"),
        (["--dtype=int8"], "dtype"),
        (["--n_embd=100", "--n_head=3"], "n_embd"),
        (["--loop_center_idx=5", "--n_layer=4"], "loop_center_idx"),
        (["--max_loops=0"], "max_loops"),
        (["--eval_loops=1,x"], "eval_loops"),
        (["--min_lr=1", "--learning_rate=0.1"], "min_lr"),
        (["--batch_size"], "batch_size"),
        (["missing_file.py"], "missing_file.py"),
    ],
)
def test_bad_values_name_the_key(args, key):
    with pytest.raises(ConfigError, match=key):
        parse_train_args(args)


def test_unknown_key_in_file_is_refused(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("n_layers = 4\n")
    with pytest.raises(ConfigError, match="n_layers.*n_layer"):
        parse_train_args([str(bad)])


def test_base_config_is_read_first_and_overridden(tmp_path):
    (tmp_path / "base.py").write_text('batch_size = 8\nlearning_rate = 1e-3\nout_dir = "base"\n')
    (tmp_path / "child.py").write_text('base_config = "base.py"\nbatch_size = 4\n')
    cfg, _ = parse_train_args([str(tmp_path / "child.py"), "--learning_rate=2e-3"])
    assert (cfg.batch_size, cfg.learning_rate, cfg.out_dir) == (4, 2e-3, "base")
    (tmp_path / "a.py").write_text('base_config = "b.py"\n')
    (tmp_path / "b.py").write_text('base_config = "a.py"\n')
    with pytest.raises(ConfigError, match="loops back"):
        parse_train_args([str(tmp_path / "a.py")])


def test_looped_shakespeare_configs_extend_nanogpts():
    plain, _ = parse_train_args([str(ROOT / "config/train_shakespeare_char.py")])
    tied, model = parse_train_args([str(ROOT / "config/train_shakespeare_char_loop_tied.py")])
    assert tied.learning_rate == plain.learning_rate and tied.max_iters == plain.max_iters
    assert model["loop_center_idx"] == 2 and model["max_loops"] == 2 and model["n_embd"] == 384
