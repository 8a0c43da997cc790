"""blockloop.analysis against independent computations.

CKA against the HSIC definition with an explicit centring matrix in float64; cosines, norms and
delta recomputed from the traced states with numpy; PCA against numpy's SVD; the logit lens
against the model's own loss, against runs with fewer iterations, and against the remaining
blocks applied by hand; and `blockloop analyze` end to end on a checkpoint and dataset written
here, down to the PNG bytes.
"""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from blockloop import analysis
from blockloop.analysis import (
    analyze_model,
    cka_matrix,
    linear_cka,
    logit_lens_losses,
    pca_trajectories,
    token_dynamics,
    tracing_copy,
)
from blockloop.evaluation import evaluate, exit_sweep, loop_scaling
from blockloop.looping import scaling_loop_counts
from blockloop.model import GPT, GPTConfig
from tests.conftest import make_half_map, run, tiny_args, write_token_dataset

VOCAB = 29
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_config(tied=True, radius=0, **kw):
    base = dict(
        block_size=16, vocab_size=VOCAB, n_layer=3, n_head=2, n_embd=32, dropout=0.0,
        loop_center_idx=1, loop_radius=radius, max_loops=3, tied_looping=tied,
        loops_representation=True,
    )
    base.update(kw)
    return GPTConfig(**base)


def tiny_model(tied=True, radius=0, seed=0, **kw):
    torch.manual_seed(seed)
    model = GPT(tiny_config(tied, radius, **kw)).eval()
    # Fresh weights barely move the state per block; larger weights make the iterations differ
    # enough that a wrong index or a skipped block shows up in every comparison below.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("weight") and p.dim() == 2:
                p.mul_(8.0)
    return model


def batch(b=3, length=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, VOCAB, (b, length), generator=g)
    y = torch.randint(0, VOCAB, (b, length), generator=g)
    return x, y


# ---- CKA ----------------------------------------------------------------------------------------

def hsic_cka_reference(X, Y):
    """CKA from the definition: HSIC(K, L) = tr(K H L H) / (n-1)^2, H = I - 11^T/n, float64."""
    X = np.asarray(X, dtype=np.float64)
    Y = np.asarray(Y, dtype=np.float64)
    n = X.shape[0]
    H = np.eye(n) - np.ones((n, n)) / n
    K, L = X @ X.T, Y @ Y.T

    def hsic(A, B):
        return np.trace(A @ H @ B @ H) / (n - 1) ** 2

    return hsic(K, L) / np.sqrt(hsic(K, K) * hsic(L, L))


def random_orthogonal(c, seed):
    g = np.random.default_rng(seed)
    q, r = np.linalg.qr(g.standard_normal((c, c)))
    return q * np.sign(np.diag(r))


def test_cka_of_a_representation_with_itself_is_one():
    X = np.random.default_rng(0).standard_normal((40, 12))
    assert linear_cka(X, X) == pytest.approx(1.0, abs=1e-12)


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(5, 30), c=st.integers(2, 10), d=st.integers(2, 10),
    seed=st.integers(0, 10_000), scale=st.floats(0.01, 100.0),
)
def test_cka_matches_hsic_definition_and_its_invariances(n, c, d, seed, scale):
    g = np.random.default_rng(seed)
    X = g.standard_normal((n, c)) + g.standard_normal(c)  # non-zero column means
    Y = X[:, :1] @ g.standard_normal((1, d)) + g.standard_normal((n, d))
    ref = hsic_cka_reference(X, Y)
    assert linear_cka(X, Y) == pytest.approx(ref, rel=1e-9, abs=1e-12)
    assert linear_cka(Y, X) == pytest.approx(ref, rel=1e-9, abs=1e-12)
    Q = random_orthogonal(d, seed + 1)
    assert linear_cka(X, scale * Y @ Q) == pytest.approx(ref, rel=1e-9, abs=1e-12)
    # A translation of every row changes nothing: both sides are centred.
    assert linear_cka(X + 3.0, Y) == pytest.approx(ref, rel=1e-9, abs=1e-12)


def test_cka_is_not_invariant_to_anisotropic_scaling():
    # Linear CKA is not CCA: stretching one channel changes it. This is what the invariance
    # test above could not distinguish from a metric that ignores its inputs.
    X = np.random.default_rng(3).standard_normal((50, 6))
    stretched = X * np.array([10.0, 1, 1, 1, 1, 1])
    assert linear_cka(X, stretched) < 0.9
    assert linear_cka(X, stretched) == pytest.approx(hsic_cka_reference(X, stretched), rel=1e-9)


