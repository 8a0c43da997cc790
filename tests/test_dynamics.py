"""blockloop.dynamics against independent computations.

The power-iteration sigma_max against the SVD of dense Jacobians (torch.autograd.functional,
reverse mode) of tiny models' iteration maps, and against a model whose map is exactly s -> 0.5 s;
the iteration map against the model's own trace; trajectory fates on planted fixed points,
cycles and divergence; step and lens statistics recomputed by hand with numpy; box counting on
sets of known dimension; CKA against the HSIC definition; the bootstrap on known data.
"""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from blockloop import dynamics
from blockloop.dynamics import (
    bootstrap_ci,
    box_counting_dimension,
    cka_across,
    iteration_map,
    jacobian_sigma_max,
    lens_statistics,
    project_pca,
    sigma_max,
    step_statistics,
    trajectory_fate,
    unit_inputs,
)
from blockloop.model import GPT, GPTConfig
from tests.conftest import make_half_map

VOCAB = 11


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model(injection="concat", tied=True, radius=0, seed=0, **kw):
    torch.manual_seed(seed)
    config = GPTConfig(
        block_size=8, vocab_size=VOCAB, n_layer=3, n_head=2, n_embd=16, loop_center_idx=1,
        loop_radius=radius, max_loops=3, tied_looping=tied, loop_input_injection=injection,
        bias=False, **kw,
    )
    model = GPT(config).eval()
    # Larger weights than the fresh init, so the map is far from identity and a wrong Jacobian,
    # iteration index or adapter shows up; random adapters so injection matters.
    with torch.no_grad():
        for p in model.transformer.h.parameters():
            if p.dim() == 2:
                p.mul_(4.0)
        if model.looper.adapters is not None:
            for adapter in model.looper.adapters:
                adapter.proj.weight.normal_(0, 0.2)
    return model


def ids(batch=2, length=8, seed=1):
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def dense_sigma_per_row(f, s):
    """SVD of each row's diagonal block of the dense Jacobian; also the largest off-block entry."""
    jac = torch.autograd.functional.jacobian(f, s.detach().double())
    batch, n = s.shape[0], s[0].numel()
    jac = jac.reshape(batch, n, batch, n)
    sig = torch.stack([torch.linalg.matrix_norm(jac[b, :, b, :], ord=2) for b in range(batch)])
    off = max((jac[b, :, c, :].abs().max() for b in range(batch) for c in range(batch) if b != c),
              default=torch.tensor(0.0))
    return sig, float(off)


# ----------------------------------------------------------------------------------------------
# sigma_max


def test_sigma_max_on_linear_maps_with_known_singular_values():
    # Row b's map is s -> A_b s with singular values known by construction; rows differ.
    torch.manual_seed(0)
    n, batch = 12, 3
    top = torch.tensor([3.0, 0.7, 1.5], dtype=torch.float64)
    mats = []
    for b in range(batch):
        q1, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64))
        q2, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64))
        sv = torch.linspace(0.1, 0.6, n, dtype=torch.float64) * top[b]
        sv[0] = top[b]
        mats.append(q1 @ torch.diag(sv) @ q2.T)
    mats = torch.stack(mats)

    def f(s):
        return torch.einsum("bij,bj->bi", mats, s.reshape(batch, n)).reshape(s.shape)

    s = torch.randn(batch, 3, 4, dtype=torch.float64)
    got = sigma_max(f, s, iters=500, tol=1e-12)
    assert got.shape == (batch,)
    torch.testing.assert_close(got, top, rtol=1e-6, atol=0)


@pytest.mark.parametrize(
    "injection,tied,radius,unit,t",
    [("concat", True, 0, 0, 3), ("concat", True, 0, 0, 1), ("add", True, 1, 0, 2),
     ("none", False, 1, 2, 3), ("concat", False, 1, 1, 2)],
)
def test_jacobian_sigma_max_matches_dense_jacobian(injection, tied, radius, unit, t):
    model = tiny_model(injection, tied, radius)
    idx = ids()
    got = jacobian_sigma_max(model, idx, group=unit, iteration=t, iters=1000, tol=1e-9)
    x0, states = unit_inputs(model, idx, unit, model.config.max_loops)
    f = iteration_map(model, unit, x0.double(), t)
    model.double()
    want, off = dense_sigma_per_row(f, states[t - 1])
    assert off == 0.0  # rows do not mix: the Jacobian is block-diagonal
    assert got.shape == (2,) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-3, atol=0)


