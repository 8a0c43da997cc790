"""Second-generation looping: loop groups (even sizes, several groups with their own counts),
"noise" state initialisation, the state norm, exit criteria and causal per-token exit, each
checked against an independent unrolled reference or a defining property."""

import itertools

import pytest
import torch

from blockloop.looping import EVAL_NOISE_SEED, effective_depth
from blockloop.model import GPT, GPTConfig
from blockloop.sampling import teacher_forced_logits
from tests import reference

BASE = dict(block_size=16, vocab_size=13, n_layer=5, n_head=2, n_embd=16, bias=True)


def build(seed=0, **kw):
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**{**BASE, **kw})).eval()
    with torch.no_grad():  # make adapters and norms non-trivial so they are exercised
        for name, p in model.named_parameters():
            if name.startswith("looper."):
                p.add_(0.05 * torch.randn_like(p))
    return model


def ref_config(model):
    cfg = model.config
    groups = [(g.first, g.last, g.count) for g in model.loop_plan.groups]
    return {"groups": groups, "tied": cfg.tied_looping, "n_head": cfg.n_head,
            "n_layer": cfg.n_layer, "injection": cfg.injection_mode,
            "state_init": cfg.loop_state_init, "state_norm": cfg.loop_state_norm == "layernorm",
            "noise_scale": cfg.loop_noise_scale, "eval_noise_seed": EVAL_NOISE_SEED,
            "block_size": cfg.block_size}


def tokens(batch, length, seed=0):
    return torch.randint(0, 13, (batch, length), generator=torch.Generator().manual_seed(seed))


def all_logits(model, idx, **kw):
    logits, _ = model(idx, torch.zeros_like(idx), **kw)
    return logits


CASES = list(itertools.product(
    ([[1, 2]], [[0, 1], [3, 3]], [[1, 4]]),  # an even group, two groups, a 4-block core
    (True, False),
    ("none", "add", "concat"),
    ("input", "noise"),
))


@pytest.mark.parametrize("groups,tied,injection,init", CASES)
def test_groups_equal_the_unrolled_reference(groups, tied, injection, init):
    if init == "noise" and injection == "none":
        pytest.skip("noise init requires injection (refused by the config)")
    counts = [2, 3][: len(groups)] if len(groups) > 1 else []
    model = build(loop_groups=groups, loop_counts=counts, max_loops=3, tied_looping=tied,
                  loop_input_injection=injection, loop_state_init=init, loop_noise_scale=0.5,
                  loop_state_norm="layernorm" if injection == "add" else "none")
    idx = torch.randint(0, 13, (2, 11))
    with torch.no_grad():
        got = all_logits(model, idx)
        want = reference.looped_forward(idx, model.state_dict(), ref_config(model))
    torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-4)
    # Per-group overrides run each group at its own count.
    with torch.no_grad():
        over = [1] * len(groups)
        torch.testing.assert_close(
            all_logits(model, idx, num_loops=over).double(),
            reference.looped_forward(idx, model.state_dict(), ref_config(model), over),
            atol=1e-4, rtol=1e-4)


def test_one_group_is_the_centre_radius_model_bit_for_bit():
    for tied, injection in itertools.product((True, False), ("none", "add", "concat")):
        a = build(loop_center_idx=2, loop_radius=1, max_loops=3, tied_looping=tied,
                  loop_input_injection=injection)
        b = build(loop_groups=[[1, 3]], max_loops=3, tied_looping=tied,
                  loop_input_injection=injection)
        assert a.state_dict().keys() == b.state_dict().keys()
        assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
        idx = torch.randint(0, 13, (3, 9))
        with torch.no_grad():
            assert torch.equal(all_logits(a, idx), all_logits(b, idx))
            assert torch.equal(all_logits(a, idx, loop_exit=True, exit_threshold=0.05),
                               all_logits(b, idx, loop_exit=True, exit_threshold=0.05))


def test_effective_depth_and_flops_count_every_group():
    cfg = GPTConfig(**{**BASE, "n_layer": 8}, loop_groups=[[2, 5]], max_loops=3)  # 2/4/2
    assert effective_depth(cfg) == 8 + 4 * 2
    two = GPTConfig(**BASE, loop_groups=[[1, 2], [3, 3]], loop_counts=[3, 2])
    assert effective_depth(two) == 5 + 2 * 2 + 1 * 1
    assert effective_depth(two, [1, 1]) == 5
    model = GPT(two)
    per_block = model.flops_per_token(num_loops=[1, 1], training=False)
    assert model.flops_per_token(training=False) > per_block
    plain = GPT(GPTConfig(**{**BASE, "n_layer": effective_depth(two)}))
    assert model.flops_per_token(training=False) == pytest.approx(
        plain.flops_per_token(training=False), rel=1e-9)