def test_cka_matrix_matches_pairwise_reference():
    g = np.random.default_rng(4)
    base = g.standard_normal((20, 8))
    states = np.stack([base + 0.5 * t * g.standard_normal((20, 8)) for t in range(4)])
    m = cka_matrix(torch.tensor(states, dtype=torch.float32))
    assert m.shape == (4, 4)
    for i in range(4):
        for j in range(4):
            ref = hsic_cka_reference(states[i].astype(np.float32), states[j].astype(np.float32))
            assert m[i, j] == pytest.approx(ref, rel=1e-7, abs=1e-10)
    assert np.allclose(np.diag(m), 1.0)
    assert m[0, 3] < 0.95  # the states really differ, so the check above was not all ones


# ---- dynamics and PCA against the trace -------------------------------------------------------

@pytest.mark.parametrize("tied,radius", [(True, 0), (True, 1), (False, 1)])
def test_dynamics_recomputed_from_traced_states(tied, radius):
    model = tiny_model(tied, radius)
    x, y = batch()
    model(x, y, loop_exit=False)
    for unit in model.last_loop_trace.units:
        s = unit.states.double().numpy()  # (T+1, B, L, C)
        T = s.shape[0] - 1
        dyn = token_dynamics(unit.states)
        norms = np.sqrt((s**2).sum(-1))
        assert np.allclose(dyn["norm"].numpy(), norms.reshape(T + 1, -1), rtol=1e-10)
        for t in range(1, T + 1):
            dot = (s[t] * s[t - 1]).sum(-1)
            assert np.allclose(
                dyn["cos_prev"][t - 1].numpy(), (dot / (norms[t] * norms[t - 1])).ravel(),
                atol=1e-9,
            )
            # delta_t: mean over tokens of ||s_t - s_{t-1}|| / (||s_{t-1}|| + 1e-6)
            rel = np.sqrt(((s[t] - s[t - 1]) ** 2).sum(-1)) / (norms[t - 1] + 1e-6)
            assert np.allclose(unit.deltas[t - 1].numpy(), rel.mean(-1), rtol=1e-4)
        for t in range(T + 1):
            dot = (s[t] * s[T]).sum(-1)
            assert np.allclose(
                dyn["cos_final"][t].numpy(), (dot / (norms[t] * norms[T])).ravel(), atol=1e-9
            )
        assert dyn["cos_prev"].min() < 0.999  # the iterations move the state


def test_pca_projection_matches_numpy_svd():
    model = tiny_model(True, 1)
    x, y = batch()
    model(x, y, loop_exit=False)
    states = model.last_loop_trace.units[0].states[:, 0, ::3]  # (T+1, 6 tokens, C)
    out = pca_trajectories(states)
    rows = states.double().numpy().reshape(-1, states.shape[-1])
    centred = rows - rows.mean(0)
    _, svals, vt = np.linalg.svd(centred, full_matrices=False)
    ref = (centred @ vt[:2].T).reshape(states.shape[0], states.shape[1], 2)
    signs = np.sign((out["components"] * vt[:2]).sum(-1))  # SVD signs are arbitrary
    assert np.all(np.abs(signs) == 1)
    assert np.allclose(out["components"], vt[:2] * signs[:, None], atol=1e-8)
    assert np.allclose(out["projections"], ref * signs, atol=1e-8)
    assert np.allclose(out["explained_variance_ratio"], svals[:2] ** 2 / (svals**2).sum())
    # The documented sign convention: each axis's largest-magnitude loading is positive.
    for c in out["components"]:
        assert c[np.argmax(np.abs(c))] > 0
    assert out["explained_variance_ratio"][0] >= out["explained_variance_ratio"][1] > 0


# ---- logit lens --------------------------------------------------------------------------------

LENS_CASES = [
    dict(tied=True, radius=0),
    dict(tied=False, radius=0),
    dict(tied=True, radius=1),
    dict(tied=False, radius=1),
    dict(tied=True, radius=0, loop_input_injection="add", bias=False),
    dict(tied=False, radius=1, concatenate_initial_representation=True),
]


def case_id(case):
    return "-".join(f"{k}={v}" for k, v in case.items())


