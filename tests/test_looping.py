"""The looping core against independent computations: unrolled stacks, hand-written loops."""

import copy

import pytest
import torch
import torch.nn as nn

from blockloop.looping import LoopGroup, LoopPlan, relative_change, sample_num_loops
from blockloop.model import GPT, GPTConfig
from tests import reference

VOCAB = 41


def config(**kw):
    base = dict(block_size=12, vocab_size=VOCAB, n_layer=4, n_head=2, n_embd=16, dropout=0.0)
    base.update(kw)
    return GPTConfig(**base)


def model_with(seed=0, **kw):
    torch.manual_seed(seed)
    return GPT(config(**kw)).eval()


def tokens(batch=3, length=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, length), generator=g)


def unrolled_order(n_layer, start, stop, loops, tied):
    inner = list(range(start, stop))
    if tied:
        looped = inner * loops
    else:
        looped = [i for i in inner for _ in range(loops)]
    return list(range(start)) + looped + list(range(stop, n_layer))


def hand_loop(model, idx, injection, loops, adapters=None):
    """The loop written out by hand from the definition, on the model's own block objects."""
    blocks = model.transformer.h
    plan = model.loop_plan
    pos = torch.arange(idx.shape[1])
    x = model.transformer.wte(idx) + model.transformer.wpe(pos)
    for i in range(plan.start):
        x = blocks[i](x)
    for u, unit in enumerate(plan.units):
        x0 = x
        s = x0
        for t in range(1, loops + 1):
            if t == 1:
                inp = s
            elif injection == "none":
                inp = s
            elif injection == "add":
                inp = s + x0
            else:
                w = adapters[u].proj.weight
                b = adapters[u].proj.bias
                inp = s + torch.cat([s, x0], -1) @ w.T + b
            for i in unit:
                inp = blocks[i](inp)
            s = inp
        x = s
    for i in range(plan.stop, len(blocks)):
        x = blocks[i](x)
    return model.lm_head(model.transformer.ln_f(x))


