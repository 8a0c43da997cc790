"""Training: schedule, logs, checkpoints, exact resume, nanoGPT checkpoint import."""

import copy
import json
import math
from types import SimpleNamespace

import pytest
import torch

from blockloop.checkpoint import load_checkpoint
from blockloop.config import ConfigError, TrainConfig, parse_train_args
from blockloop.model import GPT, GPTConfig
from blockloop.pretrained import from_nanogpt_checkpoint
from blockloop.records import code_identity
from blockloop.runtime import mix_seed
from blockloop.train import build_optimizer, get_lr, setup, train_step
from tests import reference
from tests.conftest import read_metrics, run, tiny_args, write_token_dataset


def test_lr_schedule_warmup_cosine_and_degenerate_decay():
    cfg, _ = parse_train_args(["--learning_rate=1.0", "--min_lr=0.1", "--warmup_iters=10", "--lr_decay_iters=110"])
    assert get_lr(0, cfg) == pytest.approx(1 / 11)
    assert get_lr(10, cfg) == pytest.approx(1.0)
    assert get_lr(60, cfg) == pytest.approx(0.1 + 0.5 * 0.9)
    assert get_lr(110, cfg) == pytest.approx(0.1) and get_lr(500, cfg) == pytest.approx(0.1)
    same, _ = parse_train_args(["--learning_rate=1.0", "--min_lr=0.1", "--warmup_iters=10", "--lr_decay_iters=10"])
    assert [get_lr(i, same) for i in (9, 10, 11)] == pytest.approx([10 / 11, 0.1, 0.1])


def test_training_writes_logs_checkpoints_and_learns(tmp_path):
    data = write_token_dataset(tmp_path / "data")
    out = tmp_path / "out"
    result = run(tiny_args(data, out, "--max_iters=12", "--loop_center_idx=1", "--max_loops=2", "--eval_loops=1,3"))
    records = read_metrics(out)
    evals = [r for r in records if r["kind"] == "eval"]
    trains = [r for r in records if r["kind"] == "train"]
    assert [r["iter"] for r in evals] == [0, 4, 8, 12]
    assert [r["iter"] for r in trains] == list(range(12))
    assert {"val_loss@1", "val_loss@3", "train_loss"} <= set(evals[-1])
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]
    assert trains[-1]["train_flops"] > 0 and trains[-1]["loops"] == 2
    assert result.best_val_loss == min(r["val_loss"] for r in evals)
    best = load_checkpoint(out / "best.pt")
    assert best["best_val_loss"] == pytest.approx(result.best_val_loss)
    last = load_checkpoint(out / "last.pt")
    assert last["iter_num"] == 12
    assert GPTConfig(**last["model_config"]).max_loops == 2
    saved = json.loads((out / "config.json").read_text())
    assert saved["train"]["max_iters"] == 12 and saved["model"]["loop_center_idx"] == 1


@pytest.mark.parametrize("extra", [(), ("--loop_center_idx=1", "--max_loops=3", "--loop_sampling=uniform", "--dropout=0.1", "--loop_noise_scale=0.1")])
def test_resume_continues_bit_for_bit(tmp_path, extra):
    data = write_token_dataset(tmp_path / "data")
    straight, split = tmp_path / "straight", tmp_path / "split"
    run(tiny_args(data, straight, "--max_iters=12", *extra))
    run(tiny_args(data, split, "--max_iters=8", *extra))
    run(tiny_args(data, split, "--max_iters=12", "--init_from=resume", *extra))
    a, b = load_checkpoint(straight / "last.pt"), load_checkpoint(split / "last.pt")
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    losses = lambda d: [(r["iter"], r.get("loss"), r.get("val_loss")) for r in read_metrics(d)]
    assert losses(straight) == losses(split)


def test_resume_without_checkpoint_is_a_clear_error(tmp_path):
    data = write_token_dataset(tmp_path / "data")
    with pytest.raises(ConfigError, match="last.pt"):
        run(tiny_args(data, tmp_path / "none", "--init_from=resume"))


def test_block_size_larger_than_data_is_refused_before_training(tmp_path):
    data = write_token_dataset(tmp_path / "data", val_tokens=10)
    with pytest.raises(ValueError, match="val.bin"):
        run(tiny_args(data, tmp_path / "out", "--max_iters=2"))
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


