"""Tests for blockloop.experiment: file parsing, run planning (baselines, budgets, safe paths),
and the runner end to end on config/experiment_tiny.py (resume, failures, outputs)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blockloop.config import build_configs
from blockloop.experiment import (
    RESULTS_FILE,
    ExperimentError,
    add_baselines,
    load_results,
    main,
    plan_experiment,
    read_experiment_file,
    safe_name,
)
from blockloop.experiment.runner import _RunProcess
from blockloop.model import GPT, GPTConfig
from blockloop.records import code_identity, read_jsonl, same_code

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "config" / "experiment_tiny.py"
DEFAULT = REPO / "config" / "experiment_default.py"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

TASK_BASE = {"dataset": "phop", "phop_n": 8, "phop_hops": 1, "block_size": 9, "n_head": 2,
             "n_embd": 16, "batch_size": 8, "gradient_accumulation_steps": 1}


def write_experiment(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def simple_file(tmp_path: Path, variants: str, extra: str = "") -> Path:
    return write_experiment(tmp_path / "exp.py", (
        f'name = "t"\nbase = {TASK_BASE!r}\nvariants = {variants}\nseeds = [1, 2]\n'
        f'budget = {{"iters": 3}}\n{extra}'
    ))


def write_char_data(data_dir: Path, seed: int = 0) -> None:
    """A small fake character dataset following docs/CONTRACTS.md."""
    itos = list("\n abcdefgh")
    rng = np.random.default_rng(seed)
    data_dir.mkdir(parents=True)
    sizes = {"train": 4000, "val": 800}
    for split, n in sizes.items():
        rng.integers(0, len(itos), size=n).astype("<u2").tofile(data_dir / f"{split}.bin")
    meta = {"format": "blockloop-tokens-v1", "dataset": "shakespeare_char",
            "vocab_size": len(itos), "dtype": "uint16",
            "tokenizer": {"kind": "char", "itos": itos}, "source": "test",
            "train_tokens": sizes["train"], "val_tokens": sizes["val"]}
    (data_dir / "meta.json").write_text(json.dumps(meta))


def assert_valid_png(path: Path) -> None:
    from matplotlib.image import imread

    assert path.read_bytes()[:8] == PNG_MAGIC, path
    img = imread(path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100, (path, img.shape)


# ---------------------------------------------------------------------------------------------
# Parsing


def test_reads_sections_with_shared_defaults(tmp_path):
    exp = read_experiment_file(write_experiment(tmp_path / "e.py", f'''
"""doc"""
name = "two"
seeds = [3]
budget = {{"iters": 5}}
base = {TASK_BASE!r}
sections = [
    {{"name": "a", "variants": [{{"name": "v", "n_layer": 1}}]}},
    {{"name": "b", "base": {{"n_embd": 32}}, "seeds": [1, 2], "budget": {{"flops": 1e9}},
      "variants": [{{"name": "w", "n_layer": 2}}], "baselines": False}},
]
'''))
    a, b = exp.sections
    assert (a.name, a.seeds, a.budget, a.baselines) == ("a", [3], {"iters": 5}, True)
    assert a.base["n_embd"] == 16
    assert (b.seeds, b.budget, b.baselines) == ([1, 2], {"flops": 1e9}, False)
    # Section base keys override the shared ones; the others are kept.
    assert b.base["n_embd"] == 32 and b.base["dataset"] == "phop"


@pytest.mark.parametrize("text, fragment", [
    ('name = "x"\nvarients = []', "unknown key 'varients'; did you mean 'variants'"),
    ('name = "x"\nseeds = [1]\nbudget = {"iters": 1}\nvariants = [{"name": "a", "n_layyer": 2}]',
     "unknown config key 'n_layyer' in 'variant 'a''; did you mean 'n_layer'"),
    ('name = "x"\nseeds = [1]\nbudget = {"iters": 1}\nvariants = [{"name": "a", "max_iters": 9}]',
     "'max_iters' in 'variant 'a'' is set by the experiment runner"),
    ('name = "x"\nseeds = [1]\nbudget = {"iters": 1}\nbase = {"out_dir": "/etc"}\n'
     'variants = [{"name": "a"}]', "'out_dir' in 'base' is set by the experiment runner"),
    ('name = "x"\nseeds = [1]\nbudget = {"epochs": 1}\nvariants = [{"name": "a"}]',
     "'budget' must hold exactly one of 'iters'"),
    ('name = "x"\nseeds = [1, 1]\nbudget = {"iters": 1}\nvariants = [{"name": "a"}]',
     "'seeds' must be a non-empty list of distinct integers"),
    ('name = "x"\nseeds = [1]\nbudget = {"iters": 1}\nvariants = [{"n_layer": 1}]',
     "variants[0] needs a non-empty string 'name'"),
    ('name = "x"\nseeds = [1]\nbudget = {"iters": 1}\nvariants = [{"name": "a/b"}, {"name": "a_b"}]',
     "map to the same run directory name 'a_b'"),
    ('name = "x"\nseeds = [1]\nbudget = {"iters": 1}\nvariants = [{"name": "a"}]\n'
     'evaluation = {"test_loop": [1]}', "unknown evaluation key 'test_loop'"),
    ('import os\nname = os.getcwd()', "expected 'key = value'"),
    ('name = __import__("os").getcwd()', "only literal values"),
])
def test_bad_files_name_the_key(tmp_path, text, fragment):
    with pytest.raises(ExperimentError) as info:
        read_experiment_file(write_experiment(tmp_path / "bad.py", text))
    assert fragment in str(info.value)
    assert "bad.py" in str(info.value)


def test_base_config_file_keys_owned_by_the_runner_are_replaced(tmp_path):
    (tmp_path / "cfg.py").write_text('out_dir = "/somewhere/else"\nmax_iters = 99\nn_layer = 3\n')
    exp = read_experiment_file(write_experiment(tmp_path / "e.py", (
        f'name = "x"\nbase_config = "cfg.py"\nbase = {TASK_BASE!r}\nseeds = [1]\n'
        f'budget = {{"iters": 2}}\nvariants = [{{"name": "a"}}]\n')))
    runs, _ = plan_experiment(exp, tmp_path / "out")
    (run,) = runs
    assert run.values["n_layer"] == 3
    assert run.values["max_iters"] == 2
    assert Path(run.values["out_dir"]).resolve().is_relative_to((tmp_path / "out").resolve())


# ---------------------------------------------------------------------------------------------
# Names cannot escape the output directory


@settings(max_examples=200, deadline=None)
@given(st.text(min_size=0, max_size=20))
def test_safe_name_is_one_harmless_component(name):
    out = safe_name(name)
    assert out and out not in (".", "..") and not out.startswith(".")
    assert "/" not in out and "\\" not in out and "\x00" not in out
    assert (Path("/root/out") / out).parent == Path("/root/out")


def test_hostile_variant_and_section_names_stay_inside(tmp_path):
    path = write_experiment(tmp_path / "e.py", (
        f'name = "../../evil"\nseeds = [1]\nbudget = {{"iters": 1}}\n'
        f'sections = [{{"name": "../..", "base": {TASK_BASE!r}, "variants": '
        f'[{{"name": "../../x"}}, {{"name": "/etc/passwd"}}, {{"name": ".."}}]}}]\n'))
    exp = read_experiment_file(path)
    out = tmp_path / "out"
    runs, _ = plan_experiment(exp, out)
    assert len(runs) == 3
    for run in runs:
        assert run.run_dir.resolve().is_relative_to((out / "runs").resolve())
        assert Path(run.values["out_dir"]).resolve().is_relative_to((out / "runs").resolve())


# ---------------------------------------------------------------------------------------------
# Baselines and budgets


def resolved(section, variant):
    train, model = build_configs({**section.base, **variant.values})
    return GPTConfig(block_size=train.block_size, vocab_size=8, **model)


def test_baselines_are_param_and_depth_matched_plain_models(tmp_path):
    exp = read_experiment_file(simple_file(tmp_path, (
        '[{"name": "plain2", "n_layer": 2},'
        ' {"name": "tied", "n_layer": 2, "loop_center_idx": 1, "max_loops": 3},'
        ' {"name": "untied", "n_layer": 3, "loop_center_idx": 1, "loop_radius": 1,'
        '  "max_loops": 2, "tied_looping": False, "loop_input_injection": "concat"}]')))
    (section,) = exp.sections
    variants = {v.name: v for v in add_baselines(section)}
    tied, untied = variants["tied"], variants["untied"]
    # The existing plain2 is reused as the tied variant's parameter-matched reference.
    assert tied.references == {"param": "plain2", "depth": "plain_L4"}
    assert untied.references == {"param": "plain_L3", "depth": "plain_L6"}
    assert set(variants) == {"plain2", "tied", "untied", "plain_L4", "plain_L3", "plain_L6"}
    for name, n_layer in (("plain_L4", 4), ("plain_L3", 3), ("plain_L6", 6), ("plain2", 2)):
        cfg = resolved(section, variants[name])
        assert cfg.n_layer == n_layer and cfg.loop_center_idx == -1
        assert GPT(cfg).effective_depth() == n_layer
    # Depth-matched means as many blocks as the looped model applies.
    for looped in (tied, untied):
        depth = GPT(resolved(section, looped)).effective_depth()
        assert resolved(section, variants[looped.references["depth"]]).n_layer == depth
    assert variants["plain_L4"].role == "baseline" and variants["plain2"].role == "variant"
    assert variants["plain_L4"].baseline_for == ["tied"]


def test_baselines_turn_off_looping_set_in_the_base(tmp_path):
    base = {**TASK_BASE, "loop_center_idx": 0, "max_loops": 4, "loop_input_injection": "add"}
    path = write_experiment(tmp_path / "e.py", (
        f'name = "t"\nbase = {base!r}\nvariants = [{{"name": "loop1", "n_layer": 1}}]\n'
        f'seeds = [1]\nbudget = {{"iters": 2}}\n'))
    (section,) = read_experiment_file(path).sections
    variants = {v.name: v for v in add_baselines(section)}
    assert set(variants) == {"loop1", "plain_L1", "plain_L4"}
    for name, n in (("plain_L1", 1), ("plain_L4", 4)):
        cfg = resolved(section, variants[name])
        assert cfg.loop_center_idx == -1 and cfg.n_layer == n


def test_no_baselines_when_switched_off(tmp_path):
    exp = read_experiment_file(simple_file(
        tmp_path, '[{"name": "tied", "n_layer": 2, "loop_center_idx": 1, "max_loops": 3}]',
        "baselines = False\n"))
    assert [v.name for v in add_baselines(exp.sections[0])] == ["tied"]


def test_flops_budget_gives_each_variant_its_iterations(tmp_path):
    exp = read_experiment_file(write_experiment(tmp_path / "e.py", (
        f'name = "t"\nbase = {TASK_BASE!r}\nseeds = [1]\nbudget = {{"flops": 3e9}}\n'
        'variants = [{"name": "p2", "n_layer": 2},'
        ' {"name": "loop", "n_layer": 2, "loop_center_idx": 1, "max_loops": 3,'
        '  "loop_sampling": "uniform"}]\n')))
    runs, info = plan_experiment(exp, tmp_path / "out")
    iters = {r.variant: r.iters for r in runs}
    tokens = TASK_BASE["batch_size"] * TASK_BASE["block_size"]
    for r in runs:
        train, model = build_configs(r.values)
        m = GPT(GPTConfig(block_size=train.block_size, vocab_size=5, **model))
        assert r.iters == round(3e9 / (m.flops_per_token(m.config.max_loops) * tokens))
        # Every run of the variant trains for the planned iterations, with the schedule over them.
        assert r.values["max_iters"] == r.values["lr_decay_iters"] == r.iters
    # Two blocks, one run three times, cost what four plain blocks cost.
    assert iters["loop"] == iters["plain_L4"] < iters["p2"]
    assert {v["name"]: v["iters"] for v in info["sections"][0]["variants"]} == iters


def test_config_change_changes_the_run_identity(tmp_path):
    a = plan_experiment(read_experiment_file(simple_file(
        tmp_path, '[{"name": "v", "n_layer": 1}]')), tmp_path / "o")[0]
    b = plan_experiment(read_experiment_file(simple_file(
        tmp_path, '[{"name": "v", "n_layer": 1, "learning_rate": 1e-2}]')), tmp_path / "o")[0]
    c = plan_experiment(read_experiment_file(simple_file(
        tmp_path, '[{"name": "v", "n_layer": 1}]')), tmp_path / "elsewhere")[0]
    assert a[0].spec_hash != b[0].spec_hash
    assert a[0].spec_hash != a[1].spec_hash  # seeds differ
    assert a[0].spec_hash == c[0].spec_hash  # moving the output directory does not matter


def test_invalid_variant_is_a_planned_failure_not_an_abort(tmp_path):
    exp = read_experiment_file(simple_file(
        tmp_path, '[{"name": "ok", "n_layer": 1}, {"name": "bad", "n_layer": 2, "n_head": 3}]'))
    runs, _ = plan_experiment(exp, tmp_path / "out")
    errors = {r.variant: r.error for r in runs}
    assert errors["ok"] is None
    assert "n_embd=16 must be divisible by n_head=3" in errors["bad"]


def test_default_experiment_plans_every_required_comparison():
    exp = read_experiment_file(DEFAULT)
    runs, info = plan_experiment(exp, Path("/nonexistent/out"))
    by_section = {s["name"]: s for s in info["sections"]}
    assert set(by_section) == {"shakespeare", "phop"}
    # Issue 15: intervals need seeds; solved-or-not outcomes need at least five.
    assert len(by_section["shakespeare"]["seeds"]) >= 3
    assert len(by_section["phop"]["seeds"]) >= 5
    for sec in info["sections"]:
        for v in sec["variants"]:
            if v["looped"] and v["name"] in {"loop_2x3", "loop_1x4"}:
                assert set(v["references"]) == {"param", "depth"}
    models = {(r.section, r.variant): build_configs(r.values)[1] for r in runs}
    # Shakespeare with narrow blocks: plain 1 and 4 layers of 32 channels, and the one block
    # looped to depth 4 between them.
    for n in (1, 4):
        m = models[("shakespeare", f"plain_L{n}")]
        assert m["n_layer"] == n and m["n_embd"] == 32
    loop = models[("shakespeare", "loop_1x4")]
    assert (loop["n_layer"], loop["max_loops"], loop["n_embd"]) == (1, 4, 32)
    # p-hop: the cross-model depth protocol at r = 1, 2, 3, 4, 6 of one block.
    trained = by_section["phop"]["cross_model_depth"]["trained"]
    assert [t["train_loops"] for t in trained] == [1, 2, 3, 4, 6]
    for t in trained:
        m = models[("phop", t["variant"])]
        assert m["n_layer"] == 1 and m["loop_center_idx"] == 0
        assert m["max_loops"] == t["train_loops"]
    assert {("phop", "plain_L1"), ("phop", "plain_L4")} <= set(models)


# ---------------------------------------------------------------------------------------------
# End to end: config/experiment_tiny.py on a fake character dataset


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """Runs the tiny experiment once; tests that modify the output work on a copy."""
    root = tmp_path_factory.mktemp("tiny")
    write_char_data(root / "data" / "shakespeare_char")
    out = root / "out"
    # The tiny file names dataset shakespeare_char, found as data/shakespeare_char from the cwd.
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        rc = main([str(TINY), "--out", str(out), "--jobs", "2"])
    return root, out, rc


def test_tiny_experiment_completes_with_results_and_report(tiny_run):
    root, out, rc = tiny_run
    assert rc == 0
    plan = json.loads((out / "experiment.json").read_text())
    records = load_results(out)
    expected = {r["run_id"] for r in plan["runs"]}
    # chars: plain_L2, loop_L2x3 and the added plain_L4, two seeds; phop: three variants, one seed.
    assert len(expected) == 9
    assert set(records) == expected
    assert all(rec["status"] == "ok" for rec in records.values()), records
    loop = records["chars/loop_L2x3-s1"]
    assert loop["effective_depth"] == 4 and loop["iter_num"] == 8
    # Counts from blockloop.looping.scaling_loop_counts: 1 .. 2 x trained, 1, 2, 4, 8, 16, and
    # the section's test_loops.
    assert [row["num_loops"] for row in loop["loop_scaling"]] == [1, 2, 3, 4, 5, 6, 8, 16]
    assert len(loop["exit_sweep"]) == 2
    assert len(loop["samples"]) == 2 and all(len(s) == 24 for s in loop["samples"])
    assert set("".join(loop["samples"])) <= set("\n abcdefgh")
    assert records["chars/plain_L4-s2"]["role"] == "baseline"
    phop = records["phop/loop_L1x2-s1"]
    assert {"majority", "copy_last"} <= set(phop["floors"])
    assert sorted({row["hops"] for row in phop["hops"]}) == [1, 2]
    # Same seed, same training batches: runs of one seed share the data order, so two plain
    # references differ only through their architecture, while seeds differ.
    s1, s2 = records["chars/plain_L2-s1"], records["chars/plain_L2-s2"]
    assert s1["best_val_loss"] != s2["best_val_loss"]
    report = out / "report" / "report.md"
    text = report.read_text()
    pngs = sorted((out / "report").glob("*.png"))
    assert len(pngs) >= 9
    for png in pngs:
        assert f"]({png.name})" in text
        assert_valid_png(png)
    # Nothing was written outside the chosen directories.
    assert sorted(p.name for p in root.iterdir()) == ["data", "out"]


def test_rerun_skips_finished_runs_and_redoes_only_missing_ones(tiny_run, tmp_path, capsys,
                                                                monkeypatch):
    root, out, _ = tiny_run
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    results = copy / RESULTS_FILE
    lines = results.read_text().splitlines()
    # An interrupted run: no record, no result file, a partial run directory left behind.
    lost = "chars/loop_L2x3-s2"
    # A run that finished but whose record was never appended (the runner was killed first).
    unrecorded = "phop/plain_L1-s1"
    kept = [ln for ln in lines if json.loads(ln)["run_id"] not in (lost, unrecorded)]
    results.write_text("\n".join(kept) + "\n" + '{"run_id": "cut sho')
    (copy / "runs" / lost / "result.json").unlink()
    untouched = copy / "runs" / "chars" / "plain_L2-s1" / "metrics.jsonl"
    before = untouched.stat().st_mtime_ns
    capsys.readouterr()
    monkeypatch.chdir(root)
    rc = main([str(TINY), "--out", str(copy), "--jobs", "2"])
    log = capsys.readouterr().out
    started = [ln.split("start ")[1].split()[0] for ln in log.splitlines() if "] start " in ln]
    assert rc == 0
    assert started == [lost]
    assert untouched.stat().st_mtime_ns == before
    records = load_results(copy)
    assert records[lost]["status"] == "ok" and records[unrecorded]["status"] == "ok"
    # The restarted run began from scratch: one evaluation per evaluation point, not two.
    evals = [json.loads(ln)["iter"] for ln in
             (copy / "runs" / lost / "metrics.jsonl").read_text().splitlines()
             if json.loads(ln)["kind"] == "eval"]
    assert evals == [0, 4, 8]


def test_failing_variant_is_reported_and_the_others_finish(tmp_path):
    missing = tmp_path / "no_such_data"
    path = write_experiment(tmp_path / "e.py", (
        f'name = "f"\nbase = {TASK_BASE!r}\nseeds = [1]\nbudget = {{"iters": 2}}\n'
        f'evaluation = {{"exit_thresholds": [0.1]}}\n'
        f'variants = [{{"name": "good", "n_layer": 1}},'
        f' {{"name": "../../x", "dataset": "shakespeare_char", "data_dir": "{missing}",'
        f'   "block_size": 8}},'
        f' {{"name": "invalid", "n_layer": 1, "n_head": 3}}]\n'))
    out = tmp_path / "deep" / "out"
    rc = main([str(path), "--out", str(out), "--jobs", "2"])
    assert rc == 1
    records = load_results(out)
    assert records["main/good-s1"]["status"] == "ok"
    bad = records["main/_.._.._x-s1"]
    assert bad["status"] == "failed" and str(missing) in bad["error"]
    assert "n_head=3" in records["main/invalid-s1"]["error"]
    text = (out / "report" / "report.md").read_text()
    assert "FAILED" in text and str(missing) in text and "n_head=3" in text
    # The hostile name wrote only inside the output directory.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["deep", "e.py"]
    assert (out / "runs" / "main" / "_.._.._x-s1" / "log.txt").exists()


def test_command_line_help_and_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    assert "--jobs" in text and "budget" in text and "sections" in text
    assert main([str(tmp_path / "missing.py")]) == 2
    assert "not found" in capsys.readouterr().err
    bad = simple_file(tmp_path, '[{"name": "v", "n_layer": 1}]')
    assert main([str(bad), "--jobs", "0"]) == 2
    assert main([str(bad), "--out", str(tmp_path / "none"), "--report-only"]) == 2


def test_concat_variant_built_for_one_iteration_runs_like_any_other(tmp_path):
    # "concat" injection with max_loops=1 has no adapters and can run one iteration only: it is
    # looped (blockloop.looping.is_looped), gets its plain references, and its loop scaling and
    # exit sweep hold that one count.
    path = write_experiment(tmp_path / "e.py", (
        f'name = "c"\nbase = {TASK_BASE!r}\nseeds = [1]\nbudget = {{"iters": 2}}\n'
        f'evaluation = {{"exit_thresholds": [0.1], "hops": [1, 2]}}\n'
        f'variants = [{{"name": "cat1", "n_layer": 1, "loop_center_idx": 0, "max_loops": 1,'
        f' "loop_input_injection": "concat"}}]\n'))
    out = tmp_path / "out"
    rc = main([str(path), "--out", str(out), "--jobs", "2"])
    assert rc == 0
    plan = json.loads((out / "experiment.json").read_text())
    (cat1,) = [v for v in plan["sections"][0]["variants"] if v["name"] == "cat1"]
    assert cat1["looped"] and cat1["references"] == {"param": "plain_L1", "depth": "plain_L1"}
    records = load_results(out)
    assert set(records) == {"main/cat1-s1", "main/plain_L1-s1"}
    rec = records["main/cat1-s1"]
    assert rec["status"] == "ok" and rec["looped"] and rec["effective_depth"] == 1
    assert [row["num_loops"] for row in rec["loop_scaling"]] == [1]
    assert [(row["threshold"], row["num_loops"]) for row in rec["exit_sweep"]] == [(0.1, 1)]
    assert rec["exit_default"]["mean_iterations"] == 1.0
    assert {row["num_loops"] for row in rec["hops"]} == {1}
    text = (out / "report" / "report.md").read_text()
    row = next(ln for ln in text.splitlines() if ln.startswith("| cat1 |"))
    assert "| looped |" in row and "1.00 of 1" in row
    assert "](main_loop_scaling.png)" in text and "FAILED" not in text


def fake_other_code(out: Path, run_id: str) -> None:
    """Make `run_id`'s recorded result look as if other code (another source hash) made it."""
    for path in (out / RESULTS_FILE, out / "runs" / run_id / "result.json"):
        text = path.read_text()
        if path.suffix == ".json":
            rec = json.loads(text)
            rec["code"]["source_sha256"] = "0" * 16
            path.write_text(json.dumps(rec))
            continue
        lines = []
        for line in text.splitlines():
            rec = json.loads(line)
            if rec["run_id"] == run_id:
                rec["code"]["source_sha256"] = "0" * 16
            lines.append(json.dumps(rec))
        path.write_text("\n".join(lines) + "\n")