def test_identity_blocks_with_half_adapter_have_lipschitz_one_half():
    model = GPT(GPTConfig(block_size=8, vocab_size=VOCAB, n_layer=3, n_head=2, n_embd=16,
                          loop_center_idx=1, max_loops=3, loop_input_injection="concat",
                          bias=False)).eval()
    make_half_map(model, [1])
    idx = ids(batch=3)
    torch.testing.assert_close(jacobian_sigma_max(model, idx), torch.full((3,), 0.5))
    # The first iteration has no injection: the map is the identity block itself.
    torch.testing.assert_close(jacobian_sigma_max(model, idx, iteration=1), torch.ones(3))
    # And the trace agrees: each later iteration halves the state.
    _, states = unit_inputs(model, idx, 0, 3)
    torch.testing.assert_close(states[3], 0.5 * states[2])


def test_iteration_map_reproduces_the_trace():
    for injection, tied, radius in (("concat", True, 0), ("add", False, 1), ("none", True, 1)):
        model = tiny_model(injection, tied, radius)
        idx = ids()
        for unit in range(len(model.loop_plan.units)):
            x0, states = unit_inputs(model, idx, unit, 4)
            assert states.shape == (5, 2, 8, 16)
            with torch.no_grad():
                for t in range(1, 5):
                    got = iteration_map(model, unit, x0, t)(states[t - 1])
                    torch.testing.assert_close(got, states[t], rtol=1e-5, atol=1e-5)


def test_unit_inputs_ignore_eval_noise_and_leave_the_model_alone():
    model = tiny_model(loop_noise_scale=1.0, loop_noise_in_eval=True)
    model.train()
    x0, _ = unit_inputs(model, ids(), 0, 3)
    again, _ = unit_inputs(model, ids(), 0, 3)
    torch.testing.assert_close(x0, again)  # no noise in s_0
    assert model.training and not model.config.loops_representation


def test_jacobian_sigma_max_refuses_bad_arguments():
    model = tiny_model()
    with pytest.raises(ValueError, match="iteration"):
        jacobian_sigma_max(model, ids(), iteration=4)
    with pytest.raises(ValueError, match="unit_index"):
        jacobian_sigma_max(model, ids(), group=1)
    plain = GPT(GPTConfig(block_size=8, vocab_size=VOCAB, n_layer=2, n_head=2, n_embd=16))
    with pytest.raises(ValueError, match="no looped"):
        jacobian_sigma_max(plain, ids())


# ----------------------------------------------------------------------------------------------
# Trajectory fates


def planted_trajectories(T=24, C=6, seed=0):
    """Columns: fixed point (contraction to a point), 2-cycle, 3-cycle, geometric divergence,
    contraction to 0, linear drift (wandering), NaN (diverging)."""
    g = torch.Generator().manual_seed(seed)
    a, b, c, target = (torch.randn(C, generator=g, dtype=torch.float64) for _ in range(4))
    t = torch.arange(T + 1, dtype=torch.float64)[:, None]
    fixed = target + (a - target) * 0.3**t
    two = torch.where(t.long() % 2 == 0, a, b).expand(T + 1, C)
    three = torch.stack([(a, b, c)[i % 3] for i in range(T + 1)])
    growing = a * 1.5**t
    to_zero = a * 0.5**t
    drift = a + 0.1 * t * b
    broken = a.expand(T + 1, C).clone()
    broken[T - 3:] = float("nan")
    return torch.stack([fixed, two, three, growing, to_zero, drift, broken], dim=1)


def test_trajectory_fate_classifies_planted_trajectories():
    fate = trajectory_fate(planted_trajectories())
    assert list(fate["labels"]) == [
        "fixed_point", "cycle", "cycle", "diverging", "fixed_point", "wandering", "diverging",
    ]
    assert list(fate["periods"]) == [0, 2, 3, 0, 0, 0, 0]
    assert fate["fractions"] == pytest.approx(
        {"fixed_point": 2 / 7, "cycle": 2 / 7, "diverging": 2 / 7, "wandering": 1 / 7}
    )


