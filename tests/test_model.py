"""The plain GPT: nanoGPT's architecture, names, loss at init, overfitting, accounting."""

import math

import pytest
import torch

from blockloop.model import GPT, GPTConfig
from tests import reference


def tiny_config(**kw):
    base = dict(block_size=16, vocab_size=37, n_layer=3, n_head=2, n_embd=24, dropout=0.0, bias=True)
    base.update(kw)
    return GPTConfig(**base)


def test_parameter_names_match_nanogpt():
    model = GPT(tiny_config(n_layer=2))
    names = set(model.state_dict())
    expected = {"transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.weight",
                "transformer.ln_f.bias", "lm_head.weight"}
    for i in range(2):
        for sub in ("ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias",
                    "attn.c_proj.weight", "attn.c_proj.bias", "ln_2.weight", "ln_2.bias",
                    "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight", "mlp.c_proj.bias"):
            expected.add(f"transformer.h.{i}.{sub}")
    assert names == expected
    assert model.lm_head.weight is model.transformer.wte.weight


@pytest.mark.parametrize("bias", [True, False])
def test_logits_match_independent_float64_reference(bias):
    torch.manual_seed(0)
    cfg = tiny_config(bias=bias)
    model = GPT(cfg).eval()
    idx = torch.randint(0, cfg.vocab_size, (3, 16))
    logits, _ = model(idx, idx)
    ref = reference.forward(idx, model.state_dict(), cfg.n_head, range(cfg.n_layer))
    torch.testing.assert_close(logits.double(), ref, atol=1e-5, rtol=1e-4)


def test_no_targets_gives_last_position_only():
    torch.manual_seed(0)
    model = GPT(tiny_config()).eval()
    idx = torch.randint(0, 37, (2, 10))
    full, _ = model(idx, idx)
    last, loss = model(idx)
    assert loss is None and last.shape == (2, 1, 37)
    torch.testing.assert_close(last[:, 0], full[:, -1])


def test_loss_at_init_is_close_to_log_vocab():
    torch.manual_seed(0)
    cfg = tiny_config(vocab_size=211)
    model = GPT(cfg)
    idx = torch.randint(0, cfg.vocab_size, (8, 16))
    targets = torch.randint(0, cfg.vocab_size, (8, 16))
    _, loss = model(idx, targets)
    assert abs(loss.item() - math.log(cfg.vocab_size)) < 0.1


def test_tiny_model_overfits_a_tiny_batch():
    torch.manual_seed(0)
    model = GPT(tiny_config())
    idx = torch.randint(0, 37, (4, 16))
    x, y = idx[:, :-1], idx[:, 1:]
    opt = model.configure_optimizers(0.0, 3e-3, (0.9, 0.95), "cpu")
    for _ in range(150):
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1


def test_sequence_longer_than_block_size_is_refused():
    model = GPT(tiny_config())
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_num_params_and_flops_follow_nanogpt_convention():
    cfg = tiny_config(bias=False)
    model = GPT(cfg)
    C, L, V, T = cfg.n_embd, cfg.n_layer, cfg.vocab_size, cfg.block_size
    per_block = 12 * C * C + 2 * C  # attention 4C^2, MLP 8C^2, two LayerNorm weights
    assert model.get_num_params() == L * per_block + V * C + C
    # nanoGPT: 6N + 12 L C T per token for training (forward + backward).
    assert model.flops_per_token() == pytest.approx(6 * model.get_num_params() + 12 * L * C * T)


def test_weight_decay_groups():
    model = GPT(tiny_config())
    opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu")
    decayed, plain = opt.param_groups
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decayed["params"])
    assert all(p.dim() < 2 for p in plain["params"])
    total = sum(p.numel() for g in opt.param_groups for p in g["params"])
    assert total == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    "kw,key",
    [
        (dict(n_embd=25, n_head=2), "n_embd"),
        (dict(n_layer=0), "n_layer"),
        (dict(dropout=1.5), "dropout"),
        (dict(n_layer="4"), "n_layer"),
        (dict(bias=1), "bias"),
    ],
)
def test_invalid_architecture_raises_naming_the_key(kw, key):
    with pytest.raises(ValueError, match=key):
        tiny_config(**kw)


def test_sample_next_token_options_mean_the_same_as_the_command_line():
    from blockloop.model import sample_next_token

    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]])
    gen = torch.Generator().manual_seed(0)
    # top_k=0 is "no top-k", as on the command line, not an IndexError.
    draws = {int(sample_next_token(logits, 5.0, 0, gen)) for _ in range(200)}
    assert draws == {0, 1, 2, 3}
    assert {int(sample_next_token(logits, 5.0, 1, gen)) for _ in range(20)} == {1}
    for bad in (float("nan"), -0.5, float("inf")):
        with pytest.raises(ValueError, match="temperature"):
            sample_next_token(logits, bad)
    with pytest.raises(ValueError, match="top_k"):
        sample_next_token(logits, 1.0, -1)


def test_padded_vocabulary_ids_are_never_sampled():
    from blockloop.model import sample_next_token

    # The padding ids (2, 3) carry the largest logits: without the limit they would win.
    logits = torch.tensor([[0.0, 0.5, 9.0, 9.0]]).repeat(64, 1)
    gen = torch.Generator().manual_seed(0)
    assert int(sample_next_token(logits[:1], 0.0, None, gen, vocab_limit=2)) == 1
    drawn = sample_next_token(logits, 1.0, None, gen, vocab_limit=2)
    assert drawn.max().item() <= 1
    assert sample_next_token(logits, 1.0, 3, gen, vocab_limit=2).max().item() <= 1


def test_non_finite_logits_raise_instead_of_greedy_nan():
    from blockloop.model import sample_next_token

    logits = torch.tensor([[0.0, float("nan"), 1.0]])
    for temperature in (0.0, 1.0):
        with pytest.raises(FloatingPointError, match="not finite"):
            sample_next_token(logits, temperature)
    # Non-finite values among masked padding ids do not matter.
    assert int(sample_next_token(torch.tensor([[0.0, 1.0, float("nan")]]), 0.0, vocab_limit=2)) == 1