def test_runs_made_by_other_code_are_rerun_unless_kept(tiny_run, tmp_path, capsys, monkeypatch):
    root, out, _ = tiny_run
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    records = load_results(copy)
    assert all(same_code(rec["code"]) for rec in records.values())
    other = "phop/plain_L1-s1"
    fake_other_code(copy, other)
    monkeypatch.chdir(root)
    capsys.readouterr()
    # Kept: nothing runs, and the report names the run made by other code.
    assert main([str(TINY), "--out", str(copy), "--jobs", "2", "--keep_other_code"]) == 0
    assert "] start " not in capsys.readouterr().out
    assert load_results(copy)[other]["code"]["source_sha256"] == "0" * 16
    text = (copy / "report" / "report.md").read_text()
    line = next(ln for ln in text.splitlines() if "by other code" in ln)
    assert other in line and "0" * 16 in line
    assert f"8 run(s) by this code (source `{code_identity()['source_sha256']}`" in text
    # By default the run is made again, by this code; the others are reused.
    assert main([str(TINY), "--out", str(copy), "--jobs", "2"]) == 0
    log = capsys.readouterr().out
    started = [ln.split("start ")[1].split()[0] for ln in log.splitlines() if "] start " in ln]
    assert started == [other]
    assert "1 finished run(s) were made by other code" in log
    assert same_code(load_results(copy)[other]["code"])
    assert "by other code" not in (copy / "report" / "report.md").read_text()


