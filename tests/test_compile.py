"""torch.compile over looped models: no graph break in a fixed loop, same numbers as eager."""

import pytest
import torch
import torch._dynamo

from blockloop.model import GPT, GPTConfig


def tiny(**kw):
    torch.manual_seed(0)
    base = dict(block_size=16, vocab_size=29, n_layer=3, n_head=2, n_embd=16, dropout=0.0)
    return GPT(GPTConfig(**{**base, **kw}))


def tokens():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 29, (2, 16), generator=g)


@pytest.mark.parametrize(
    "kw",
    [
        dict(),
        dict(loop_center_idx=1, max_loops=3),
        dict(loop_center_idx=1, loop_radius=1, max_loops=2, tied_looping=False, loop_input_injection="concat"),
        dict(loop_center_idx=1, max_loops=4, loop_input_injection="add", loop_backprop_depth=2),
        {"loop_center_idx": 1, "max_loops": 2, "position_embedding": "rope"},
        # Dropout on CPU: compiled code takes torch's dropout, not the eager integer mask.
        dict(loop_center_idx=1, max_loops=2, dropout=0.2),
    ],
)
def test_fixed_loops_compile_without_graph_breaks(kw):
    model = tiny(**kw).train()
    idx = tokens()
    explanation = torch._dynamo.explain(model)(idx, idx)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_compiled_training_step_matches_eager():
    eager = tiny(loop_center_idx=1, max_loops=3, loop_input_injection="add").train()
    compiled_source = tiny(loop_center_idx=1, max_loops=3, loop_input_injection="add").train()
    compiled_source.load_state_dict(eager.state_dict())
    compiled = torch.compile(compiled_source)
    idx = tokens()
    loss_e = eager(idx, idx)[1]
    loss_c = compiled(idx, idx)[1]
    torch.testing.assert_close(loss_c, loss_e, atol=1e-5, rtol=1e-5)
    loss_e.backward()
    loss_c.backward()
    for (name, p), q in zip(eager.named_parameters(), compiled_source.parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("num_loops", [2, 5])
def test_compile_with_automatic_exit_and_sampled_counts_matches_eager(num_loops):
    model = tiny(loop_center_idx=1, max_loops=6, automatic_loop_exit=True, automatic_loop_exit_threshold=0.2).eval()
    compiled = torch.compile(model, backend="aot_eager")
    idx = tokens()
    with torch.no_grad():
        want = model(idx, idx, num_loops=num_loops)[0]
        want_iters = model.last_loop_iterations[0].clone()
        got = compiled(idx, idx, num_loops=num_loops)[0]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert torch.equal(model.last_loop_iterations[0], want_iters)