@pytest.mark.parametrize("case", LENS_CASES, ids=case_id)
def test_logit_lens_at_last_iteration_is_the_model_loss(case):
    case = dict(case)
    model = tiny_model(case.pop("tied"), case.pop("radius"), **case)
    if model.looper.adapters is not None:
        with torch.no_grad():  # non-zero adapters, so injection actually enters the loop
            for a in model.looper.adapters:
                a.proj.weight.normal_(0, 0.2)
    x, y = batch()
    _, loss = model(x, y)
    lens = logit_lens_losses(model, x, y)
    assert lens["model_loss"] == pytest.approx(loss.item(), abs=1e-6)
    for unit in lens["units"]:
        assert len(unit["continue"]) == 4 and len(unit["direct"]) == 4
        assert unit["continue"][-1] == pytest.approx(loss.item(), abs=1e-5)
        assert max(unit["continue"]) - min(unit["continue"]) > 1e-3  # t matters


@pytest.mark.parametrize("injection", ["none", "add"])
def test_tied_logit_lens_equals_running_fewer_iterations(injection):
    # One tied unit: stopping at s_t is exactly running the model with t iterations.
    model = tiny_model(True, 0, loop_input_injection=injection)
    x, y = batch()
    lens = logit_lens_losses(model, x, y)["units"][0]
    for t in range(1, 4):
        _, loss = model(x, y, num_loops=t)
        assert lens["continue"][t] == pytest.approx(loss.item(), abs=1e-5)
    # t = 0: the looped block skipped; block 0, block 2, head by hand.
    with torch.no_grad():
        h = model.transformer.wte(x) + model.transformer.wpe(torch.arange(x.shape[1]))
        h = model.transformer.h[2](model.transformer.h[0](h))
        logits = model.lm_head(model.transformer.ln_f(h))
        ref = F.cross_entropy(logits.reshape(-1, VOCAB), y.reshape(-1)).item()
    assert lens["continue"][0] == pytest.approx(ref, abs=1e-5)
    # direct: ln_f + head on s_t, ignoring block 2, so it differs from the continued loss.
    assert abs(lens["direct"][-1] - lens["continue"][-1]) > 1e-3


def test_untied_logit_lens_continues_through_later_units_by_hand():
    model = tiny_model(False, 1)  # units (0,), (1,), (2,), 3 iterations each, no block after
    x, y = batch()
    model(x, y, loop_exit=False)
    states = model.last_loop_trace.units[0].states
    lens = logit_lens_losses(model, x, y)["units"]
    blocks = model.transformer.h
    with torch.no_grad():
        for t in range(4):
            h = states[t]
            for i in (1, 2):
                for _ in range(3):
                    h = blocks[i](h)
            logits = model.lm_head(model.transformer.ln_f(h))
            ref = F.cross_entropy(logits.reshape(-1, VOCAB), y.reshape(-1)).item()
            assert lens[0]["continue"][t] == pytest.approx(ref, abs=1e-5)
    # The last unit has nothing after it: both variants are ln_f + head on s_t.
    assert np.allclose(lens[2]["continue"], lens[2]["direct"], atol=1e-6)


def test_lens_needs_a_tracing_model_and_tracing_copy_keeps_weights():
    plain = tiny_model(True, 0, loops_representation=False)
    x, y = batch()
    with pytest.raises(analysis.AnalysisError, match="loops_representation=True"):
        logit_lens_losses(plain, x, y)
    traced = tracing_copy(plain)
    assert traced.config.loops_representation and not plain.config.loops_representation
    assert torch.equal(plain(x, y)[1], traced(x, y)[1])


# ---- exit, scaling and the combined result ----------------------------------------------------