def test_config_refuses_bad_groups_in_one_line():
    for bad, match in (
        (dict(loop_groups=[[1, 2]], loop_center_idx=1), "set one form only"),
        (dict(loop_groups=[[2, 1]]), "first <= last"),
        (dict(loop_groups=[[0, 2], [2, 3]]), "disjoint"),
        (dict(loop_groups=[[0, 5]]), "n_layer=5"),
        (dict(loop_groups=[[0, 1]], loop_counts=[2, 2]), "one count per loop group"),
        (dict(loop_groups=[[0, 1]], loop_state_init="noise"), "injected"),
        (dict(loop_groups=[[0, 1]], automatic_loop_exit_criterion="size"), "criterion"),
    ):
        with pytest.raises(ValueError, match=match):
            GPTConfig(**BASE, **bad)


# ----------------------------------------------------------------------------------------------
# exit criteria and per-token exit

CRITERIA = ("relative_change", "kl", "entropy", "delta_change")


def per_token_criterion(model, states, criterion):
    """c_t per token for t = 1 .. T from a trace's states, by the formulas of the README."""
    import torch.nn.functional as F

    delta = [((states[t] - states[t - 1]).norm(dim=-1) / (states[t - 1].norm(dim=-1) + 1e-6))
             for t in range(1, len(states))]
    logp = [F.log_softmax(model.logit_lens(s), -1) for s in states]
    if criterion == "relative_change":
        return delta
    if criterion == "entropy":
        return [-(lp.exp() * lp).sum(-1) for lp in logp[1:]]
    if criterion == "kl":
        return [(logp[t].exp() * (logp[t] - logp[t - 1])).sum(-1) for t in range(1, len(logp))]
    return [delta[0] * float("inf")] + [(delta[t] - delta[t - 1]).abs() for t in range(1, len(delta))]


def token_exit_model(criterion, idx, tied=True, groups=((1, 3),)):
    """A token-exit model whose threshold sits in the widest gap between the middle half of
    its criterion values at iteration 2 on `idx`: tokens then exit at different
    iterations, and no token sits on the knife edge where float rounding decides."""
    model = build(loop_groups=[list(g) for g in groups], max_loops=6, tied_looping=tied,
                  loop_input_injection="add", automatic_loop_exit=True,
                  automatic_loop_exit_criterion=criterion,
                  automatic_loop_exit_granularity="token", loops_representation=True)
    with torch.no_grad():
        # Sharper lens distributions: at initialisation they are near uniform, and KL between
        # consecutive iterates would be of the order of float rounding.
        model.transformer.ln_f.weight.mul_(300)
        model(idx, loop_exit=False)
        # Iteration 2, the first checked, of every unit: tokens split there.
        v = torch.cat([per_token_criterion(model, unit.states, criterion)[1].flatten()
                       for unit in model.last_loop_trace.units]).sort().values
    v = v[v > 1e-9]  # values of the order of float rounding cannot separate tokens reliably
    lo, hi = len(v) // 4, 3 * len(v) // 4
    k = lo + int(torch.argmax(v[lo + 1: hi] - v[lo: hi - 1]))
    model.config.automatic_loop_exit_threshold = float((v[k] + v[k + 1]) / 2)
    return model