def test_nanogpt_checkpoint_loads_with_identical_logits(tmp_path):
    torch.manual_seed(0)
    args = dict(n_layer=2, n_head=2, n_embd=16, block_size=16, bias=False, vocab_size=23, dropout=0.0)
    source = GPT(GPTConfig(**args)).eval()
    # nanoGPT's train.py saves the compiled model's state dict (prefix `_orig_mod.`); old
    # versions also stored the causal mask as `attn.bias` buffers.
    state = {"_orig_mod." + k: v for k, v in source.state_dict().items()}
    for i in range(2):
        state[f"_orig_mod.transformer.h.{i}.attn.bias"] = torch.tril(torch.ones(16, 16)).view(1, 1, 16, 16)
    torch.save({"model": state, "model_args": args, "iter_num": 100, "best_val_loss": torch.tensor(1.5),
                "config": {"dataset": "shakespeare_char"}}, tmp_path / "ckpt.pt")
    loaded = from_nanogpt_checkpoint(tmp_path / "ckpt.pt").eval()
    idx = torch.randint(0, 23, (2, 16))
    got, _ = loaded(idx, idx)
    torch.testing.assert_close(got, source(idx, idx)[0], atol=0, rtol=0)
    ref = reference.forward(idx, source.state_dict(), 2, [0, 1])
    torch.testing.assert_close(got.double(), ref, atol=1e-5, rtol=1e-4)
    # Loop the pretrained stack: weights identical, behaviour now looped.
    looped = from_nanogpt_checkpoint(tmp_path / "ckpt.pt", loop_center_idx=1, max_loops=3).eval()
    ref_looped = reference.forward(idx, source.state_dict(), 2, [0, 1, 1, 1])
    torch.testing.assert_close(looped(idx, idx)[0].double(), ref_looped, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="n_layer"):
        from_nanogpt_checkpoint(tmp_path / "ckpt.pt", n_layer=4)


def test_synthetic_task_training_logs_accuracy(tmp_path):
    out = tmp_path / "task"
    run(["--dataset=phop", "--phop_n=8", "--phop_hops=1", f"--out_dir={out}", "--batch_size=8",
         "--block_size=9", "--n_layer=1", "--n_head=2", "--n_embd=16", "--max_iters=4",
         "--eval_interval=2", "--eval_iters=2", "--task_eval_size=32", "--progress=False",
         "--gradient_accumulation_steps=1", "--device=cpu"])
    evals = [r for r in read_metrics(out) if r["kind"] == "eval"]
    assert all(0.0 <= r["val_accuracy"] <= 1.0 for r in evals)
    assert all(math.isfinite(r["val_loss"]) for r in evals)


def test_resume_refuses_a_changed_model_key(tmp_path):
    data = write_token_dataset(tmp_path / "data")
    out = tmp_path / "out"
    run(tiny_args(data, out, "--max_iters=4", "--loop_center_idx=1", "--max_loops=2"))
    with pytest.raises(ConfigError, match="max_loops=3.*max_loops=2"):
        run(tiny_args(data, out, "--max_iters=8", "--init_from=resume", "--loop_center_idx=1", "--max_loops=3"))
    run(tiny_args(data, out, "--max_iters=8", "--init_from=resume", "--loop_center_idx=1", "--max_loops=2"))


def test_task_eval_loss_weights_batches_by_size():
    from blockloop.evaluation import evaluate

    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=8, vocab_size=13, n_layer=1, n_head=1, n_embd=8))
    x = torch.randint(0, 13, (5, 8))
    y = torch.full((5, 8), -1)
    y[:, -1] = torch.randint(0, 13, (5,))
    whole = evaluate(model, [(x, y)]).loss
    split = evaluate(model, [(x[:4], y[:4]), (x[4:], y[4:])]).loss
    assert split == pytest.approx(whole, rel=1e-6)


STEP_ARGS = ("--loop_center_idx=1", "--max_loops=2", "--dropout=0.1")


