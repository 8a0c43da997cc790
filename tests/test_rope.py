"""Rotary position embeddings (`position_embedding="rope"`) and the rolling generation cache.

The rotation is checked against a float64 reference written from its definition. The rolling
cache is checked against what it is meant to compute: a full forward pass over the whole
sequence in which every token attends to the last `block_size` tokens (a banded causal mask),
in float64, over more than 2 x block_size new tokens, for a plain model, tied and untied loops,
two loop groups, and causal per-token exit. It is also checked against what it is *not*:
recomputing the window (`model(idx[:, -block_size:])`) agrees with it for a one-block model only.
"""

import math

import pytest
import torch

from blockloop.checkpoint import build_model
from blockloop.config import parse_train_args
from blockloop.errors import ConfigError
from blockloop.model import GPT, GPTConfig
from blockloop.pretrained import from_nanogpt_checkpoint
from blockloop.sampling import LoopKVCache, generate, teacher_forced_logits
from blockloop.train import pretrained_model
from tests import reference

VOCAB = 19
BLOCK = 8
BASE = {"block_size": BLOCK, "vocab_size": VOCAB, "n_layer": 4, "n_head": 2, "n_embd": 16,
        "dropout": 0.0, "position_embedding": "rope"}

ROLLING = {
    "plain": {},
    "tied": {"loop_center_idx": 1, "loop_radius": 1, "max_loops": 3, "loop_input_injection": "add"},
    "untied": {"loop_center_idx": 2, "loop_radius": 1, "max_loops": 3, "tied_looping": False,
               "loop_input_injection": "concat"},
    "groups": {"loop_groups": [[0, 1], [3, 3]], "loop_counts": [2, 3],
               "loop_input_injection": "add", "loop_state_norm": "layernorm"},
}


def make(seed=0, dtype=torch.float64, **kw):
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**{**BASE, **kw})).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("looper."):  # fresh adapters pass through; make them count
                p.add_(0.2 * torch.randn_like(p))
            if name.endswith("c_attn.weight"):  # at init attention is near uniform
                p.mul_(8.0)
    return model.to(dtype)


def tokens(batch, length, seed=1):
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


class Banded:
    """`kv_caches` for an uncached forward pass over a whole sequence in which each token
    attends to the last `window` tokens, itself included (sliding-window attention)."""

    past_length = 0

    def __init__(self, window):
        self.window = window

    def get(self, block_idx, iteration):
        return self

    def rows(self, rows):
        return self

    def advance(self, t):
        pass

    def extend(self, k, v):
        i = torch.arange(k.shape[2])
        mask = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - self.window)
        return k, v, mask


def banded_logits(model, idx, twin=None, **kw):
    """Logits at every position of idx (B, L), L > block_size, with a window of block_size:
    the same weights in a model `twin` whose block_size is L (RoPE has no position
    parameters)."""
    if twin is None:
        twin = long_twin(model, idx.shape[1])
    with torch.no_grad():
        logits, _ = twin(idx, torch.zeros_like(idx), kv_caches=Banded(model.config.block_size),
                         **kw)
    return logits


def long_twin(model, length):
    cfg = {**model.config.to_dict(), "block_size": length}
    twin = GPT(GPTConfig(**cfg)).to(next(model.parameters()).dtype).eval()
    twin.load_state_dict(model.state_dict())
    return twin


def recomputed_window_logits(model, idx, first):
    """nanoGPT's reference: row n - first predicts idx[:, n] from model(idx[:, n-block:n])."""
    rows = []
    with torch.no_grad():
        for n in range(first, idx.shape[1]):
            logits, _ = model(idx[:, max(0, n - model.config.block_size):n])
            rows.append(logits[:, -1])
    return torch.stack(rows, dim=1)


# ---- the rotation ------------------------------------------------------------------------------


