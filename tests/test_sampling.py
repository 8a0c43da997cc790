"""The loop-aware KV cache and sampler against full forward passes and a hand-written decoder."""

import json
import math
from collections import defaultdict

import pytest
import torch

from blockloop.checkpoint import save_checkpoint
from blockloop.model import GPT, GPTConfig
from blockloop.sampling import LoopKVCache, generate, main, teacher_forced_logits
from tests import reference

VOCAB = 23
BLOCK = 12

VARIANTS = {
    "plain": dict(),
    "tied_none": dict(loop_center_idx=1, loop_radius=1, max_loops=3),
    "tied_add": dict(loop_center_idx=1, loop_radius=1, max_loops=3, loop_input_injection="add"),
    "untied_add": dict(
        loop_center_idx=2, loop_radius=1, max_loops=3, tied_looping=False, loop_input_injection="add"
    ),
    "tied_concat": dict(loop_center_idx=1, max_loops=3, loop_input_injection="concat"),
    "untied_concat": dict(
        loop_center_idx=1, loop_radius=1, max_loops=3, tied_looping=False, loop_input_injection="concat"
    ),
}


def make_model(seed=0, **kw):
    base = dict(block_size=BLOCK, vocab_size=VOCAB, n_layer=4, n_head=2, n_embd=16, dropout=0.0)
    base.update(kw)
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**base)).eval()
    if model.looper is not None and model.looper.adapters is not None:
        # Fresh adapters pass the state through, which would make "concat" equal "none".
        with torch.no_grad():
            for p in model.looper.adapters.parameters():
                p.normal_(0, 0.2)
    return model


def tokens(batch, length, seed=1):
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("variant", VARIANTS)
def test_cached_logits_equal_full_forward_at_every_step(variant):
    model = make_model(**VARIANTS[variant])
    idx = tokens(2, BLOCK)
    # A 4-token prompt is prefilled, then tokens are fed one at a time.
    got, stats = teacher_forced_logits(model, idx, prompt_length=4)
    full, _ = model(idx, idx)
    torch.testing.assert_close(got, full[:, 3:-1], atol=1e-5, rtol=1e-5)
    assert stats["full_forwards"] == 1 and stats["cached_steps"] == BLOCK - 5
    # Non-vacuous: a different model gives different logits.
    other, _ = make_model(seed=9, **VARIANTS[variant])(idx, idx)
    assert not torch.allclose(other[:, 3:-1], got, atol=1e-3)


