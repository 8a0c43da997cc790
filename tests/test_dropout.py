"""blockloop.dropout: the fast CPU dropout mask and block-causal attention with dropout,
checked against a dense float64 computation with the same masks and against torch's own ops."""

import math

import pytest
import torch
import torch.nn.functional as F

import blockloop.dropout as dropout_module
from blockloop.dropout import Dropout, causal_attention, dropout


def test_dropout_keeps_one_minus_p_and_scales_the_kept_elements():
    torch.manual_seed(0)
    n, p = 1_000_000, 0.2
    y = dropout(torch.ones(n), p, True)
    kept = (y != 0).double().mean().item()
    # Binomial sd of the kept fraction is sqrt(p (1 - p) / n) = 4e-4; allow 5 sd.
    assert abs(kept - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n)
    assert torch.equal(y[y != 0], torch.full_like(y[y != 0], 1 / (1 - p)))


def test_dropout_is_the_identity_in_eval_and_at_p_zero():
    x = torch.randn(5, 7)
    assert dropout(x, 0.3, False) is x
    assert dropout(x, 0.0, True) is x
    module = Dropout(0.3).eval()
    assert module(x) is x


def test_dropout_gradient_is_the_mask_times_the_scale():
    torch.manual_seed(1)
    x = (torch.rand(64, 33) + 0.5).requires_grad_()  # no zeros: y != 0 is the mask
    y = dropout(x, 0.25, True)
    g = torch.randn_like(y)
    y.backward(g)
    torch.testing.assert_close(x.grad, g * (y != 0) / 0.75)
    assert torch.equal(x.grad == 0, y == 0)


def test_dropout_masks_repeat_under_the_same_seed():
    x = torch.randn(1000)
    torch.manual_seed(7)
    a = dropout(x, 0.5, True)
    torch.manual_seed(7)
    b = dropout(x, 0.5, True)
    assert torch.equal(a, b)
    assert not torch.equal(a, dropout(x, 0.5, True))


def test_dropout_away_from_cpu_is_torchs_own(monkeypatch):
    def no_cpu_mask(*args):
        raise AssertionError("the CPU mask was drawn for a non-CPU tensor")

    monkeypatch.setattr(dropout_module, "_keep_mask", no_cpu_mask)
    x = torch.empty(4, 8, 16, 16, device="meta")
    assert dropout(x, 0.5, True).shape == x.shape
    assert causal_attention(x, x, x, 0.5).shape == x.shape


def _recorded_masks(monkeypatch):
    masks = []
    draw = dropout_module._keep_mask

    def record(shape, p):
        masks.append(draw(shape, p))
        return masks[-1]

    monkeypatch.setattr(dropout_module, "_keep_mask", record)
    return masks


@pytest.mark.parametrize("T", [1, 37, 64, 150])
def test_block_causal_attention_matches_dense_float64_attention_with_the_same_masks(
        monkeypatch, T):
    torch.manual_seed(T)
    B, H, d, p = 2, 3, 16, 0.3
    q, k, v = (torch.randn(B, H, T, d, requires_grad=True) for _ in range(3))
    masks = _recorded_masks(monkeypatch)
    y = causal_attention(q, k, v, p)
    g = torch.randn_like(y)
    y.backward(g)

    # The blocks' masks placed in a dense (T, T) keep mask; above the diagonal is irrelevant.
    keep = torch.zeros(B * H, T, T, dtype=torch.bool)
    starts = range(0, T, dropout_module.QUERY_BLOCK)
    assert len(masks) == len(starts)
    for start, mask in zip(starts, masks):
        keep[:, start:start + mask.shape[1], :mask.shape[2]] = mask
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    scores = (q64 @ k64.transpose(-2, -1)) / math.sqrt(d)
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    reference = (scores.softmax(-1) * keep.view(B, H, T, T) / (1 - p)) @ v64
    reference.backward(g.double())

    torch.testing.assert_close(y.double(), reference.detach(), rtol=1e-5, atol=1e-5)
    for ours, ref in ((q, q64), (k, k64), (v, v64)):
        torch.testing.assert_close(ours.grad.double(), ref.grad, rtol=1e-5, atol=1e-5)