def rope_reference(idx, model):
    """Float64 forward of a plain RoPE model from the definition: pair (i, i + d/2) of a head
    at position p rotated by p * base ** (-2i / d)."""
    cfg = model.config
    sd = {k: v.detach().double() for k, v in model.state_dict().items()}
    B, T = idx.shape
    C, H = cfg.n_embd, cfg.n_head
    d = C // H
    theta = cfg.rope_base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = torch.arange(T, dtype=torch.float64)[:, None] * theta[None, :]

    def rot(z):
        a, b = z[..., : d // 2], z[..., d // 2:]
        return torch.cat([a * ang.cos() - b * ang.sin(), a * ang.sin() + b * ang.cos()], -1)

    x = sd["transformer.wte.weight"][idx]
    for i in range(cfg.n_layer):
        p = f"transformer.h.{i}."
        h = reference.layer_norm(x, sd, p + "ln_1")
        q, k, v = reference.linear(h, sd, p + "attn.c_attn").split(C, dim=2)
        q, k, v = (z.view(B, T, H, d).transpose(1, 2) for z in (q, k, v))
        att = (rot(q) @ rot(k).transpose(-2, -1)) / math.sqrt(d)
        att = att.masked_fill(~torch.tril(torch.ones(T, T, dtype=torch.bool)), float("-inf"))
        y = (att.softmax(-1) @ v).transpose(1, 2).reshape(B, T, C)
        x = x + reference.linear(y, sd, p + "attn.c_proj")
        h = reference.linear(reference.layer_norm(x, sd, p + "ln_2"), sd, p + "mlp.c_fc")
        h = 0.5 * h * (1.0 + torch.erf(h / math.sqrt(2.0)))
        x = x + reference.linear(h, sd, p + "mlp.c_proj")
    return reference.head(x, sd)


@pytest.mark.parametrize("base", [10000.0, 37.0])
def test_rope_forward_equals_the_float64_definition(base):
    model = make(dtype=torch.float32, rope_base=base)
    idx = tokens(2, BLOCK)
    got, _ = model(idx, idx)
    torch.testing.assert_close(got.double(), rope_reference(idx, model), atol=1e-5, rtol=1e-5)
    # The base matters, and positions matter (a learned-free model is not a bag of tokens).
    other = make(dtype=torch.float32, rope_base=base * 3)
    other.load_state_dict(model.state_dict())
    assert not torch.allclose(other(idx, idx)[0], got, atol=1e-4)
    swapped = idx[:, [1, 0, *range(2, BLOCK)]]
    assert not torch.allclose(model(swapped, swapped)[0][:, -1], got[:, -1], atol=1e-4)


def test_rope_has_no_position_parameters_and_learned_keeps_nanogpt_names():
    rope, learned = make(), GPT(GPTConfig(**{**BASE, "position_embedding": "learned"}))
    assert "transformer.wpe.weight" not in rope.state_dict()
    assert "transformer.wpe.weight" in learned.state_dict()
    assert set(learned.state_dict()) - set(rope.state_dict()) == {"transformer.wpe.weight"}
    assert rope.get_num_params() == rope.get_num_params(non_embedding=False)
    assert GPTConfig().position_embedding == "learned"
    # The same seed gives a learned model the same weights with or without the new keys.
    torch.manual_seed(3)
    a = GPT(GPTConfig(**{**BASE, "position_embedding": "learned"}))
    torch.manual_seed(3)
    b = GPT(GPTConfig(**{k: v for k, v in BASE.items() if k != "position_embedding"}))
    assert all(torch.equal(a.state_dict()[k], v) for k, v in b.state_dict().items())


@pytest.mark.parametrize("kw,words", [
    ({"position_embedding": "alibi"}, "position_embedding"),
    ({"position_embedding": "rope", "n_embd": 18, "n_head": 2}, "even"),
    ({"position_embedding": "rope", "rope_base": 1.0}, "rope_base"),
    ({"position_embedding": "rope", "rope_base": float("inf")}, "rope_base"),
    ({"position_embedding": "learned", "rope_base": 500.0}, "only used with"),
])
def test_position_keys_are_validated(kw, words):
    with pytest.raises(ValueError, match=words):
        GPTConfig(**{**BASE, **kw})


def test_rope_runs_under_cpu_bfloat16_autocast_and_backward():
    model = make(dtype=torch.float32, **ROLLING["tied"]).train()
    idx = tokens(2, BLOCK)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, loss = model(idx, idx)
    loss.backward()
    loss = loss.detach()
    assert math.isfinite(loss.item())


# ---- the rolling cache -------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ROLLING)
def test_rolling_cache_equals_banded_attention_past_block_size(variant):
    model = make(**ROLLING[variant])
    prompt, length = 3, 3 * BLOCK + 4  # more than 2 x block_size new tokens
    idx = tokens(2, length)
    got, stats = teacher_forced_logits(model, idx, prompt_length=prompt)
    want = banded_logits(model, idx)
    torch.testing.assert_close(got, want[:, prompt - 1:-1], atol=1e-10, rtol=1e-10)
    # One prefill, then single cached tokens only; every buffer holds block_size positions.
    assert stats["full_forwards"] == 1 and stats["cached_steps"] == length - prompt - 1
    # Not the recomputed window: the cached keys of deeper blocks saw tokens now out of it.
    recomputed = recomputed_window_logits(model, idx, prompt)
    late = slice(BLOCK + 1 - prompt, None)
    assert not torch.allclose(got[:, late], recomputed[:, late], atol=1e-6)
    torch.testing.assert_close(got[:, :late.start], recomputed[:, :late.start], atol=1e-10,
                               rtol=1e-10)


def test_rolling_cache_in_float32_and_its_memory_stays_bounded():
    model = make(dtype=torch.float32, **ROLLING["tied"])
    idx = tokens(2, 4 * BLOCK)
    decoded, _ = teacher_forced_logits(model, idx, prompt_length=2)
    torch.testing.assert_close(decoded, banded_logits(model, idx)[:, 1:-1], atol=2e-5, rtol=2e-5)
    cache = LoopKVCache(model, batch_size=2, rolling=True)
    with torch.no_grad():
        model(idx[:, :2], kv_caches=cache)
        for n in range(2, 4 * BLOCK):
            model(idx[:, n:n + 1], kv_caches=cache)
    assert cache.past_length == 4 * BLOCK
    assert {layer.k.shape[2] for layer in cache.layers.values()} == {BLOCK}
    with pytest.raises(ValueError, match="one new token"):
        model(idx[:, :2], kv_caches=cache)


def token_exit_model(idx):
    """Two groups with causal per-token exit; the threshold sits in the widest gap of the
    middle half of the iteration-2 relative changes, so tokens exit at different iterations and
    none sits where rounding could decide."""
    model = make(seed=4, **{**ROLLING["groups"], "loop_counts": [4, 5]}, automatic_loop_exit=True,
                 automatic_loop_exit_granularity="token", loops_representation=True)
    with torch.no_grad():
        model(idx[:, :BLOCK], loop_exit=False)
    deltas = []
    for unit in model.last_loop_trace.units:
        s1, s2 = unit.states[1], unit.states[2]
        deltas.append(((s2 - s1).norm(dim=-1) / (s1.norm(dim=-1) + 1e-6)).flatten())
    v = torch.cat(deltas).sort().values
    lo, hi = len(v) // 4, 3 * len(v) // 4
    k = lo + int(torch.argmax(v[lo + 1:hi] - v[lo:hi - 1]))
    model.config.automatic_loop_exit_threshold = float((v[k] + v[k + 1]) / 2)
    return model


def test_rolling_cache_with_token_exit_equals_banded_attention_with_token_exit():
    idx = tokens(2, 3 * BLOCK + 3, seed=5)
    model = token_exit_model(idx)
    got, stats = teacher_forced_logits(model, idx, prompt_length=1, adaptive_exit=True)
    twin = long_twin(model, idx.shape[1])
    want = banded_logits(model, idx, twin, loop_exit=True)
    its = twin.last_loop_iterations  # (B, L) per looped unit
    assert any(len(it.unique()) > 1 for it in its), "tokens must exit at different iterations"
    assert stats["full_forwards"] == 1
    torch.testing.assert_close(got, want[:, :-1], atol=1e-10, rtol=1e-10)


def test_rolling_cache_with_per_sequence_adaptive_exit_keeps_rows_independent():
    """Rows that stop at different iterations write their ring slots through the row view and
    are filled in by `advance`: each row decodes as it would alone."""
    model = make(seed=2, **{**ROLLING["tied"], "max_loops": 5})
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("c_proj.weight"):
                p.mul_(8.0)
    idx = tokens(3, 3 * BLOCK, seed=3)
    batched, stats = teacher_forced_logits(model, idx, 2, adaptive_exit=True, exit_threshold=0.5)
    assert 2 < stats["mean_iterations"] < 5 and stats["full_forwards"] == 1
    for b in range(3):
        alone, _ = teacher_forced_logits(model, idx[b:b + 1], 2, adaptive_exit=True,
                                         exit_threshold=0.5)
        torch.testing.assert_close(alone[0], batched[b], atol=1e-10, rtol=1e-10)


def test_one_block_model_rolls_to_exactly_the_recomputed_window():
    """Keys of the first block's first iteration depend on their token and position only, and
    RoPE scores on distances only: shifting the window changes nothing there."""
    model = make(n_layer=1)
    idx = tokens(2, 3 * BLOCK)
    got, _ = teacher_forced_logits(model, idx, prompt_length=2)
    torch.testing.assert_close(got, recomputed_window_logits(model, idx, 2), atol=1e-10,
                               rtol=1e-10)


@pytest.mark.parametrize("kw", [ROLLING["untied"],
                                {"loop_center_idx": 1, "max_loops": 3,
                                 "loop_input_injection": "add", "loop_state_init": "noise",
                                 "loop_noise_scale": 0.5}])
def test_refill_keep_and_noise_init_re_prefill_the_exact_recomputed_window(kw):
    """`refill_keep=block_size` (asked for) and "noise" init (whose eval noise is per absolute
    position, so it cannot roll) renumber the window from 0: nanoGPT's recomputation."""
    model = make(**kw)
    idx = tokens(2, 3 * BLOCK)
    keep = BLOCK if kw is ROLLING["untied"] else None
    got, stats = teacher_forced_logits(model, idx, prompt_length=2, refill_keep=keep)
    torch.testing.assert_close(got, recomputed_window_logits(model, idx, 2), atol=1e-10,
                               rtol=1e-10)
    assert stats["full_forwards"] > 1


def test_generate_rolls_and_refuses_rolling_for_learned_positions():
    model = make(dtype=torch.float32, **ROLLING["tied"])
    prompt = tokens(2, 3)
    n_new = 3 * BLOCK
    out, stats = generate(model, prompt, n_new, temperature=0.0)
    assert out.shape == (2, 3 + n_new)
    assert stats["full_forwards"] == 1 and stats["cached_steps"] == n_new - 1
    # Greedy tokens of the rolling cache are those of banded attention over the whole output.
    want = banded_logits(model, out[:, :-1]).argmax(-1)
    assert torch.equal(out[:, 3:], want[:, 2:])
    learned = GPT(GPTConfig(**{**BASE, "position_embedding": "learned"}))
    with pytest.raises(ValueError, match="rope"):
        LoopKVCache(learned, batch_size=1, rolling=True)


# ---- configs, checkpoints, pretrained weights ---------------------------------------------------


def test_checkpoints_record_the_option_and_old_ones_load_as_learned():
    rope = make(dtype=torch.float32, rope_base=500.0)
    payload = {"model": rope.state_dict(), "model_config": rope.config.to_dict()}
    again = build_model(payload, "rope.pt").eval()
    assert again.config.position_embedding == "rope" and again.config.rope_base == 500.0
    idx = tokens(1, BLOCK)
    assert torch.equal(again(idx)[0], rope(idx)[0])
    learned = GPT(GPTConfig(**{**BASE, "position_embedding": "learned"})).eval()
    old_config = learned.config.to_dict()
    del old_config["position_embedding"], old_config["rope_base"]  # written before the keys
    old = build_model({"model": learned.state_dict(), "model_config": old_config}, "old.pt")
    assert old.config.position_embedding == "learned"
    assert torch.equal(old.eval()(idx)[0], learned(idx)[0])


def test_rope_is_refused_on_weights_trained_with_learned_positions(tmp_path):
    learned = GPT(GPTConfig(**{**BASE, "position_embedding": "learned", "bias": False}))
    args = {k: v for k, v in learned.config.to_dict().items()
            if k in ("n_layer", "n_head", "n_embd", "block_size", "bias", "vocab_size")}
    torch.save({"model": learned.state_dict(), "model_args": args}, tmp_path / "ckpt.pt")
    with pytest.raises(ConfigError, match="position_embedding.*learned positions"):
        from_nanogpt_checkpoint(tmp_path / "ckpt.pt", position_embedding="rope")
    with pytest.raises(ConfigError, match="position_embedding.*learned positions"):
        parse_and_build_pretrained(tmp_path)


def parse_and_build_pretrained(tmp_path):
    cfg, model_keys = parse_train_args([f"--init_from={tmp_path / 'ckpt.pt'}",
                                        "--position_embedding=rope", f"--out_dir={tmp_path}"])
    return pretrained_model(cfg, model_keys)


def test_shakespeare_rope_config_is_the_learned_one_with_rope():
    rope_cfg, rope_model = parse_train_args(["config/train_shakespeare_char_rope.py"])
    cfg, model = parse_train_args(["config/train_shakespeare_char.py"])
    assert rope_model == {**model, "position_embedding": "rope"}
    assert {**rope_cfg.to_dict(), "out_dir": cfg.out_dir, "wandb_run_name": cfg.wandb_run_name} \
        == cfg.to_dict()