def test_trajectory_fate_thresholds_matter():
    x = planted_trajectories()
    # A 3-cycle is invisible when only periods up to 2 are looked for.
    assert trajectory_fate(x, max_period=2)["labels"][2] == "wandering"
    # Growth below the geometric threshold is not divergence; a low norm cap is.
    t = torch.arange(25, dtype=torch.float64)[:, None, None]
    slow = x[0:1, [3]] * 1.2**t
    assert trajectory_fate(slow)["labels"][0] == "diverging"
    assert trajectory_fate(slow, growth=1.5)["labels"][0] == "wandering"
    assert trajectory_fate(x[:, [5]], diverge_norm=1.0)["labels"][0] == "diverging"
    # A cycle converging from outside is a cycle only once it is within tol.
    noisy = x[:, [1]] + 0.5**t
    assert trajectory_fate(noisy[:8])["labels"][0] == "wandering"
    assert trajectory_fate(noisy)["labels"][0] == "cycle"


def test_trajectory_fate_on_the_half_map_model():
    # s -> 0.5 s after the first iteration: every token converges (to 0).
    states = 0.5 ** torch.arange(30, dtype=torch.float64)[:, None, None] * torch.randn(1, 5, 4)
    assert set(trajectory_fate(states)["labels"]) == {"fixed_point"}


# ----------------------------------------------------------------------------------------------
# Step and lens statistics


def test_step_statistics_against_numpy():
    x = torch.randn(5, 2, 3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    got = step_statistics(x)
    a = x.numpy()
    assert all(v.shape == (5, 2, 3) for v in got.values())
    for t in range(5):
        np.testing.assert_allclose(got["state_norm"][t], np.linalg.norm(a[t], axis=-1))
        if t == 0:
            assert torch.isnan(got["step_norm"][0]).all() and torch.isnan(got["delta"][0]).all()
            continue
        step = np.linalg.norm(a[t] - a[t - 1], axis=-1)
        np.testing.assert_allclose(got["step_norm"][t], step)
        np.testing.assert_allclose(got["delta"][t], step / (np.linalg.norm(a[t - 1], axis=-1) + 1e-6))
        if t >= 2:
            u, v = a[t] - a[t - 1], a[t - 1] - a[t - 2]
            cos = (u * v).sum(-1) / (np.linalg.norm(u, axis=-1) * np.linalg.norm(v, axis=-1))
            np.testing.assert_allclose(got["cos"][t], cos)
    assert torch.isnan(got["cos"][:2]).all()
    # A 2-cycle reverses every step.
    cyc = planted_trajectories()[:, [1]]
    assert torch.allclose(step_statistics(cyc)["cos"][2:], torch.tensor(-1.0, dtype=torch.float64))


def test_lens_statistics_against_direct_formulas():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 2, 5, VOCAB, generator=g)
    targets = torch.randint(0, VOCAB, (2, 5), generator=g)
    targets[1, :2] = -1
    got = lens_statistics(logits, targets)
    assert all(v.shape == (4, 2) for v in got.values())
    for t in range(4):
        for b in range(2):
            keep = targets[b] != -1
            lg = logits[t, b][keep].double()
            want = F.cross_entropy(lg, targets[b][keep])
            assert got["loss"][t, b].item() == pytest.approx(want.item(), rel=1e-10)
            p = lg.softmax(-1)
            assert got["entropy"][t, b].item() == pytest.approx(-(p * p.log()).sum(-1).mean().item())
            if t:
                q = logits[t - 1, b][keep].double().softmax(-1)
                kl = F.kl_div(q.log(), p, reduction="none").sum(-1).mean()
                assert got["kl_prev"][t, b].item() == pytest.approx(kl.item(), rel=1e-10)
    assert torch.isnan(got["kl_prev"][0]).all()
    same = lens_statistics(logits[[0, 0]], targets)["kl_prev"][1]
    torch.testing.assert_close(same, torch.zeros(2, dtype=torch.float64))


# ----------------------------------------------------------------------------------------------
# Box counting, PCA, CKA, bootstrap