def test_attention_without_dropout_is_scaled_dot_product_attention():
    torch.manual_seed(3)
    q, k, v = (torch.randn(2, 4, 50, 8) for _ in range(3))
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert torch.equal(causal_attention(q, k, v, 0.0), expected)


def test_attention_with_dropout_is_unbiased():
    """Averaged over many draws, attention with dropout approaches attention without it."""
    torch.manual_seed(4)
    q, k, v = (torch.randn(1, 1, 70, 4) for _ in range(3))
    draws = torch.stack([causal_attention(q, k, v, 0.3) for _ in range(2000)])
    exact = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    standard_error = draws.std(dim=0) / math.sqrt(len(draws))
    z = (draws.mean(dim=0) - exact).abs() / standard_error.clamp_min(1e-6)
    # 280 outputs: a mean beyond 5 standard errors by chance is far below one in a million.
    assert z.max() < 5


def test_attention_refuses_double_backward():
    q, k, v = (torch.randn(1, 1, 8, 4, requires_grad=True) for _ in range(3))
    (dq,) = torch.autograd.grad(causal_attention(q, k, v, 0.2).sum(), q, create_graph=True)
    with pytest.raises(RuntimeError):
        dq.sum().backward()


def test_attention_under_cpu_bf16_autocast_with_backward_outside(monkeypatch):
    """float32 inputs, bf16 autocast around the forward only (as a training step has it): the
    result is within bf16 rounding of the float64 attention with the same masks."""
    torch.manual_seed(5)
    T, d, p = 70, 8, 0.2
    q, k, v = (torch.randn(1, 2, T, d, requires_grad=True) for _ in range(3))
    masks = _recorded_masks(monkeypatch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = causal_attention(q, k, v, p)
    y.float().sum().backward()
    keep = torch.zeros(2, T, T, dtype=torch.bool)
    for start, mask in zip(range(0, T, dropout_module.QUERY_BLOCK), masks):
        keep[:, start:start + mask.shape[1], :mask.shape[2]] = mask
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    scores = (q64 @ k64.transpose(-2, -1) / math.sqrt(d)).masked_fill(
        torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    reference = (scores.softmax(-1) * keep.view(1, 2, T, T) / (1 - p)) @ v64
    reference.sum().backward()
    # bf16 keeps 8 significant bits: relative rounding of about 0.4% per operation.
    torch.testing.assert_close(y.double(), reference.detach(), rtol=0.05, atol=0.05)
    for ours, ref in ((q, q64), (k, k64), (v, v64)):
        torch.testing.assert_close(ours.grad.double(), ref.grad, rtol=0.05, atol=0.05)


def test_loop_checkpointing_with_dropout_recomputes_the_same_masks():
    """`loop_checkpointing` recomputes each iteration in the backward pass; with dropout the
    recomputation must draw the forward's masks again (checkpoint restores the generator),
    or the gradients would belong to other masks than the loss."""
    from blockloop.model import GPT, GPTConfig

    def looped(checkpointing):
        torch.manual_seed(0)
        return GPT(GPTConfig(block_size=16, vocab_size=23, n_layer=3, n_head=2, n_embd=16,
                             dropout=0.2, loop_center_idx=1, max_loops=3,
                             loop_input_injection="add", loop_checkpointing=checkpointing))

    plain, checkpointed = looped(False), looped(True)
    idx = torch.randint(0, 23, (2, 16), generator=torch.Generator().manual_seed(3))
    losses = []
    for model in (plain, checkpointed):
        model.train()
        torch.manual_seed(7)
        loss = model(idx, idx)[1]
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[0], losses[1], atol=0, rtol=0)
    for (name, a), (_, b) in zip(plain.named_parameters(), checkpointed.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-5, msg=name)