GROUPS_EXPERIMENT = """
name = "groups_tiny"
seeds = [1]
baselines = True
base = {"dataset": "shakespeare_char", "block_size": 16, "batch_size": 4, "n_head": 2,
        "n_embd": 16, "gradient_accumulation_steps": 1, "eval_interval": 4, "eval_iters": 2,
        "warmup_iters": 0, "device": "cpu", "loop_input_injection": "add"}
variants = [
    {"name": "two_groups", "n_layer": 3, "loop_groups": [[0, 1], [2, 2]], "loop_counts": [2, 3]},
]
budget = {"iters": 4}
evaluation = {"exit_thresholds": [0.0, 1e9], "samples": 1, "sample_tokens": 8}
"""


def test_loop_groups_run_against_their_references_with_causal_exit_curves(tmp_path,
                                                                          monkeypatch):
    write_char_data(tmp_path / "data" / "shakespeare_char")
    path = tmp_path / "groups.py"
    path.write_text(GROUPS_EXPERIMENT)
    monkeypatch.chdir(tmp_path)
    assert main([str(path), "--out", str(tmp_path / "out"), "--jobs", "2"]) == 0
    records = load_results(tmp_path / "out")
    run = records["main/two_groups-s1"]
    assert run["status"] == "ok" and run["effective_depth"] == 3 + 2 * 1 + 1 * 2
    assert {"main/plain_L3-s1", "main/plain_L7-s1"} <= set(records)
    sweep = {row["threshold"]: row for row in run["exit_sweep"]}
    assert all(row["granularity"] == "token" for row in sweep.values())
    assert sweep[0.0]["block_applications_saved"] == pytest.approx(0.0)
    assert sweep[1e9]["block_applications_saved"] > 0
    report = (tmp_path / "out" / "report" / "report.md").read_text()
    assert "token granularity: causal" in report
    # The training-time monitor's curves: one Lipschitz estimate per group at each evaluation.
    evals = [r for r in read_jsonl(tmp_path / "out" / "runs" / "main" / "two_groups-s1"
                                   / "metrics.jsonl") if r.get("kind") == "eval"]
    assert [len(r["loop_lipschitz"]) for r in evals] == [2, 2]
    assert "Loop dynamics during training" in report
    assert_valid_png(tmp_path / "out" / "report" / "main_loop_monitor.png")
    # Loop against layer: the looped variant's iterates against plain_L7's block outputs.
    assert "Loop against layer" in report
    assert_valid_png(tmp_path / "out" / "report" / "main_loop_vs_layer.png")