def test_looping_off_is_the_plain_model_bit_for_bit():
    plain = model_with(loop_center_idx=-1)
    for kw in (dict(loop_center_idx=1, max_loops=1), dict(loop_center_idx=2, loop_radius=1, max_loops=1, tied_looping=False)):
        looped = model_with(**kw)
        assert set(looped.state_dict()) == set(plain.state_dict())
        looped.load_state_dict(plain.state_dict())
        idx = tokens()
        assert torch.equal(looped(idx, idx)[0], plain(idx, idx)[0])
    # Concat with max_loops=1 builds no adapters either.
    concat = model_with(loop_center_idx=1, max_loops=1, loop_input_injection="concat")
    assert concat.get_num_params() == plain.get_num_params()


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("center,radius", [(0, 0), (1, 0), (3, 0), (1, 1), (2, 1)])
@pytest.mark.parametrize("loops", [2, 3])
def test_none_injection_equals_unrolled_plain_gpt(tied, center, radius, loops):
    looped = model_with(loop_center_idx=center, loop_radius=radius, max_loops=loops, tied_looping=tied)
    plan = looped.loop_plan
    order = unrolled_order(4, plan.start, plan.stop, loops, tied)
    unrolled = copy.deepcopy(looped)
    # A plain GPT whose stack is the unrolled sequence of the same block objects.
    plain_cfg = config(n_layer=len(order))
    plain = GPT(plain_cfg).eval()
    plain.transformer.wte = looped.transformer.wte
    plain.transformer.wpe = looped.transformer.wpe
    plain.transformer.ln_f = looped.transformer.ln_f
    plain.lm_head = looped.lm_head
    plain.transformer.h = nn.ModuleList([looped.transformer.h[i] for i in order])
    idx = tokens()
    got, _ = looped(idx, idx)
    want, _ = plain(idx, idx)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    # And against the independent float64 reference.
    ref = reference.forward(idx, unrolled.state_dict(), 2, order)
    torch.testing.assert_close(got.double(), ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("center,radius", [(1, 0), (2, 1), (1, 1)])
def test_add_injection_equals_hand_written_loop(tied, center, radius):
    looped = model_with(loop_center_idx=center, loop_radius=radius, max_loops=3, tied_looping=tied, loop_input_injection="add")
    idx = tokens()
    got, _ = looped(idx, idx)
    with torch.no_grad():
        want = hand_loop(looped, idx, "add", 3)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    # Add really differs from none (the test would pass vacuously otherwise).
    none = model_with(loop_center_idx=center, loop_radius=radius, max_loops=3, tied_looping=tied)
    none.load_state_dict(looped.state_dict())
    assert not torch.allclose(none(idx, idx)[0], got, atol=1e-4)


@pytest.mark.parametrize("tied", [True, False])
def test_concat_injection_equals_hand_written_loop(tied):
    looped = model_with(loop_center_idx=2, loop_radius=1, max_loops=3, tied_looping=tied, concatenate_initial_representation=True)
    assert len(looped.looper.adapters) == (1 if tied else 3)
    torch.manual_seed(5)
    with torch.no_grad():
        for p in looped.looper.adapters.parameters():
            p.normal_(0, 0.1)
    idx = tokens()
    got, _ = looped(idx, idx)
    with torch.no_grad():
        want = hand_loop(looped, idx, "concat", 3, looped.looper.adapters)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def test_fresh_concat_adapter_is_pass_through():
    concat = model_with(loop_center_idx=1, max_loops=3, loop_input_injection="concat")
    none = model_with(loop_center_idx=1, max_loops=3)
    sd = {k: v for k, v in concat.state_dict().items() if not k.startswith("looper.")}
    none.load_state_dict(sd)
    idx = tokens()
    torch.testing.assert_close(concat(idx, idx)[0], none(idx, idx)[0], atol=0, rtol=0)
    n_adapter = 2 * 16 * 16 + 16
    assert concat.get_num_params() == none.get_num_params() + n_adapter


def test_noise_changes_training_output_only_and_is_reproducible():
    noisy = model_with(loop_center_idx=1, max_loops=3, loop_noise_scale=0.5)
    clean = model_with(loop_center_idx=1, max_loops=3)
    clean.load_state_dict(noisy.state_dict())
    idx = tokens()
    assert torch.equal(noisy(idx, idx)[0], clean(idx, idx)[0])  # eval: exactly noise-free
    noisy.train()
    torch.manual_seed(123)
    a, _ = noisy(idx, idx)
    torch.manual_seed(123)
    b, _ = noisy(idx, idx)
    c, _ = noisy(idx, idx)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    assert not torch.allclose(a, clean(idx, idx)[0])
    # Explicitly enabled in eval.
    in_eval = model_with(loop_center_idx=1, max_loops=3, loop_noise_scale=0.5, loop_noise_in_eval=True)
    in_eval.load_state_dict(noisy.state_dict())
    assert not torch.allclose(in_eval(idx, idx)[0], clean(idx, idx)[0])


def test_noise_enters_the_first_iteration_only():
    sigma = 0.3
    model = model_with(loop_center_idx=1, max_loops=3, loop_noise_scale=sigma, loops_representation=True, loop_input_injection="add")
    model.train()
    idx = tokens()
    torch.manual_seed(7)
    got, _ = model(idx, idx)
    trace = model.last_loop_trace.units[0]
    # Recompute by hand: x0 clean; s0 = x0 + sigma * eps with the same draw.
    blocks = model.transformer.h
    with torch.no_grad():
        x0 = blocks[0](model.transformer.wte(idx) + model.transformer.wpe(torch.arange(12)))
        eps = (trace.states[0] - x0) / sigma
        assert eps.std().item() == pytest.approx(1.0, rel=0.1)
        s = trace.states[0]
        for t in (1, 2, 3):
            u = s if t == 1 else s + x0  # the injected x0 is clean
            s = blocks[1](u)
            torch.testing.assert_close(s, trace.states[t], atol=1e-6, rtol=1e-5)


def test_trace_has_t_plus_one_states_and_matching_deltas():
    model = model_with(loop_center_idx=2, loop_radius=1, max_loops=4, tied_looping=False, loops_representation=True)
    idx = tokens(batch=2)
    model(idx, idx)
    trace = model.last_loop_trace
    assert [u.blocks for u in trace.units] == [(1,), (2,), (3,)]
    for unit in trace.units:
        assert unit.states.shape == (5, 2, 12, 16)
        assert unit.deltas.shape == (4, 2)
        assert torch.equal(unit.iterations, torch.tensor([4, 4]))
        for t in range(1, 5):
            s, prev = unit.states[t].double(), unit.states[t - 1].double()
            manual = ((s - prev).norm(dim=-1) / (prev.norm(dim=-1) + 1e-6)).mean(-1)
            torch.testing.assert_close(unit.deltas[t - 1].double(), manual, atol=1e-5, rtol=1e-4)
    # Off by default: no trace, but iteration counts are still there.
    plain = model_with(loop_center_idx=2, max_loops=4)
    plain(idx, idx)
    assert plain.last_loop_trace is None
    assert torch.equal(plain.last_loop_iterations[0], torch.tensor([4, 4]))


def test_exit_threshold_extremes():
    idx = tokens(batch=4)
    high = model_with(loop_center_idx=1, max_loops=6, automatic_loop_exit=True, automatic_loop_exit_threshold=1e9)
    high(idx, idx)
    assert torch.equal(high.last_loop_iterations[0], torch.full((4,), 2))
    low = model_with(loop_center_idx=1, max_loops=6, automatic_loop_exit=True, automatic_loop_exit_threshold=0.0)
    low(idx, idx)
    assert torch.equal(low.last_loop_iterations[0], torch.full((4,), 6))
    # Exit at t=2 means the output is s2: equal to a fixed 2-iteration run.
    two = model_with(loop_center_idx=1, max_loops=2)
    two.load_state_dict(high.state_dict())
    torch.testing.assert_close(high(idx, idx)[0], two(idx, idx)[0], atol=0, rtol=0)


def _threshold_splitting_batch(model, idx):
    model(idx, idx, loop_exit=False)
    deltas = model.last_loop_trace.units[0].deltas[1:]  # t >= 2
    # A threshold between sequences' deltas at t = 2, so some exit early and others late.
    d2 = deltas[0].sort().values
    return float((d2[1] + d2[2]) / 2)


def test_exit_is_per_sequence_and_independent_of_the_batch():
    model = model_with(seed=3, loop_center_idx=1, max_loops=8, loops_representation=True, automatic_loop_exit=True, loop_input_injection="add")
    idx = tokens(batch=4, seed=11)
    threshold = _threshold_splitting_batch(model, idx)
    batched, _ = model(idx, idx, exit_threshold=threshold)
    used = model.last_loop_iterations[0]
    assert len(set(used.tolist())) > 1, "the test needs sequences exiting at different iterations"
    trace = model.last_loop_trace.units[0]
    for b in range(4):
        alone, _ = model(idx[b : b + 1], idx[b : b + 1], exit_threshold=threshold)
        assert model.last_loop_iterations[0].item() == used[b].item()
        torch.testing.assert_close(alone[0], batched[b], atol=1e-5, rtol=1e-5)
        # Frozen after exit: later states equal the exit state, later deltas are NaN.
        e = int(used[b])
        assert torch.equal(trace.states[-1][b], trace.states[e][b])
        assert torch.isnan(trace.deltas[e:, b]).all()
        assert not torch.isnan(trace.deltas[:e, b]).any()


def test_exit_rule_matches_definition():
    model = model_with(seed=3, loop_center_idx=1, max_loops=8, loops_representation=True, automatic_loop_exit=True)
    idx = tokens(batch=4, seed=11)
    threshold = _threshold_splitting_batch(model, idx)
    full = model.last_loop_trace.units[0].deltas
    model(idx, idx, exit_threshold=threshold)
    for b in range(4):
        below = [t for t in range(2, 9) if full[t - 1, b] < threshold]
        expected = below[0] if below else 8
        assert model.last_loop_iterations[0][b].item() == expected


def test_exit_is_off_in_training_unless_asked():
    idx = tokens()
    model = model_with(loop_center_idx=1, max_loops=5, automatic_loop_exit=True, automatic_loop_exit_threshold=1e9)
    model.train()
    model(idx, idx)
    assert torch.equal(model.last_loop_iterations[0], torch.full((3,), 5))
    model = model_with(loop_center_idx=1, max_loops=5, automatic_loop_exit=True, automatic_loop_exit_threshold=1e9, automatic_loop_exit_in_training=True)
    model.train()
    model(idx, idx)
    assert torch.equal(model.last_loop_iterations[0], torch.full((3,), 2))


@pytest.mark.parametrize("depth", [1, 2])
def test_backprop_depth_limits_gradients_to_last_iterations(depth):
    loops = 4
    model = model_with(loop_center_idx=1, max_loops=loops, loop_backprop_depth=depth, loop_input_injection="add")
    model.train()
    idx = tokens()
    _, loss = model(idx, idx)
    loss.backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    # Hand-written: the first loops - depth iterations detached.
    ref = copy.deepcopy(model)
    ref.zero_grad()
    blocks = ref.transformer.h
    x = ref.transformer.drop(ref.transformer.wte(idx) + ref.transformer.wpe(torch.arange(12)))
    x0 = blocks[0](x)
    s = x0
    for t in range(1, loops + 1):
        u = s if t == 1 else s + x0
        if t <= loops - depth:
            with torch.no_grad():
                s = blocks[1](u)
        else:
            s = blocks[1](u)
    for i in (2, 3):
        s = blocks[i](s)
    logits = ref.lm_head(ref.transformer.ln_f(s))
    reference.cross_entropy(logits, idx).backward()
    for n, p in ref.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(got[n], p.grad, atol=1e-6, rtol=1e-4)
    # And it really truncates: full backprop gives different looped-block gradients.
    full = model_with(loop_center_idx=1, max_loops=loops, loop_input_injection="add")
    full.load_state_dict(model.state_dict())
    full.train()
    full(idx, idx)[1].backward()
    w = "transformer.h.1.mlp.c_fc.weight"
    assert not torch.allclose(dict(full.named_parameters())[w].grad, got[w])


def test_truncated_backprop_with_no_injection_cuts_gradient_to_earlier_blocks():
    model = model_with(loop_center_idx=1, max_loops=3, loop_backprop_depth=1)
    model.train()
    idx = tokens()
    model(idx, idx)[1].backward()
    assert model.transformer.h[0].mlp.c_fc.weight.grad is None
    assert model.transformer.h[1].mlp.c_fc.weight.grad.abs().sum() > 0


def test_activation_checkpointing_gives_same_gradients():
    a = model_with(loop_center_idx=1, loop_radius=1, max_loops=3, loop_input_injection="concat")
    b = model_with(loop_center_idx=1, loop_radius=1, max_loops=3, loop_input_injection="concat", loop_checkpointing=True)
    b.load_state_dict(a.state_dict())
    a.train(), b.train()
    idx = tokens()
    a(idx, idx)[1].backward()
    b(idx, idx)[1].backward()
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=1e-5, msg=n)