@pytest.mark.parametrize("variant", ["plain", "tied_add", "untied_concat"])
def test_multi_token_chunk_after_a_non_empty_past(variant):
    """The causal mask for several new tokens on top of cached ones."""
    model = make_model(**VARIANTS[variant])
    idx = tokens(3, 10)
    cache = LoopKVCache(model, batch_size=3)
    with torch.no_grad():
        model(idx[:, :3], kv_caches=cache)
        chunk, _ = model(idx[:, 3:9], idx[:, 3:9], kv_caches=cache)
        full, _ = model(idx[:, :9], idx[:, :9])
    assert cache.past_length == 9
    torch.testing.assert_close(chunk, full[:, 3:9], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", ["plain", "tied_add", "untied_add"])
def test_greedy_cached_tokens_equal_uncached_past_block_size(variant):
    model = make_model(**VARIANTS[variant])
    prompt = tokens(2, 3)
    n_new = 2 * BLOCK + 5  # well past block_size: every late step re-prefills
    cached, stats = generate(model, prompt, n_new, temperature=0.0)
    nanogpt = model.generate(prompt, n_new, temperature=0.0)
    uncached, _ = generate(model, prompt, n_new, temperature=0.0, use_cache=False)
    assert torch.equal(cached, nanogpt)
    assert torch.equal(cached, uncached)
    assert cached.shape == (2, 3 + n_new)
    # Exact fallback: one prefill, then single tokens until the cache is full, then re-prefills.
    assert stats["tokens"] == n_new
    assert stats["cached_steps"] == BLOCK - 3
    assert stats["full_forwards"] == n_new - (BLOCK - 3)


def test_prompt_longer_than_block_size_is_cropped_like_nanogpt():
    model = make_model(**VARIANTS["untied_add"])
    prompt = tokens(1, BLOCK + 4)
    cached, stats = generate(model, prompt, 6, temperature=0.0)
    assert torch.equal(cached, model.generate(prompt, 6, temperature=0.0))
    assert stats["full_forwards"] == 6  # the cache is full from the start: every step refills


def test_sampled_tokens_equal_uncached_with_the_same_generator():
    model = make_model(**VARIANTS["tied_add"])
    prompt = tokens(2, 2)
    runs = [
        generate(model, prompt, 30, temperature=1.5, top_k=10,
                 generator=torch.Generator().manual_seed(4), use_cache=c)[0]
        for c in (True, False)
    ]
    assert torch.equal(runs[0], runs[1])
    again, _ = generate(model, prompt, 30, temperature=1.5, top_k=10,
                        generator=torch.Generator().manual_seed(4))
    assert torch.equal(again, runs[0])
    other, _ = generate(model, prompt, 30, temperature=1.5, top_k=10,
                        generator=torch.Generator().manual_seed(5))
    assert not torch.equal(other, runs[0])


@pytest.mark.parametrize("keep", [BLOCK, BLOCK // 2, 1])
def test_past_block_size_each_step_sees_the_documented_window(keep):
    model = make_model(**VARIANTS["tied_add"])
    idx = tokens(2, 3 * BLOCK)
    got, stats = teacher_forced_logits(model, idx, prompt_length=2, refill_keep=keep)
    # The window rule written out: the cache holds tokens start..n-1; a token that does not fit
    # empties it and the last `keep` tokens (itself included) are prefilled again.
    start, refills = 0, 0
    with torch.no_grad():
        for j, n in enumerate(range(2, 3 * BLOCK)):
            if n - start > BLOCK:
                start, refills = n - keep, refills + 1
            want, _ = model(idx[:, start:n])
            torch.testing.assert_close(got[:, j], want[:, -1], atol=1e-5, rtol=1e-5)
    assert refills > 1
    assert stats["full_forwards"] == 1 + refills


def test_adaptive_exit_needs_the_cache_and_cache_checks_iterations():
    model = make_model(**VARIANTS["tied_add"])
    with pytest.raises(ValueError, match="KV cache"):
        generate(model, tokens(1, 2), 3, adaptive_exit=True, use_cache=False)
    cache = LoopKVCache(model, batch_size=1, num_loops=2)
    with pytest.raises(ValueError, match="iteration 3"):
        model(tokens(1, 2), num_loops=3, kv_caches=cache)


@pytest.mark.parametrize("variant", ["tied_add", "untied_concat"])
def test_adaptive_exit_extremes(variant):
    model = make_model(**dict(VARIANTS[variant], max_loops=5))
    idx = tokens(2, BLOCK)
    prompt, n = 3, BLOCK - 3  # logit rows: one from the prefill, n - 1 from single tokens
    # Above every delta: every decoded token stops at the first allowed iteration, 2.
    high, stats = teacher_forced_logits(model, idx, prompt, adaptive_exit=True, exit_threshold=1e9)
    assert stats["mean_iterations"] == pytest.approx((5 + 2 * (n - 1)) / n)
    assert all(torch.equal(it, torch.full((2,), 2)) for it in model.last_loop_iterations)
    # And its logits are those of the hand-written rule with every exit at 2.
    want = hand_adaptive_decode(model, idx, prompt, 1e9)[0]
    torch.testing.assert_close(high.double(), want, atol=1e-5, rtol=1e-4)
    # Zero: nothing converges, so every token runs max_loops and logits equal the full forward.
    zero, stats = teacher_forced_logits(model, idx, prompt, adaptive_exit=True, exit_threshold=0.0)
    assert stats["mean_iterations"] == 5
    full, _ = model(idx, idx, loop_exit=False)
    torch.testing.assert_close(zero, full[:, prompt - 1 : -1], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(high, zero, atol=1e-3)


def _attend(q, keys, values, n_head):
    """One query position over `keys`/`values` (n, C), causal by construction, float64."""
    c = q.shape[-1]
    d = c // n_head
    out = []
    for h in range(n_head):
        sl = slice(h * d, (h + 1) * d)
        att = torch.softmax((keys[:, sl] @ q[sl]) / math.sqrt(d), dim=0)
        out.append(att @ values[:, sl])
    return torch.cat(out)


def hand_adaptive_decode(model, idx, prompt_length, threshold):
    """The documented per-token exit rule written out, one row and one token at a time.

    kv[(block, iteration)] lists each position's (k, v) as that position left it; a token that
    stopped at iteration e appends its iteration-e K/V to every later iteration. Returns logits
    (B, T - prompt_length, V) in float64, the iterations each decoded token ran per unit, and
    every delta that was compared with the threshold.
    """
    sd = {k: v.detach().double() for k, v in model.state_dict().items()}
    cfg, plan = model.config, model.loop_plan
    c, loops = cfg.n_embd, cfg.max_loops
    injection = cfg.injection_mode
    all_logits, used, compared = [], [], []
    for row in idx:
        kv = defaultdict(list)
        row_logits = []

        def block(b, it, x):
            p = f"transformer.h.{b}."
            h = reference.layer_norm(x, sd, p + "ln_1")
            q, k, v = reference.linear(h, sd, p + "attn.c_attn").split(c)
            kv[(b, it)].append((k, v))
            keys = torch.stack([kk for kk, _ in kv[(b, it)]])
            values = torch.stack([vv for _, vv in kv[(b, it)]])
            y = _attend(q, keys, values, cfg.n_head)
            x = x + reference.linear(y, sd, p + "attn.c_proj")
            h = reference.linear(reference.layer_norm(x, sd, p + "ln_2"), sd, p + "mlp.c_fc")
            h = 0.5 * h * (1.0 + torch.erf(h / math.sqrt(2.0)))
            return x + reference.linear(h, sd, p + "mlp.c_proj")

        for pos in range(len(row) - 1):
            may_exit = pos >= prompt_length  # prompt tokens run every iteration
            x = sd["transformer.wte.weight"][row[pos]] + sd["transformer.wpe.weight"][pos]
            for b in range(plan.start):
                x = block(b, 1, x)
            for u, unit in enumerate(plan.units):
                x0, s, stop = x, x, loops
                for t in range(1, loops + 1):
                    if t == 1 or injection == "none":
                        inp = s
                    elif injection == "add":
                        inp = s + x0
                    else:
                        pre = f"looper.adapters.{u}.proj."
                        inp = s + torch.cat([s, x0]) @ sd[pre + "weight"].T + sd[pre + "bias"]
                    for b in unit:
                        inp = block(b, t, inp)
                    delta = (inp - s).norm() / (s.norm() + 1e-6)
                    s = inp
                    if may_exit and 2 <= t < loops:
                        compared.append(float(delta))
                        if delta < threshold:
                            stop = t
                            break
                for t in range(stop + 1, loops + 1):
                    for b in unit:
                        kv[(b, t)].append(kv[(b, stop)][-1])
                if may_exit:
                    used.append(stop)
                x = s
            for b in range(plan.stop, cfg.n_layer):
                x = block(b, 1, x)
            if pos >= prompt_length - 1:
                row_logits.append(reference.head(x, sd))
        all_logits.append(torch.stack(row_logits))
    return torch.stack(all_logits), used, compared


@pytest.mark.parametrize(
    "variant,threshold",
    [("tied_add", 0.5), ("untied_concat", 1.0), ("tied_none", 0.5)],
)
def test_adaptive_exit_logits_match_hand_written_rule(variant, threshold):
    model = make_model(seed=2, **dict(VARIANTS[variant], max_loops=5))
    # Larger residual updates make deltas differ between tokens, so exits spread out.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("c_proj.weight"):
                p.mul_(8.0)
    idx = tokens(2, BLOCK, seed=3)
    got, stats = teacher_forced_logits(model, idx, 3, adaptive_exit=True, exit_threshold=threshold)
    want, used, compared = hand_adaptive_decode(model, idx, 3, threshold)
    # The test needs tokens stopping at different iterations, some before max_loops, and no delta
    # so close to the threshold that float32 and float64 could decide differently.
    assert len(set(used)) >= 2 and min(used) < 5, sorted(used)
    assert min(abs(d - threshold) / threshold for d in compared) > 1e-4
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-4)
    n_rows = got.shape[1]
    units = len(model.loop_plan.units)
    expected_mean = (5 + sum(used) / (2 * units)) / n_rows
    assert stats["mean_iterations"] == pytest.approx(expected_mean)
    # Reading exited tokens at their last iteration matters: the full-iteration logits differ.
    fixed, _ = teacher_forced_logits(model, idx, 3)
    assert not torch.allclose(fixed, got, atol=1e-3)


def test_adaptive_exit_rows_are_independent():
    model = make_model(seed=2, **dict(VARIANTS["tied_add"], max_loops=5))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("c_proj.weight"):
                p.mul_(8.0)
    idx = tokens(3, BLOCK, seed=3)
    batched, _ = teacher_forced_logits(model, idx, 3, adaptive_exit=True, exit_threshold=0.5)
    for b in range(3):
        alone, _ = teacher_forced_logits(model, idx[b : b + 1], 3, adaptive_exit=True, exit_threshold=0.5)
        torch.testing.assert_close(alone[0], batched[b], atol=1e-5, rtol=1e-5)


# ---- the `blockloop sample` command -----------------------------------------------------------

ITOS = list("\nabcdefghij klmnopqrst")


def write_run(tmp_path, with_meta=True, **model_kw):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    if with_meta:
        meta = {"format": "blockloop-tokens-v1", "dataset": "tiny", "vocab_size": len(ITOS),
                "dtype": "uint16", "tokenizer": {"kind": "char", "itos": ITOS},
                "train_tokens": 0, "val_tokens": 0}
        (data_dir / "meta.json").write_text(json.dumps(meta))
    model = make_model(**dict(model_kw, vocab_size=len(ITOS)))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    save_checkpoint(out_dir / "last.pt", {
        "format": "blockloop-ckpt-v1",
        "model": model.state_dict(),
        "model_config": model.config.to_dict(),
        "train_config": {},
        "meta": {"data_dir": str(data_dir)},
    })
    return out_dir


def run_cli(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_sample_cli_end_to_end_same_seed_same_text(tmp_path, capsys):
    out_dir = write_run(tmp_path, **VARIANTS["tied_add"])
    common = ["--out_dir", out_dir, "--start", "abc", "--num_samples", 2, "--max_new_tokens", 30,
              "--device", "cpu"]
    code, first, err = run_cli(capsys, *common, "--seed", 7)
    assert code == 0, err
    samples = first.split("---------------\n")
    assert len(samples) == 3 and samples[-1] == ""
    for s in samples[:2]:
        assert s.startswith("abc") and len(s) == 3 + 30 + 1  # prompt, new tokens, newline
        assert set(s[:-1]) <= set(ITOS)
    assert samples[0] != samples[1]
    assert run_cli(capsys, *common, "--seed", 7)[1] == first
    assert run_cli(capsys, *common, "--seed", 7, "--no_cache")[1] == first
    assert run_cli(capsys, *common, "--seed", 8)[1] != first
    code, adaptive, err = run_cli(capsys, *common, "--seed", 7, "--adaptive_exit", "--exit_threshold", 1e9)
    assert code == 0 and "mean loop iterations" in err
    # Prompt from a file, and a greedy run reproducing GPT.generate.
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("hij")
    code, greedy, _ = run_cli(capsys, "--out_dir", out_dir, "--start", f"FILE:{prompt}", "--num_samples", 1,
                              "--max_new_tokens", 20, "--temperature", 0, "--device", "cpu")
    assert code == 0
    model = make_model(**dict(VARIANTS["tied_add"], vocab_size=len(ITOS)))
    want = model.generate(torch.tensor([[ITOS.index(ch) for ch in "hij"]]), 20, temperature=0)
    assert greedy == "".join(ITOS[i] for i in want[0].tolist()) + "\n---------------\n"


def test_sample_cli_task_model_reads_and_writes_token_ids(tmp_path, capsys):
    out_dir = write_run(tmp_path, **VARIANTS["tied_add"])
    payload = torch.load(out_dir / "last.pt", weights_only=True)
    payload["meta"] = {"dataset": "phop", "vocab_size": len(ITOS), "task": True}
    save_checkpoint(out_dir / "best.pt", payload)  # best.pt is preferred over last.pt
    code, out, err = run_cli(capsys, "--out_dir", out_dir, "--start", "3, 4 5", "--num_samples", 1,
                             "--max_new_tokens", 4, "--device", "cpu")
    assert code == 0, err
    ids = out.split("\n")[0].split()
    assert ids[:3] == ["3", "4", "5"] and len(ids) == 7
    assert all(0 <= int(i) < len(ITOS) for i in ids)
    code, _, err = run_cli(capsys, "--out_dir", out_dir, "--start", "3 x")
    assert code == 2 and "token ids" in err


def test_sample_cli_errors_are_one_line_with_exit_code_2(tmp_path, capsys):
    code, _, err = run_cli(capsys, "--out_dir", tmp_path / "nowhere")
    assert code == 2 and "does not exist" in err and err.count("\n") == 1
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = run_cli(capsys, "--out_dir", empty)
    assert code == 2 and "no best.pt or last.pt" in err
    out_dir = write_run(tmp_path)
    code, _, err = run_cli(capsys, "--out_dir", out_dir, "--start", "abZ", "--device", "cpu")
    assert code == 2 and "'Z'" in err and err.count("\n") == 1
    code, _, err = run_cli(capsys, "--out_dir", out_dir, "--adaptive_exit", "--no_cache")
    assert code == 2 and "KV cache" in err
    code, _, err = run_cli(capsys, "--out_dir", out_dir, "--device", "gpu")
    assert code == 2 and "device='gpu'" in err and err.count("\n") == 1
    code, _, err = run_cli(capsys, "--out_dir", out_dir, "--num_loops", 0, "--device", "cpu")
    assert code == 2 and "--num_loops=0" in err and err.count("\n") == 1
    code, _, err = run_cli(capsys, "--out_dir", out_dir, "--start", "FILE:" + str(tmp_path / "none.txt"))
    assert code == 2 and "cannot read" in err
    no_meta = tmp_path / "second"
    no_meta.mkdir()
    code, _, err = run_cli(capsys, "--out_dir", write_run(no_meta, with_meta=False), "--device", "cpu")
    assert code == 2 and "tokenizer meta missing" in err and err.count("\n") == 1


def test_sample_cli_help_lists_every_option_with_its_default(capsys):
    code, out, _ = run_cli(capsys, "--help")
    assert code == 0
    text = " ".join(out.split())
    for option, default in [
        ("--out_dir", "out"), ("--start", "'\\n'"), ("--num_samples", "10"),
        ("--max_new_tokens", "500"), ("--temperature", "0.8"), ("--top_k", "200"),
        ("--seed", "1337"), ("--device", "auto"), ("--num_loops", "None"),
        ("--adaptive_exit", "False"), ("--exit_threshold", "None"), ("--no_cache", "False"),
        ("--refill_keep", "None"),
    ]:
        assert option in text
        assert f"default: {default}" in text, option