def test_run_process_that_dies_without_a_result_reports_its_exit_code_and_log(tmp_path,
                                                                             monkeypatch):
    # A run process that fails before it can write result.json (here: its spec is missing)
    # exits with 1, its traceback in the run's log; the runner reads that exit code.
    monkeypatch.chdir(tmp_path)
    log = tmp_path / "run.log"
    proc = _RunProcess(Path("no_such_spec.json"), log, threads=1)
    assert proc.wait(timeout=120) == 1
    assert proc.returncode == 1 and proc.poll() == 1
    text = log.read_text()
    assert "FileNotFoundError" in text and "no_such_spec.json" in text


def test_run_process_works_in_the_runner_directory_at_its_start(tmp_path, monkeypatch):
    # The fork server keeps the directory it started in; a run must resolve relative paths
    # from the runner's directory as it is when the run starts (tests and users change it).
    (tmp_path / "rel_run").mkdir()
    spec = {"run_id": "s/v-s1", "values": {"out_dir": "rel_run", "dataset": "no_such_data"},
            "evaluation": {}, "spec_hash": "h"}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    monkeypatch.chdir(tmp_path)
    proc = _RunProcess(Path("spec.json"), Path("rel_run/run.log"), threads=1)
    assert proc.wait(timeout=120) == 1
    result = json.loads((tmp_path / "rel_run" / "result.json").read_text())
    assert result["status"] == "failed" and "no_such_data" in result["error"]