def test_analyze_model_exit_sweep_and_scaling_against_direct_runs():
    model = tiny_model(False, 1, max_loops=4)
    batches = [batch(4, 16, seed=s) for s in (1, 2)]
    res = analyze_model(model, batches, thresholds=(0.0, 1e9), loop_counts=(1, 4, 8))
    assert not model.training
    # Loop scaling equals the training loop's own evaluation at each count.
    for point in res["loop_scaling"]:
        ref = evaluate(model, batches, device="cpu", num_loops=point["num_loops"], loop_exit=False)
        assert point["loss"] == pytest.approx(ref.loss, abs=1e-6)
    assert res["model_loss"] == pytest.approx(res["loop_scaling"][1]["loss"], abs=1e-6)
    sweep = {p["threshold"]: p for p in res["exit_sweep"]}
    # Threshold 0 never exits; an enormous one exits at the first chance, t = 2.
    assert sweep[0.0]["mean_iterations"] == 4
    assert sweep[0.0]["loss"] == pytest.approx(res["model_loss"], abs=1e-6)
    assert sweep[1e9]["mean_iterations"] == 2
    per_sequence = evaluate(model, batches, num_loops=4, loop_exit=True, exit_threshold=1e9)
    assert len(per_sequence.iterations) == 3  # three untied units
    assert all(torch.equal(its, torch.full((8,), 2)) for its in per_sequence.iterations)
    _, loss2 = model(*batches[0], num_loops=2)
    _, loss2b = model(*batches[1], num_loops=2)
    assert sweep[1e9]["loss"] == pytest.approx((loss2.item() + loss2b.item()) / 2, abs=1e-5)
    # The default threshold (exit off in the config) is 1e-2, and its histogram counts every
    # sequence once per unit, consistent with the reported mean.
    assert res["exit"]["threshold"] == analysis.DEFAULT_EXIT_THRESHOLD
    deltas = []  # per unit: (T, all sequences) from the traces of fresh runs
    for b in batches:
        model(*b, loop_exit=False)
        deltas.append([u.deltas for u in model.last_loop_trace.units])
    means = []
    for k, unit in enumerate(res["units"]):
        hist = unit["exit_histogram"]
        assert len(hist) == 4 and sum(hist) == 8 and hist[0] == 0
        means.append(sum((t + 1) * c for t, c in enumerate(hist)) / 8)
        cka = np.array(unit["cka"])
        assert cka.shape == (5, 5) and np.allclose(np.diag(cka), 1.0)
        assert unit["logit_lens_loss"][-1] == pytest.approx(res["model_loss"], abs=1e-5)
        assert unit["cos_final_mean"][-1] == pytest.approx(1.0)
        d = torch.cat([per_batch[k] for per_batch in deltas], dim=1).double().numpy()
        assert np.allclose(unit["delta_mean"], d.mean(1), rtol=1e-6)
        assert np.allclose(unit["delta_std"], d.std(1), rtol=1e-6)
    assert res["exit"]["mean_iterations"] == pytest.approx(np.mean(means))
    json.dumps(res, allow_nan=False)  # JSON-ready: NaN became None


def test_loop_counts_include_beyond_trained():
    # analyze_model's default counts are looping.scaling_loop_counts with the analysed count.
    model = tiny_model(True, 0, max_loops=2)
    res = analyze_model(model, [batch(2, 16)], num_loops=5, thresholds=(0.01,), cka_tokens=16)
    counts = [p["num_loops"] for p in res["loop_scaling"]]
    assert counts == scaling_loop_counts(model.config, (5,)) == [1, 2, 3, 4, 5, 8, 16]
    assert scaling_loop_counts(tiny_config(max_loops=3)) == [1, 2, 3, 4, 5, 6, 8, 16]
    assert {16, 20, 32} <= set(scaling_loop_counts(tiny_config(max_loops=16), (20,)))
    assert scaling_loop_counts(
        tiny_config(max_loops=1, concatenate_initial_representation=True)
    ) == [1]


# ---- end to end ---------------------------------------------------------------------------------

def write_run(tmp_path, loop_center_idx=1, **model_kw):
    """A token dataset and a checkpoint directory as training would leave them."""
    from blockloop.checkpoint import save_checkpoint
    from blockloop.config import TrainConfig

    data_dir = tmp_path / "data"
    data_dir.mkdir(parents=True)
    g = np.random.default_rng(0)
    for split, n in (("train", 400), ("val", 300)):
        g.integers(0, VOCAB, n).astype("<u2").tofile(data_dir / f"{split}.bin")
    meta = {
        "format": "blockloop-tokens-v1", "dataset": "tiny", "vocab_size": VOCAB,
        "dtype": "uint16",
        "tokenizer": {"kind": "char", "itos": [chr(ord("a") + i) for i in range(VOCAB)]},
        "source": "test", "train_tokens": 400, "val_tokens": 300,
    }
    (data_dir / "meta.json").write_text(json.dumps(meta))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    config = tiny_config(
        True, 0, loop_center_idx=loop_center_idx, loops_representation=False, **model_kw
    )
    torch.manual_seed(0)
    model = GPT(config)
    train_cfg = TrainConfig(
        out_dir=str(out_dir), dataset="tiny", data_dir=str(data_dir), batch_size=4,
        block_size=16, eval_iters=5,
    )
    save_checkpoint(out_dir / "best.pt", {
        "format": "blockloop-ckpt-v1", "model": model.state_dict(),
        "model_config": config.to_dict(), "train_config": train_cfg.to_dict(),
        "iter_num": 10, "best_val_loss": 3.3,
    })
    return out_dir, model, train_cfg