def test_box_counting_on_sets_of_known_dimension():
    rng = np.random.default_rng(0)
    u = rng.random(20000)
    line = np.stack([3 * u - 1, 2 * u + 5], axis=1)
    square = rng.random((20000, 2)) * 4
    angle = rng.random(20000) * 2 * np.pi
    circle = np.stack([np.cos(angle), np.sin(angle)], axis=1)
    for points, want in ((line, 1.0), (square, 2.0), (circle, 1.0)):
        got = box_counting_dimension(points)
        assert got["dimension"] == pytest.approx(want, abs=0.08)
        low, high = got["fit_range"]
        assert 0 < low < high and len(got["log_eps"]) == len(got["log_counts"]) >= 3
    assert box_counting_dimension(np.zeros((10, 2)))["dimension"] == 0.0
    fixed = box_counting_dimension(square, scales=[1.0, 0.5, 0.25, 0.125])
    assert fixed["fit_range"] == (0.125, 1.0) and fixed["dimension"] == pytest.approx(2.0, abs=0.01)
    with pytest.raises(ValueError):
        box_counting_dimension(np.array([[0.0, np.nan], [1.0, 1.0]]))


def test_project_pca_finds_the_plane_of_a_planar_set():
    rng = np.random.default_rng(0)
    plane = rng.normal(size=(500, 2)) * [3.0, 1.0]
    basis, _ = np.linalg.qr(rng.normal(size=(8, 8)))
    points = torch.tensor(plane @ basis[:2])
    coords, ratio = project_pca(points, 2)
    assert coords.shape == (500, 2) and float(ratio.sum()) == pytest.approx(1.0)
    # Distances are kept: the projection loses nothing of a planar set.
    torch.testing.assert_close(torch.cdist(coords, coords), torch.cdist(points, points), atol=1e-6, rtol=1e-9)


def hsic_cka(x, y):
    n = x.shape[0]
    h = torch.eye(n, dtype=torch.float64) - 1.0 / n
    k, l = h @ (x @ x.T) @ h, h @ (y @ y.T) @ h
    return float((k * l).sum() / torch.sqrt((k * k).sum() * (l * l).sum()))


def test_cka_across_identities_and_hsic_definition():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(3, 40, 6, dtype=torch.float64, generator=g)
    b = torch.randn(2, 40, 9, dtype=torch.float64, generator=g)
    q, _ = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64, generator=g))
    transformed = torch.stack([5.0 * a[0] @ q, a[1] + 3.0])
    got = cka_across(a, transformed)
    assert got.shape == (3, 2)
    assert got[0, 0].item() == pytest.approx(1.0, abs=1e-12)  # orthogonal + isotropic scale
    assert got[1, 1].item() == pytest.approx(1.0, abs=1e-12)  # shift (centring)
    torch.testing.assert_close(torch.diagonal(cka_across(a, a)), torch.ones(3, dtype=torch.float64))
    cross = cka_across(a, b)
    for i in range(3):
        for j in range(2):
            assert cross[i, j].item() == pytest.approx(hsic_cka(a[i], b[j]), rel=1e-10)
    assert cross.max() < 0.9
    assert torch.isnan(cka_across(torch.ones(1, 40, 6), a)).all()


def test_bootstrap_ci_is_deterministic_and_covers_the_mean():
    rng = np.random.default_rng(0)
    values = rng.normal(2.0, 1.0, size=(400, 3))
    values[0, 2] = np.nan
    ci = bootstrap_ci(values, axis=0, seed=3)
    again = bootstrap_ci(torch.tensor(values), axis=0, seed=3)
    for key in ("mean", "low", "high"):
        np.testing.assert_array_equal(ci[key], again[key])
    assert (ci["low"] < ci["mean"]).all() and (ci["mean"] < ci["high"]).all()
    # The half-width is about 1.96 standard errors.
    np.testing.assert_allclose(ci["high"] - ci["low"], 2 * 1.96 / math.sqrt(400), rtol=0.15)
    np.testing.assert_allclose(ci["mean"], np.nanmean(values, axis=0))
    other = bootstrap_ci(values.T, axis=1, seed=4)
    assert not np.array_equal(other["low"], ci["low"])


def test_dynamics_does_not_import_analysis():
    source = Path(dynamics.__file__).read_text()
    assert "analysis" not in [
        line.split()[1].split(".")[-1] for line in source.splitlines()
        if line.startswith(("import blockloop", "from blockloop"))
    ]