@pytest.mark.parametrize("criterion", sorted(CRITERIA))
def test_token_exit_is_causal_and_batch_independent(criterion):
    idx = tokens(3, 16)
    model = token_exit_model(criterion, idx)
    with torch.no_grad():
        full = all_logits(model, idx)
        its = model.last_loop_iterations[0]
        assert its.shape == (3, 16) and len(its.unique()) > 1
        for p in (1, 5, 9, 16):
            torch.testing.assert_close(all_logits(model, idx[:, :p]), full[:, :p],
                                       atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(all_logits(model, idx[1:2]), full[1:2], atol=1e-5, rtol=1e-5)


def test_tokens_really_exit_at_different_iterations():
    idx = tokens(4, 16)
    model = token_exit_model("relative_change", idx)
    with torch.no_grad():
        all_logits(model, idx)
    its = model.last_loop_iterations[0]
    assert its.min() < 6 and len(its.unique()) > 1


@pytest.mark.parametrize("criterion,tied", [(c, t) for c in sorted(CRITERIA) for t in (True, False)])
def test_token_exit_forward_equals_cached_generation(criterion, tied):
    idx = tokens(2, 14)
    model = token_exit_model(criterion, idx, tied=tied, groups=((1, 2), (3, 3)))
    with torch.no_grad():
        full = all_logits(model, idx)
        cached, _ = teacher_forced_logits(model, idx, prompt_length=1, adaptive_exit=True)
    # cached[:, k] predicts idx[:, k + 1] from the first k + 1 tokens: the full pass's row k.
    torch.testing.assert_close(cached, full[:, :-1], atol=1e-4, rtol=1e-4)


def test_criteria_follow_their_formulas():
    import torch.nn.functional as F

    model = build(loop_groups=[[1, 3]], max_loops=4, loop_input_injection="add",
                  loops_representation=True)
    idx = torch.randint(0, 13, (2, 8))
    with torch.no_grad():
        all_logits(model, idx)
        states = model.last_loop_trace.units[0].states
        logp = [F.log_softmax(model.logit_lens(s), -1) for s in states]
        kl_2 = (logp[2].exp() * (logp[2] - logp[1])).sum(-1).mean(-1)
        entropy_2 = -(logp[2].exp() * logp[2]).sum(-1).mean(-1)
        delta = [((states[t] - states[t - 1]).norm(dim=-1)
                  / (states[t - 1].norm(dim=-1) + 1e-6)) for t in (1, 2)]
        delta_change_2 = (delta[1] - delta[0]).abs().mean(-1)
    # A sequence stops at t = 2 exactly when its mean criterion is below the threshold.
    for criterion, value in (("kl", kl_2), ("entropy", entropy_2),
                             ("delta_change", delta_change_2)):
        for b in range(2):
            exiting = build(loop_groups=[[1, 3]], max_loops=4, loop_input_injection="add",
                            automatic_loop_exit=True, automatic_loop_exit_criterion=criterion,
                            automatic_loop_exit_threshold=float(value[b]) * 1.001)
            with torch.no_grad():
                exiting(idx[b:b + 1])
            assert exiting.last_loop_iterations[0].item() == 2, criterion


# ----------------------------------------------------------------------------------------------
# noise init and the state norm


def test_noise_init_evaluation_is_reproducible_and_batch_independent():
    model = build(loop_groups=[[1, 3]], max_loops=3, loop_input_injection="concat",
                  loop_state_init="noise", loop_noise_scale=1.0)
    idx = torch.randint(0, 13, (3, 10))
    with torch.no_grad():
        a, b = all_logits(model, idx), all_logits(model, idx)
        alone = all_logits(model, idx[2:])
    assert torch.equal(a, b)
    torch.testing.assert_close(alone, a[2:], atol=1e-6, rtol=1e-6)


def test_state_norm_keeps_a_diverging_loop_finite():
    def diverging(norm):
        model = build(loop_groups=[[1, 1]], max_loops=3, loop_input_injection="concat",
                      loop_state_norm=norm)
        with torch.no_grad():
            for adapter in model.looper.adapters:
                adapter.proj.weight.zero_()
                adapter.proj.weight[:, :16] = 0.5 * torch.eye(16)  # the state grows 1.5x a step
        return model

    idx = torch.randint(0, 13, (2, 8))
    with torch.no_grad():
        assert not torch.isfinite(diverging("none")(idx, num_loops=256)[0]).all()
        assert torch.isfinite(diverging("layernorm")(idx, num_loops=256)[0]).all()


def test_analysis_reports_every_group_and_token_exit(tmp_path):
    from blockloop.analysis import analyze_model, tracing_copy, write_report

    model = tracing_copy(build(loop_groups=[[1, 2], [3, 3]], loop_counts=[2, 3], max_loops=3,
                               loop_input_injection="add", tied_looping=False,
                               automatic_loop_exit_granularity="token"))
    idx = tokens(4, 12)
    res = analyze_model(model, [(idx[:, :-1], idx[:, 1:])], thresholds=(0.0, 1e9))
    assert res["loop_groups"] == [[1, 2, 2], [3, 3, 3]]
    assert [(u["group"], u["blocks"]) for u in res["units"]] == [(0, [1]), (0, [2]), (1, [3])]
    # Token exit: each token counted once per unit in the histogram.
    assert all(sum(u["exit_histogram"]) == 4 * 11 for u in res["units"])
    sweep = {row["threshold"]: row for row in res["exit_sweep"]}
    assert sweep[1e9]["granularity"] == "token" and sweep[1e9]["mean_iterations"] == 2
    report = write_report(res, tmp_path / "report")
    assert "blocks 3-3 (trained at 3)" in (tmp_path / "report" / "analysis.md").read_text()
    assert report["figures"]