def test_main_writes_json_markdown_and_readable_pngs(tmp_path, capsys):
    import matplotlib.image

    from blockloop.train import TrainingData

    out_dir, model, train_cfg = write_run(tmp_path)
    report = tmp_path / "report"
    rc = analysis.main([f"--out_dir={out_dir}", "--batches=2", f"--report_dir={report}",
                        "--num_loops=4"])
    assert rc == 0, capsys.readouterr().err
    res = json.loads((report / "analysis.json").read_text())
    assert res["num_loops"] == 4 and res["trained_loops"] == 3 and res["iter_num"] == 10
    # Scored on the run's own first two fixed validation batches.
    batches = TrainingData(train_cfg).eval_batches("val")[:2]
    losses = [model.eval()(x, y, num_loops=4)[1].item() for x, y in batches]
    assert res["model_loss"] == pytest.approx(np.mean(losses), abs=1e-5)
    assert [p["num_loops"] for p in res["loop_scaling"]] == [1, 2, 3, 4, 5, 6, 8, 16]
    # Default sweep: the fixed grid plus quantiles of delta_t where exit is checked (t = 2, 3).
    traced = tracing_copy(model)
    checked = []
    for x, y in batches:
        traced(x, y, num_loops=4, loop_exit=False)
        checked.append(traced.last_loop_trace.units[0].deltas[1:3].flatten().double().numpy())
    qs = np.quantile(np.concatenate(checked), analysis.SWEEP_DELTA_QUANTILES)
    expected = set(analysis.DEFAULT_THRESHOLDS) | {float(f"{q:.2g}") for q in qs} | {0.01}
    assert [p["threshold"] for p in res["exit_sweep"]] == sorted(expected)
    assert res["units"][0]["pca"]["tokens"][0]["label"].startswith("pos 0 '")
    md = (report / "analysis.md").read_text()
    for name, (filename, sentence) in analysis.FIGURES.items():
        path = report / filename
        assert path.read_bytes()[:8] == PNG_SIGNATURE, filename
        image = matplotlib.image.imread(path)
        assert image.shape[0] > 200 and image.shape[1] > 300, filename
        assert image[..., :3].std() > 0.05, filename  # not a blank canvas
        assert f"]({filename})" in md and sentence in md
        assert res["figures"][name] == filename


def test_main_default_report_dir_and_help(tmp_path, capsys):
    assert analysis.main(["--help"]) == 0
    assert "--num_loops" in capsys.readouterr().out
    out_dir, _, _ = write_run(tmp_path)
    (out_dir / "best.pt").rename(out_dir / "last.pt")  # falls back to last.pt
    (out_dir / "best.pt.json").rename(out_dir / "last.pt.json")
    assert analysis.main([f"--out_dir={out_dir}", "--batches=1", "--thresholds=0.01"]) == 0
    res = json.loads((out_dir / "analysis" / "analysis.json").read_text())
    assert res["checkpoint"].endswith("last.pt")
    assert [p["threshold"] for p in res["exit_sweep"]] == [0.01]


def test_checkpoint_analysis_equals_the_evaluation_module(tmp_path):
    from blockloop.checkpoint import load_model
    from blockloop.train import TrainingData

    out_dir, _, train_cfg = write_run(tmp_path)
    res = analysis.analyze_checkpoint(
        out_dir, tmp_path / "report", batches=3, thresholds=[1e-3, 0.05, 1e9]
    )
    model, _ = load_model(out_dir / "best.pt", "cpu")
    batches = TrainingData(train_cfg).eval_batches("val")[:3]
    trained = model.config.max_loops
    assert res["num_loops"] == trained and res["dtype"] == "float32"
    ref = evaluate(model, batches, num_loops=trained, loop_exit=False)
    assert res["model_loss"] == pytest.approx(ref.loss, abs=1e-6)
    counts = [p["num_loops"] for p in res["loop_scaling"]]
    assert counts == scaling_loop_counts(model.config, (trained,))
    sweep = [p["threshold"] for p in res["exit_sweep"]]
    assert sweep == [1e-3, analysis.DEFAULT_EXIT_THRESHOLD, 0.05, 1e9]
    for got, want in [
        (res["loop_scaling"], loop_scaling(model, batches, counts)),
        (res["exit_sweep"], exit_sweep(model, batches, sweep, trained)),
    ]:
        assert len(got) == len(want)
        for g, w in zip(got, want):
            assert g.keys() == w.keys()
            for key in w:
                assert g[key] == pytest.approx(w[key], abs=1e-6), key
    exit_ref = evaluate(model, batches, num_loops=trained, loop_exit=True,
                        exit_threshold=analysis.DEFAULT_EXIT_THRESHOLD)
    assert res["exit"]["loss"] == pytest.approx(exit_ref.loss, abs=1e-6)
    assert res["exit"]["mean_iterations"] == pytest.approx(exit_ref.mean_iterations, abs=1e-6)