def test_num_loops_override_and_accounting():
    looped = model_with(loop_center_idx=1, loop_radius=0, max_loops=3)
    assert looped.effective_depth() == 6
    assert looped.effective_depth(5) == 8
    idx = tokens()
    five = model_with(loop_center_idx=1, max_loops=5)
    five.load_state_dict(looped.state_dict())
    torch.testing.assert_close(looped(idx, idx, num_loops=5)[0], five(idx, idx)[0], atol=0, rtol=0)
    # A block looped to depth D costs what a plain model of D blocks costs.
    two_looped = model_with(n_layer=2, loop_center_idx=1, max_loops=3)
    plain4 = model_with(n_layer=4)
    assert two_looped.flops_per_token() == pytest.approx(plain4.flops_per_token())
    assert two_looped.get_num_params() < plain4.get_num_params()
    # Truncated backprop removes the backward of the no-grad iterations; without injection
    # also that of the blocks before the loop, which no gradient reaches any more.
    plain2 = model_with(n_layer=2)
    block_fwd = (plain4.flops_per_token(training=False) - plain2.flops_per_token(training=False)) / 2
    truncated_add = model_with(n_layer=2, loop_center_idx=1, max_loops=3, loop_backprop_depth=1, loop_input_injection="add")
    assert truncated_add.flops_per_token() == pytest.approx(plain4.flops_per_token() - 2 * 2 * block_fwd)
    truncated_none = model_with(n_layer=2, loop_center_idx=1, max_loops=3, loop_backprop_depth=1)
    assert truncated_none.flops_per_token() == pytest.approx(plain4.flops_per_token() - 3 * 2 * block_fwd)


