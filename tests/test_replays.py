"""Faults found by replaying public bug reports against nanoGPT, its forks, recurrent-depth
code and GPT-2 decoding, each turned into the behaviour we want (issue: "fix each kind").

Kinds: a checkpoint that cannot decode on its own; padded vocabularies; a diverged loop state;
a new command destroying a run's history; command lines ending in a traceback.
"""

import json

import pytest
import torch

from blockloop.analysis import main as analyze_main
from blockloop.checkpoint import load_checkpoint, save_checkpoint
from blockloop.config import ConfigError
from blockloop.data import DataError
from blockloop.model import GPT, GPTConfig
from blockloop.sampling import generate
from blockloop.sampling import main as sample_main
from tests.conftest import read_metrics, run, tiny_args, write_token_dataset


def sample(capsys, *args):
    code = sample_main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny char model trained on a 11-symbol data set, its vocabulary padded to 128."""
    root = tmp_path_factory.mktemp("trained")
    data = write_token_dataset(root / "data")
    out = root / "out"
    run(tiny_args(data, out, "--max_iters=8", "--vocab_size=128"))
    return data, out


def swap_two_symbols(data_dir):
    """Re-prepare `data_dir` as a corpus with two characters exchanged: same vocabulary size,
    another mapping from ids to text."""
    meta = json.loads((data_dir / "meta.json").read_text())
    itos = meta["tokenizer"]["itos"]
    itos[1], itos[2] = itos[2], itos[1]
    (data_dir / "meta.json").write_text(json.dumps(meta))


# ----------------------------------------------------------------------------------------------
# 1. A checkpoint carries its tokenizer


def test_checkpoint_decodes_with_its_own_vocabulary_from_anywhere(trained, tmp_path, capsys,
                                                                  monkeypatch):
    data, out = trained
    args = ("--out_dir", out, "--device", "cpu", "--num_samples", 1, "--max_new_tokens", 40,
            "--start", "a")
    code, before, _ = sample(capsys, *args)
    assert code == 0
    payload = load_checkpoint(out / "best.pt")
    assert payload["meta"]["tokenizer"]["itos"] == [chr(ord("a") + i) for i in range(11)]
    # From another working directory, with the data directory gone: the same text.
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "best.pt").write_bytes((out / "best.pt").read_bytes())
    monkeypatch.chdir(tmp_path)
    code, elsewhere, _ = sample(capsys, *args[:1], copy, *args[2:])
    assert code == 0 and elsewhere == before


def test_reprepared_data_is_named_and_never_decodes_the_model(tmp_path, capsys):
    data = write_token_dataset(tmp_path / "data")
    out = tmp_path / "out"
    run(tiny_args(data, out, "--max_iters=4", "--loop_center_idx=0", "--max_loops=2"))
    args = ("--out_dir", out, "--device", "cpu", "--num_samples", 1, "--max_new_tokens", 30,
            "--start", "a")
    _, before, _ = sample(capsys, *args)
    swap_two_symbols(data)
    code, after, err = sample(capsys, *args)
    assert code == 0 and after == before  # decoded with the trained vocabulary, not the new one
    assert "meta.json has changed" in err
    # Reading validation data encoded with another vocabulary is refused, naming the file.
    assert analyze_main(["--out_dir", str(out), "--batches", "1"]) == 2
    assert "meta.json has changed" in capsys.readouterr().err
    with pytest.raises(DataError, match="meta.json has changed"):
        run(tiny_args(data, out, "--max_iters=6", "--init_from=resume", "--loop_center_idx=0",
                      "--max_loops=2"))


# ----------------------------------------------------------------------------------------------
# 2. A padded vocabulary never yields an id the tokenizer cannot decode


def test_padded_vocabulary_samples_decode_with_default_options(trained, capsys):
    _, out = trained
    code, text, err = sample(capsys, "--out_dir", out, "--device", "cpu", "--num_samples", 3,
                             "--max_new_tokens", 200, "--temperature", 3.0, "--start", "a")
    assert code == 0, err
    assert set(text.replace("\n", "").replace("-", "")) <= set("abcdefghijk")


def test_generate_never_draws_padding_even_where_it_is_likeliest():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=64, n_layer=2, n_head=2, n_embd=16)).eval()
    with torch.no_grad():
        model.lm_head.weight[40:] *= 50  # the padding ids dominate every distribution
    idx = torch.zeros((4, 1), dtype=torch.long)
    for use_cache in (True, False):
        ids, _ = generate(model, idx, 30, temperature=1.0, use_cache=use_cache, vocab_limit=40)
        assert ids.max() < 40
    assert model.generate(idx, 30, temperature=1.0, vocab_limit=40).max() < 40


# ----------------------------------------------------------------------------------------------
# 3. A diverged loop state is reported, not sampled from or plotted into a crash


def diverging_run(tmp_path):
    """A "concat" run trained at 3 iterations whose state grows geometrically when run longer."""
    data = write_token_dataset(tmp_path / "data")
    out = tmp_path / "out"
    run(tiny_args(data, out, "--max_iters=4", "--loop_center_idx=0", "--max_loops=3",
                  "--loop_input_injection=concat"))
    for name in ("best.pt", "last.pt"):
        payload = load_checkpoint(out / name)
        for key in payload["model"]:
            if key.startswith("looper.adapters") and key.endswith("weight"):
                payload["model"][key].fill_(0.5)
        save_checkpoint(out / name, payload)
    return out


def test_diverged_state_is_one_line_naming_the_iteration(tmp_path, capsys):
    out = diverging_run(tmp_path)
    for temperature in ("0.8", "0"):
        code, text, err = sample(capsys, "--out_dir", out, "--device", "cpu", "--num_loops", 256,
                                 "--temperature", temperature, "--num_samples", 1, "--start", "a")
        assert code == 3 and text == ""
        assert err.count("\n") == 1 and err.startswith("error: ")
        assert "not finite" in err and "at iteration" in err
    # Iteration counts are bounded, with the same rule as every command.
    code, _, err = sample(capsys, "--out_dir", out, "--device", "cpu", "--num_loops", 4097)
    assert code == 2 and "--num_loops=4097" in err


def test_analysis_marks_diverged_iterations_and_still_reports(tmp_path, capsys):
    out = diverging_run(tmp_path)
    assert analyze_main(["--out_dir", str(out), "--batches", "1", "--num_loops", "256"]) == 0, (
        capsys.readouterr().err
    )
    result = json.loads((out / "analysis" / "analysis.json").read_text())
    scaling = {row["num_loops"]: row["loss"] for row in result["loop_scaling"]}
    assert scaling[1] is not None and scaling[256] is None  # None: diverged (non-finite)
    assert "diverged" in (out / "analysis" / "analysis.md").read_text()


# ----------------------------------------------------------------------------------------------
# 4. Nothing a run wrote changes until a new run has a checkpoint of its own


@pytest.fixture
def finished(tmp_path):
    data = write_token_dataset(tmp_path / "data")
    out = tmp_path / "out"
    run(tiny_args(data, out, "--max_iters=8"))
    return data, out


def snapshot(out):
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()}


def test_eval_only_needs_trained_weights_and_writes_nothing(finished, capsys):
    data, out = finished
    before = snapshot(out)
    with pytest.raises(ConfigError, match="eval_only=True with init_from='scratch'"):
        run(tiny_args(data, out, "--max_iters=8", "--eval_only=True"))
    res = run(tiny_args(data, out, "--max_iters=8", "--eval_only=True", "--init_from=resume"))
    final = [r for r in read_metrics(out) if r["kind"] == "eval"][-1]
    assert res.final_val_loss == pytest.approx(final["val_loss"], abs=1e-6)
    assert snapshot(out) == before


def test_scratch_run_in_a_run_directory_is_refused_or_replaces_it_only_once_saved(
    finished, monkeypatch
):
    data, out = finished
    before = snapshot(out)
    with pytest.raises(ConfigError, match=r"already holds a run.*--init_from=resume.*--out_dir"
                                          r".*--overwrite_out_dir=True"):
        run(tiny_args(data, out, "--max_iters=8"))
    assert snapshot(out) == before
    # Asked to overwrite, but killed before its first checkpoint: the old run is intact...
    import blockloop.train as train_mod

    def killed(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_mod, "save_checkpoint", killed)
    with pytest.raises(KeyboardInterrupt):
        run(tiny_args(data, out, "--max_iters=8", "--seed=7", "--overwrite_out_dir=True"))
    monkeypatch.undo()
    assert snapshot(out) == before
    # ... and resuming it continues its own history.
    run(tiny_args(data, out, "--max_iters=12", "--init_from=resume"))
    assert [r["iter"] for r in read_metrics(out) if r["kind"] == "eval"] == [0, 4, 8, 12]


def test_resume_mismatches_name_the_key_and_both_values(finished):
    data, out = finished
    with pytest.raises(ConfigError, match=r"n_layer=3.*n_layer=2"):
        run(tiny_args(data, out, "--max_iters=12", "--init_from=resume", "--n_layer=3"))
    for other in (8, 32):
        with pytest.raises(ConfigError, match=rf"block_size={other} differs.*block_size=16"):
            run(tiny_args(data, out, "--max_iters=12", "--init_from=resume",
                          f"--block_size={other}"))


# ----------------------------------------------------------------------------------------------
# 5. Command lines answer bad input in one line


def test_sample_options_answer_in_one_line(trained, tmp_path, capsys):
    _, out = trained
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("caf\xe9".encode("latin-1"))
    cases = [
        (("--start", f"FILE:{latin}"), "not UTF-8"),
        (("--device", "cuda"), "device"),
        (("--device", "cuda:1"), "device"),
        (("--device", "gpu"), "device"),
        (("--temperature", "nan"), "temperature"),
        (("--temperature", "-1"), "temperature"),
        (("--top_k", "-3"), "top_k"),
    ]
    for extra, word in cases:
        code, text, err = sample(capsys, "--out_dir", out, *extra)
        assert code == 2 and text == "", extra
        assert err.startswith("error: ") and err.count("\n") == 1 and word in err, (extra, err)


def test_concat_model_built_for_one_iteration_refuses_more_in_every_command(tmp_path, capsys):
    data = write_token_dataset(tmp_path / "data")
    out = tmp_path / "out"
    run(tiny_args(data, out, "--max_iters=4", "--loop_center_idx=0", "--max_loops=1",
                  "--loop_input_injection=concat"))
    code, _, err = sample(capsys, "--out_dir", out, "--device", "cpu", "--num_loops", 2)
    assert code == 2 and err.count("\n") == 1 and "only run 1 iteration" in err
    assert analyze_main(["--out_dir", str(out), "--num_loops", "2"]) == 2
    assert "only run 1 iteration" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="only run 1 iteration"):
        run(tiny_args(data, tmp_path / "o2", "--max_iters=4", "--loop_center_idx=0",
                      "--max_loops=1", "--loop_input_injection=concat", "--eval_loops=1,2"))


def test_no_tokens_asked_prints_no_nan(trained, capsys):
    _, out = trained
    code, _, err = sample(capsys, "--out_dir", out, "--device", "cpu", "--max_new_tokens", 0,
                          "--num_samples", 1, "--start", "a")
    assert code == 0 and "nan" not in err.lower()


def test_gpt2_padded_vocabulary_samples_decode(tmp_path, capsys, monkeypatch):
    # nanoGPT's GPT-2 config pads 50257 ids to 50304; here the 47 padding ids even carry the
    # largest logits, so only the mask keeps them out of the sample.
    monkeypatch.setenv("BLOCKLOOP_OFFLINE", "1")
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=50304, n_layer=1, n_head=1, n_embd=8))
    with torch.no_grad():
        model.lm_head.weight[50257:] *= 200
    out = tmp_path / "out"
    out.mkdir()
    meta = {"tokenizer": {"kind": "gpt2"}, "vocab_size": 50257, "tokenizer_sha256": "x"}
    save_checkpoint(out / "last.pt", {"format": "blockloop-ckpt-v1", "model": model.state_dict(),
                                      "model_config": model.config.to_dict(),
                                      "train_config": {}, "meta": meta})
    code, text, err = sample(capsys, "--out_dir", out, "--device", "cpu", "--num_samples", 2,
                             "--max_new_tokens", 20, "--start", "Hello")
    assert code == 0, err
    assert text.count("Hello") == 2