def error_line(capsys):
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    return err


def test_main_errors_are_one_line_and_exit_2(tmp_path, capsys):
    assert analysis.main([f"--out_dir={tmp_path / 'missing'}"]) == 2
    assert "does not exist" in error_line(capsys)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert analysis.main([f"--out_dir={empty}"]) == 2
    assert "no best.pt or last.pt" in error_line(capsys)
    plain_dir, _, _ = write_run(tmp_path / "plain", loop_center_idx=-1)
    assert analysis.main([f"--out_dir={plain_dir}"]) == 2
    assert "without looping" in error_line(capsys)
    assert analysis.main([f"--out_dir={plain_dir}", "--data_dir=/nonexistent", "--batches=0"]) == 2
    assert "batches=0" in error_line(capsys)
    looped_dir, _, _ = write_run(tmp_path / "looped")
    # The device is named, not the checkpoint, and before any work.
    assert analysis.main([f"--out_dir={looped_dir}", "--device=gpu"]) == 2
    assert "device='gpu'" in error_line(capsys)
    assert analysis.main([f"--out_dir={looped_dir}", "--num_loops=0"]) == 2
    assert "num_loops=0" in error_line(capsys)
    concat_dir, _, _ = write_run(
        tmp_path / "concat", max_loops=1, concatenate_initial_representation=True
    )
    assert analysis.main([f"--out_dir={concat_dir}", "--num_loops=2"]) == 2
    assert "num_loops=2" in error_line(capsys)
    assert not (concat_dir / "analysis").exists()


# ---- loop dynamics and loop against layer -------------------------------------------------------

def half_map_model():
    """Identity looped block (both residual branches zero) with a concat adapter W = [-0.5 I | 0]:
    u_t = s + W [s ; x0] = 0.5 s, so s_t = 0.5 s_(t-1) for t >= 2 and the map's Jacobian is
    0.5 I there (the identity at t = 1, which has no injection)."""
    torch.manual_seed(0)
    model = GPT(tiny_config(loop_input_injection="concat", bias=False)).eval()
    return make_half_map(model, [1])


def assert_intervals_contain_the_mean(dyn):
    checked = 0
    for unit in dyn["units"]:
        for row in unit["rows"]:
            for key, cell in row.items():
                if key == "t" or cell["mean"] is None or cell["low"] is None:
                    continue
                slack = 1e-9 * max(1.0, abs(cell["mean"]))
                assert cell["low"] - slack <= cell["mean"] <= cell["high"] + slack, (key, row)
                checked += 1
    assert checked > 0


def test_analysis_lipschitz_of_the_half_map_is_one_half():
    model = half_map_model()
    res = analyze_model(model, [batch(3, 16, seed=1), batch(3, 16, seed=2)], num_loops=5,
                        thresholds=(0.01,), cka_tokens=32, fate_factor=8)
    dyn = res["dynamics"]
    rows = dyn["units"][0]["rows"]
    assert [r["t"] for r in rows] == list(range(6))
    assert rows[0]["lipschitz"]["mean"] is None  # no map enters s_0
    assert rows[1]["lipschitz"]["mean"] == pytest.approx(1.0, abs=1e-4)  # identity block
    for row in rows[2:]:
        assert row["lipschitz"]["mean"] == pytest.approx(0.5, abs=1e-4)
        assert row["lipschitz"]["n"] == min(6, dyn["lipschitz"]["sequences"])
        assert row["delta"]["mean"] == pytest.approx(0.5, abs=1e-4)  # ||0.5 s - s|| / ||s||
    for row in rows[3:]:
        assert row["cos"]["mean"] == pytest.approx(1.0, abs=1e-6)  # shrinking straight in
    fate = dyn["units"][0]["fate"]
    # 8 x 3 halvings: every token has converged (to 0) within trajectory_fate's tolerance.
    assert fate["num_loops"] == 8 * 3 and fate["fractions"]["fixed_point"] == 1.0
    assert_intervals_contain_the_mean(dyn)
    json.dumps(res, allow_nan=False)


