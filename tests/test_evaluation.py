"""The evaluation module is the one place losses are computed: training's periodic evaluation,
the experiment runner's final evaluation and `blockloop analyze` agree on the same checkpoint and
batches, and the module's own numbers match a direct computation."""

import json

import pytest
import torch
import torch.nn.functional as F

from blockloop.analysis import analyze_checkpoint
from blockloop.config import parse_train_args
from blockloop.evaluation import evaluate, exit_sweep, loop_scaling, mean_iterations
from blockloop.experiment.child import post_evaluate
from blockloop.model import GPT, GPTConfig
from tests.conftest import read_metrics, run, tiny_args, write_token_dataset

EVALUATION = {"test_loops": [], "exit_thresholds": [0.0, 1e9], "exit_max_loops_factor": 1,
              "hops": [], "samples": 0, "sample_tokens": 0, "sample_temperature": 1.0}


def test_training_experiment_and_analysis_report_the_same_numbers(tmp_path):
    data = write_token_dataset(tmp_path / "data")
    out = tmp_path / "out"
    args = tiny_args(data, out, "--max_iters=8", "--loop_center_idx=1", "--max_loops=3",
                     "--eval_loops=2,4")
    run(args)
    final = [r for r in read_metrics(out) if r["kind"] == "eval"][-1]
    assert final["iter"] == 8
    cfg, _ = parse_train_args(args)
    post = post_evaluate(cfg, EVALUATION, log=lambda *a: None)
    post_scaling = {row["num_loops"]: row["loss"] for row in post["loop_scaling"]}
    analysis = analyze_checkpoint(out, tmp_path / "report", batches=cfg.eval_iters,
                                  checkpoint="last", thresholds=[0.0, 1e9])
    analysis_scaling = {row["num_loops"]: row["loss"] for row in analysis["loop_scaling"]}
    for n, logged in ((3, final["val_loss"]), (2, final["val_loss@2"]), (4, final["val_loss@4"])):
        assert post_scaling[n] == pytest.approx(logged, abs=1e-6)
        assert analysis_scaling[n] == pytest.approx(logged, abs=1e-6)
    assert analysis["model_loss"] == pytest.approx(final["val_loss"], abs=1e-6)
    ours = exit_sweep_like(analysis["exit_sweep"], post["exit_sweep"])
    assert len(ours) == len(post["exit_sweep"]) == 2
    for a, b in zip(ours, post["exit_sweep"]):
        assert a["mean_iterations"] == b["mean_iterations"]
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)
    saved = json.loads((tmp_path / "report" / "analysis.json").read_text())
    assert saved["loop_scaling"] == analysis["loop_scaling"]


def exit_sweep_like(rows, reference):
    """The analysis sweep rows at the runner's thresholds (same keys), for an equality check."""
    wanted = {r["threshold"] for r in reference}
    return [r for r in rows if r["threshold"] in wanted]


def test_evaluate_against_a_direct_token_weighted_cross_entropy():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=8, vocab_size=13, n_layer=3, n_head=1, n_embd=8,
                          loop_center_idx=1, max_loops=2))
    x = torch.randint(0, 13, (6, 8))
    y = torch.randint(0, 13, (6, 8))
    y[:, :3] = -1  # unscored positions
    batches = [(x[:4], y[:4]), (x[4:], y[4:])]
    res = evaluate(model, batches, num_loops=3)
    model.eval()
    with torch.no_grad():
        logits, _ = model(x, y, num_loops=3)
    mask = y != -1
    want = F.cross_entropy(logits[mask], y[mask], reduction="mean").item()
    assert res.loss == pytest.approx(want, abs=1e-6)
    assert res.accuracy == pytest.approx((logits.argmax(-1)[mask] == y[mask]).float().mean().item())
    assert res.tokens == int(mask.sum())
    assert [its.tolist() for its in res.iterations] == [[3] * 6]
    assert mean_iterations(res.iterations) == 3
    rows = loop_scaling(model, batches, [1, 3])
    assert rows[1]["loss"] == pytest.approx(res.loss, abs=1e-7) and rows[0]["num_loops"] == 1
    never, always = exit_sweep(model, batches, [0.0, 1e9], 3)
    assert never["mean_iterations"] == 3 and always["mean_iterations"] == 2
    assert never["loss"] == pytest.approx(res.loss, abs=1e-7)


def test_loop_scaling_refuses_counts_the_model_cannot_run():
    model = GPT(GPTConfig(block_size=8, vocab_size=13, n_layer=3, n_head=1, n_embd=8,
                          loop_center_idx=1, max_loops=1, loop_input_injection="concat"))
    x = torch.randint(0, 13, (2, 8))
    with pytest.raises(ValueError, match="only run 1 iteration"):
        loop_scaling(model, [(x, x)], [1, 2])