def test_one_training_step_on_its_own(tmp_path):
    data = write_token_dataset(tmp_path / "data")
    cfg, overrides = parse_train_args(tiny_args(data, tmp_path / "a", *STEP_ARGS))
    t = setup(cfg, overrides, log=lambda *a: None)
    before = copy.deepcopy(t.raw_model)
    step = train_step(t, 0)
    # Its loss is the mean micro-batch loss of the weights it started from, with the dropout
    # draws seeded from (seed, step, micro-step) as the step seeds them.
    losses = []
    with torch.no_grad():
        for micro in range(cfg.gradient_accumulation_steps):
            torch.manual_seed(mix_seed(cfg.seed, 0, micro, 1))
            losses.append(before(*t.data.train_batch(0, micro))[1])
    assert step.finite and not step.stop_requested
    assert step.loss == pytest.approx(torch.stack(losses).mean().item(), rel=1e-6)
    assert step.lr == get_lr(0, cfg) and step.loops == 2 and step.flops > 0
    assert not torch.equal(t.raw_model.lm_head.weight, before.lm_head.weight)
    assert all(p.grad is None for p in t.raw_model.parameters())
    # The same step from the same state (a second setup) gives the same parameters, bit for bit.
    cfg_b, _ = parse_train_args(tiny_args(data, tmp_path / "b", *STEP_ARGS))
    t_b = setup(cfg_b, overrides, log=lambda *a: None)
    assert train_step(t_b, 0).loss == step.loss
    for (name, p), q in zip(t.raw_model.named_parameters(), t_b.raw_model.parameters()):
        assert torch.equal(p, q), name


@pytest.mark.parametrize("extra, want", [
    (("--dropout=0.1",), "AdamW fused; compile off; dropout 0.1 with blockloop's CPU masks"),
    (("--dropout=0.0",), "AdamW fused; compile off; no dropout"),
    (("--dropout=0.1", "--compile=True"), "AdamW fused; compile on; dropout 0.1 with torch's kernels"),
])
def test_the_log_says_which_speed_levers_run(tmp_path, extra, want):
    data = write_token_dataset(tmp_path / "data")
    cfg, overrides = parse_train_args(tiny_args(data, tmp_path / "out", *extra))
    lines = []
    setup(cfg, overrides, log=lines.append)
    assert f"speed: {want}" in lines


def test_config_and_metrics_record_the_code_identity(tmp_path):
    data = write_token_dataset(tmp_path / "data")
    out = tmp_path / "out"
    run(tiny_args(data, out, "--max_iters=2"))
    code = code_identity()
    assert set(code) == {"source_sha256", "torch", "git_commit"}
    assert json.loads((out / "config.json").read_text())["code"] == code
    header = {"kind": "header", "iter": 0, "code": code}
    assert read_metrics(out)[0] == header
    # A resumed run keeps the header (its records before the resumed step stay); one header.
    run(tiny_args(data, out, "--max_iters=4", "--init_from=resume"))
    records = read_metrics(out)
    assert records[0] == header and [r["kind"] for r in records].count("header") == 1
    assert [r["iter"] for r in records if r["kind"] == "train"] == [0, 1, 2, 3]
    # A fresh run replacing the old one (overwrite_out_dir) starts a new log with its own header.
    run(tiny_args(data, out, "--max_iters=1", "--overwrite_out_dir=True"))
    assert [r["kind"] for r in read_metrics(out)] == ["header", "eval", "train", "eval"]


def test_resume_keeps_this_machines_adamw_kernel():
    # A checkpoint saved before the CPU update was fused stores fused=None in its groups;
    # load_state_dict would bring that back, so build_optimizer sets the kernel again.
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=11))
    params = list(model.parameters())
    old = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2]},
                             {"params": [p for p in params if p.dim() < 2]}], lr=1e-3)
    model(torch.zeros(1, 8, dtype=torch.long), torch.zeros(1, 8, dtype=torch.long))[1].backward()
    old.step()
    state = old.state_dict()
    assert state["param_groups"][0]["fused"] is None
    start = SimpleNamespace(model=model, checkpoint={"optimizer": state}, source="old.pt")
    optimizer, _ = build_optimizer(TrainConfig(), start, "cpu", "float32")
    assert all(g["fused"] is True for g in optimizer.param_groups)
    assert len(optimizer.state) == len(state["state"])