def test_loop_sampling_means_and_determinism():
    for mode in ("poisson_lognormal", "uniform"):
        cfg = config(loop_center_idx=1, max_loops=4, loop_sampling=mode)
        g = torch.Generator().manual_seed(0)
        draws = [sample_num_loops(cfg, g) for _ in range(4000)]
        assert min(draws) >= 1
        assert abs(sum(draws) / len(draws) - 4) < 0.15
        assert len(set(draws)) > 3
        g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
        assert [sample_num_loops(cfg, g1) for _ in range(20)] == [sample_num_loops(cfg, g2) for _ in range(20)]
    assert sample_num_loops(config(loop_center_idx=1, max_loops=4), torch.Generator()) == 4


def test_plan_units():
    group = (LoopGroup(1, 3, 2),)
    assert LoopPlan(group, True).units == [(1, 2, 3)]
    assert LoopPlan(group, False).units == [(1,), (2,), (3,)]
    two = (LoopGroup(1, 2, 2), LoopGroup(4, 4, 3))
    assert LoopPlan(two, True).units == [(1, 2), (4,)]
    assert LoopPlan(two, False).unit_groups == [0, 0, 1]


def test_relative_change_definition():
    old = torch.tensor([[[3.0, 4.0], [1.0, 0.0]]])
    new = torch.tensor([[[3.0, 4.0], [1.0, 1.0]]])
    assert relative_change(new, old).item() == pytest.approx((0 + 1 / (1 + 1e-6)) / 2)