def test_loop_dynamics_means_are_sequence_means_of_the_trace():
    from blockloop.dynamics import (
        jacobian_sigma_max,
        loop_dynamics,
        step_statistics,
        unit_inputs,
    )
    from blockloop.records import jsonable

    model = tiny_model(False, 1)
    x, y = batch(4, 16, seed=3)
    dyn = loop_dynamics(model, [(x[:2], y[:2]), (x[2:], y[2:])], lipschitz_sequences=2,
                        lipschitz_iters=100, lens="direct")
    assert len(dyn["units"]) == 3 and dyn["sequences"] == 4 and dyn["lipschitz"]["sequences"] == 2
    for k, unit in enumerate(dyn["units"]):
        _, states = unit_inputs(model, x, k, 3)
        per_seq = {key: v.mean(dim=-1) for key, v in step_statistics(states).items()}
        logits = torch.stack([model.logit_lens(s) for s in states]).double()
        loss = [F.cross_entropy(lg.transpose(1, 2), y, reduction="none").mean(-1) for lg in logits]
        for row in unit["rows"]:
            t = row["t"]
            for key in ("step_norm", "delta", "cos", "state_norm"):
                want = per_seq[key][t].mean().item()
                got = row[key]["mean"]
                assert (math.isnan(got) and math.isnan(want)) or got == pytest.approx(want), key
            assert row["lens_loss"]["mean"] == pytest.approx(loss[t].mean().item(), rel=1e-5)
        # Lipschitz on the first 2 sequences, as jacobian_sigma_max gives it iteration by iteration.
        for t in range(1, 4):
            want = jacobian_sigma_max(model, x[:2], group=k, iteration=t, num_loops=3).mean()
            assert unit["rows"][t]["lipschitz"]["mean"] == pytest.approx(want.item(), rel=1e-2)
    dyn = jsonable(dyn)
    assert dyn["units"][0]["rows"][0]["step_norm"]["mean"] is None
    assert_intervals_contain_the_mean(dyn)


def same_weights_plain(looped):
    cfg = looped.config
    plain = GPT(GPTConfig(block_size=cfg.block_size, vocab_size=cfg.vocab_size,
                          n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd,
                          dropout=0.0)).eval()
    plain.load_state_dict(looped.state_dict())
    return plain


def test_loop_against_layer_of_a_single_pass_loop_is_its_own_plain_model():
    looped = tiny_model(True, 0, max_loops=1)  # s_0 = h_1, s_1 = h_2
    plain = same_weights_plain(looped)
    res = analysis.loop_against_layer(looped, plain, [batch(3, 16, seed=1), batch(3, 16, seed=2)],
                                      cka_tokens=64)
    unit = res["units"][0]
    cka = np.array(unit["cka"])
    assert cka.shape == (2, 4) and res["tokens"] == 64
    assert unit["matched_layer"] == [1, 2] and unit["best_layer"] == [1, 2]
    np.testing.assert_allclose([cka[0, 1], cka[1, 2]], 1.0, atol=1e-9)
    assert cka[0, 2] < 0.999 and cka[1, 1] < 0.999  # the weights differ enough to tell apart


def test_loop_against_layer_of_an_unrolled_loop_lines_up_with_depth():
    # One block looped 3 times without injection = a plain 3-block model with copies of it.
    looped = tiny_model(True, 0, n_layer=1, loop_center_idx=0, max_loops=3)
    torch.manual_seed(5)
    plain = GPT(GPTConfig(block_size=16, vocab_size=VOCAB, n_layer=3, n_head=2, n_embd=32,
                          dropout=0.0)).eval()
    state = {k: v for k, v in looped.state_dict().items() if not k.startswith("transformer.h.")}
    for i in range(3):
        state.update({k.replace("transformer.h.0.", f"transformer.h.{i}."): v
                      for k, v in looped.state_dict().items() if k.startswith("transformer.h.0.")})
    plain.load_state_dict(state)
    res = analysis.loop_against_layer(looped, plain, [batch(4, 16)])
    unit = res["units"][0]
    assert unit["matched_layer"] == [0, 1, 2, 3] and unit["best_layer"] == [0, 1, 2, 3]
    np.testing.assert_allclose(np.diagonal(np.array(unit["cka"])), 1.0, atol=1e-9)
    assert res["looped_effective_depth"] == res["plain_n_layer"] == 3
    # Untied groups count each block's extra iterations: block 1 x3, then block 2 at depth 4.
    assert analysis.matched_layers(tiny_config(False, 1, max_loops=3)) == [
        [0, 1, 2, 3], [3, 4, 5, 6], [6, 7, 8, 9]]