@pytest.mark.parametrize(
    "kw,key",
    [
        (dict(loop_center_idx=4), "loop_center_idx"),
        (dict(loop_center_idx=0, loop_radius=1), "loop_radius"),
        (dict(loop_center_idx=3, loop_radius=1), "loop_radius"),
        (dict(loop_center_idx=-2), "loop_center_idx"),
        (dict(loop_radius=-1), "loop_radius"),
        (dict(max_loops=0), "max_loops"),
        (dict(loop_noise_scale=-0.1), "loop_noise_scale"),
        (dict(automatic_loop_exit_threshold=-1.0), "automatic_loop_exit_threshold"),
        (dict(loop_input_injection="mul"), "loop_input_injection"),
        (dict(concatenate_initial_representation=True, loop_input_injection="add"), "concatenate_initial_representation"),
        (dict(loop_sampling="normal"), "loop_sampling"),
        (dict(loop_backprop_depth=-1), "loop_backprop_depth"),
        (dict(loop_backprop_depth=2, automatic_loop_exit_in_training=True), "loop_backprop_depth"),
        (dict(max_loops=2.5), "max_loops"),
        (dict(tied_looping="yes"), "tied_looping"),
    ],
)
def test_invalid_loop_config_raises_naming_the_key(kw, key):
    with pytest.raises(ValueError, match=key):
        config(**kw)


def test_radius_ignored_when_looping_off():
    assert GPT(config(loop_center_idx=-1, loop_radius=7)).loop_plan is None


def test_nonfinite_onset_names_the_iteration_where_the_state_diverged():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=11, n_layer=3, n_head=2, n_embd=16,
                          loop_center_idx=1, max_loops=3, loop_input_injection="concat")).eval()
    with torch.no_grad():
        for adapter in model.looper.adapters:
            adapter.proj.weight.fill_(0.5)  # the state grows geometrically
        x = torch.randint(0, 11, (2, 8))
        model(x, num_loops=3)
        assert model.looper.nonfinite_onset() is None
        logits, _ = model(x, num_loops=256)
    assert not torch.isfinite(logits).all()
    unit, t = model.looper.nonfinite_onset()
    # An independent check: run the loop by hand and find the first non-finite state.
    model.config.loops_representation = True
    with torch.no_grad():
        model(x, num_loops=256)
    states = model.last_loop_trace.units[0].states
    first = next(i for i in range(1, 257) if not torch.isfinite(states[i]).all())
    assert (unit, t) == (0, first)