def test_loop_against_layer_refuses_other_tokens_and_looped_references():
    looped = tiny_model()
    with pytest.raises(analysis.AnalysisError, match="vocab_size"):
        analysis.loop_against_layer(looped, GPT(GPTConfig(block_size=16, vocab_size=VOCAB + 1,
                                                            n_layer=2, n_head=2, n_embd=32)),
                                    [batch()])
    with pytest.raises(analysis.AnalysisError, match="block_size"):
        analysis.check_comparable(looped, GPT(GPTConfig(block_size=8, vocab_size=VOCAB,
                                                         n_layer=2, n_head=2, n_embd=32)))
    with pytest.raises(analysis.AnalysisError, match="loops"):
        analysis.check_comparable(looped, tiny_model())


def test_jacobian_sigma_max_is_exported_by_analysis():
    from blockloop import dynamics

    assert analysis.jacobian_sigma_max is dynamics.jacobian_sigma_max
    got = analysis.jacobian_sigma_max(half_map_model(), batch(2)[0], group=0, iteration=2)
    assert got.shape == (2,) and got.dtype == torch.float32
    torch.testing.assert_close(got, torch.full((2,), 0.5))


def test_report_survives_non_finite_dynamics(tmp_path):
    import matplotlib.image

    res = analyze_model(tiny_model(), [batch()], thresholds=(0.01,), cka_tokens=16)
    for row in res["dynamics"]["units"][0]["rows"][2:]:  # a run that diverged at t = 2
        for key, cell in row.items():
            if key != "t":
                cell.update(mean=None, low=None, high=None)
    res["dynamics"]["units"][0]["fate"] = {"num_loops": 12, "skipped": "diverged"}
    report = analysis.write_report(res, tmp_path)
    for name in ("loop_dynamics", "loop_lens", "loop_fates"):
        image = matplotlib.image.imread(report["figures"][name])
        assert image[..., :3].std() > 0.05, name
    md = (tmp_path / "analysis.md").read_text()
    assert "| 2 | non-finite |" in md and "skipped (diverged)" in md


def test_analyze_compare_to_end_to_end(tmp_path, capsys):
    import matplotlib.image

    data = write_token_dataset(tmp_path / "data", vocab=11)
    looped, plain = tmp_path / "looped", tmp_path / "plain"
    run(tiny_args(data, looped, "--max_iters=4", "--loop_center_idx=1", "--max_loops=2"))
    run(tiny_args(data, plain, "--max_iters=4", "--n_layer=3"))
    report = tmp_path / "report"
    args = [f"--out_dir={looped}", "--batches=1", f"--report_dir={report}",
            "--lipschitz_sequences=2", "--lipschitz_iters=5", "--fate_factor=3"]
    assert analysis.main(args + [f"--compare_to={plain}"]) == 0, capsys.readouterr().err
    res = json.loads((report / "analysis.json").read_text())
    assert res["compare_to"].endswith("best.pt") or res["compare_to"].endswith("last.pt")
    dyn, lvl = res["dynamics"], res["loop_against_layer"]
    assert dyn["lipschitz"]["max_power_iterations"] == 5 and dyn["lipschitz"]["sequences"] == 2
    assert dyn["units"][0]["fate"]["num_loops"] == 6 and dyn["fate_factor"] == 3
    assert lvl["plain_n_layer"] == 3 and len(lvl["units"][0]["cka"]) == 3  # s_0 .. s_2
    assert len(lvl["units"][0]["cka"][0]) == 4  # h_0 .. h_3
    assert_intervals_contain_the_mean(dyn)
    md = (report / "analysis.md").read_text()
    assert "## Loop dynamics" in md and "## Loop against layer" in md
    for name, (filename, sentence) in analysis.COMPARE_FIGURES.items():
        assert (report / filename).read_bytes()[:8] == PNG_SIGNATURE
        assert matplotlib.image.imread(report / filename)[..., :3].std() > 0.05
        assert f"]({filename})" in md and sentence in md and res["figures"][name] == filename
    # Refusals: one line, exit 2, before any report is written.
    other = tmp_path / "other"
    run(tiny_args(data, other, "--max_iters=2", "--block_size=8"))
    for bad, why in ((tmp_path / "missing", "does not exist"), (data, "no best.pt"),
                     (looped, "loops"), (other, "block_size=8")):
        fresh = tmp_path / f"r-{bad.name}"
        assert analysis.main(args[:2] + [f"--report_dir={fresh}", f"--compare_to={bad}"]) == 2
        assert why in error_line(capsys) and not fresh.exists()
