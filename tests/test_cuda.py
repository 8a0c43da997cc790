"""What only a CUDA GPU can check (marker `cuda`; every test is skipped without CUDA).

bf16 autocast, fused AdamW as training builds it, the flash attention kernel, torch.compile
(inductor) with fixed loops and with automatic exit, the generation cache, and DDP with nccl on
one GPU. `benchmarks/gpu_check.sh` runs them (`pytest -m cuda tests/test_cuda.py`) before
timing GPT-2 124M. The CPU versions of these checks live in test_compile.py, test_sampling.py
and test_ddp.py; the tests here take the device from the `device` fixture.

Tolerances: bf16 has an 8-bit mantissa (relative rounding 2^-8 ~ 4e-3), so bf16 results are
compared at about 2e-2; float32 results on the GPU at 1e-4, since kernels (cuBLAS algorithms,
inductor's fused reductions) sum in other orders than the eager CPU path.
"""

import copy
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from blockloop.checkpoint import load_checkpoint
from blockloop.config import parse_train_args
from blockloop.looping import relative_change
from blockloop.model import GPT, GPTConfig
from blockloop.runtime import autocast_context, resolve_dtype
from blockloop.sampling import generate, teacher_forced_logits
from blockloop.train import Distributed, Start, build_optimizer, wrap_model
from tests.conftest import run, tiny_args, write_token_dataset

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

REPO = Path(__file__).resolve().parents[1]
VOCAB = 97
LOOPED = dict(loop_center_idx=1, max_loops=3, loop_input_injection="add")
VARIANTS = {
    "plain": dict(),
    "tied_add": LOOPED,
    "untied_concat": dict(loop_center_idx=1, loop_radius=1, max_loops=3, tied_looping=False,
                          loop_input_injection="concat"),
}
BF16_TOL = dict(atol=2e-2, rtol=2e-2)
FP32_TOL = dict(atol=1e-4, rtol=1e-4)
TORCHRUN_TIMEOUT_S = 90  # about 15 s on 2 CPU cores


@pytest.fixture
def device():
    return "cuda"


def small_model(device, seed=0, **kw):
    """A 3-block model of width 128 (4 heads of 32: flash attention's sizes) on `device`;
    concat adapters get random weights (fresh ones pass the state through unchanged)."""
    base = dict(block_size=64, vocab_size=VOCAB, n_layer=3, n_head=4, n_embd=128, dropout=0.0)
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**{**base, **kw}))
    if model.looper is not None and model.looper.adapters is not None:
        with torch.no_grad():
            for p in model.looper.adapters.parameters():
                p.normal_(0, 0.2)
    return model.to(device)


def batch(device, b=4, t=64, seed=1):
    """(inputs, next-token targets), (b, t) each, random ids on `device`."""
    ids = torch.randint(0, VOCAB, (b, t + 1), generator=torch.Generator().manual_seed(seed))
    return ids[:, :-1].to(device), ids[:, 1:].to(device)


def assert_finite_grads(model):
    for name, p in model.named_parameters():
        if p.grad is not None:
            assert torch.isfinite(p.grad).all(), name


# ----------------------------------------------------------------------------------------------
# bf16 autocast and fused AdamW


def test_auto_dtype_is_bf16_on_a_bf16_gpu(device):
    if not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    assert resolve_dtype("auto", device) == "bfloat16"


@pytest.mark.parametrize("variant", ["plain", "tied_add"])
def test_bf16_autocast_training_is_finite_and_close_to_fp32(device, variant):
    model = small_model(device, **VARIANTS[variant]).train()
    x, y = batch(device)
    _, loss32 = model(x, y)
    ctx = autocast_context(device, "bfloat16")
    with ctx:
        logits, loss = model(x, y)
    assert logits.dtype == torch.bfloat16  # autocast really ran the matmuls in bf16
    assert loss.item() == pytest.approx(loss32.item(), rel=1e-2)
    optimizer = model.configure_optimizers(0.0, 3e-3, (0.9, 0.95), device)
    losses = []
    for _ in range(5):  # a few steps on one batch: the loss must fall
        with ctx:
            _, loss = model(x, y)
        loss.backward()
        assert_finite_grads(model)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))), losses
    assert losses[-1] < losses[0], losses


def test_training_builds_fused_adamw_and_it_steps_like_foreach(device):
    cfg, _ = parse_train_args(["--dataset=tiny", f"--device={device}"])
    model = small_model(device, **VARIANTS["untied_concat"]).train()
    twin = copy.deepcopy(model)
    fused, _ = build_optimizer(cfg, Start(model=model), device, "bfloat16")
    assert fused.defaults["fused"] is True
    # The same parameter groups without `fused`: on CUDA tensors AdamW then takes foreach.
    reference = twin.configure_optimizers(cfg.weight_decay, cfg.learning_rate,
                                          (cfg.beta1, cfg.beta2), "cpu")
    assert not reference.defaults.get("fused")
    for group in reference.param_groups:
        group["foreach"] = True
    before = [p.detach().clone() for p in model.parameters()]
    x, y = batch(device)
    for _ in range(3):
        model(x, y)[1].backward()
        for p, q in zip(model.parameters(), twin.parameters()):
            q.grad = p.grad.clone()  # identical gradients: only the update rule differs
        fused.step()
        reference.step()
        fused.zero_grad(set_to_none=True)
        reference.zero_grad(set_to_none=True)
    for (name, p), q, p0 in zip(model.named_parameters(), twin.parameters(), before):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5, msg=name)
    assert any(not torch.equal(p, p0) for p, p0 in zip(model.parameters(), before))


# ----------------------------------------------------------------------------------------------
# Flash attention


def forward_with(backend, model, x, y, device):
    with sdpa_kernel(backend), autocast_context(device, "bfloat16"):
        return model(x, y)


@pytest.mark.parametrize("variant", ["plain", "tied_add"])
def test_flash_attention_equals_math_attention_in_bf16(device, variant):
    model = small_model(device, **VARIANTS[variant]).eval()
    x, y = batch(device)
    # Restricted to one backend, SDPA raises rather than fall back: this ran the flash kernel.
    with torch.no_grad():
        flash_logits, flash_loss = forward_with(SDPBackend.FLASH_ATTENTION, model, x, y, device)
        math_logits, math_loss = forward_with(SDPBackend.MATH, model, x, y, device)
    torch.testing.assert_close(flash_logits.float(), math_logits.float(), **BF16_TOL)
    assert flash_loss.item() == pytest.approx(math_loss.item(), abs=1e-2)


def test_flash_attention_backward_in_training(device):
    model = small_model(device, **LOOPED).train()
    x, y = batch(device)
    _, loss = forward_with(SDPBackend.FLASH_ATTENTION, model, x, y, device)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        loss.backward()
    assert torch.isfinite(loss)
    assert_finite_grads(model)
    assert model.transformer.h[1].attn.c_attn.weight.grad.abs().sum() > 0


# ----------------------------------------------------------------------------------------------
# torch.compile (inductor, the default backend)


def test_compiled_training_step_with_fixed_loops_matches_eager(device):
    eager = small_model(device, **LOOPED).train()
    source = copy.deepcopy(eager)
    compiled = torch.compile(source)
    x, y = batch(device)
    loss_e = eager(x, y)[1]
    loss_c = compiled(x, y)[1]
    torch.testing.assert_close(loss_c, loss_e, **FP32_TOL)
    loss_e.backward()
    loss_c.backward()
    for (name, p), q in zip(eager.named_parameters(), source.parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-4, rtol=1e-3, msg=name)


def exit_iterations(crit, threshold, num_loops):
    """Iterations each sequence runs: the first check t = 2 .. num_loops-1 (rows of `crit`,
    (checks, B)) whose criterion is below `threshold`, else all `num_loops`."""
    below = crit < threshold
    return torch.where(below.any(0), below.float().argmax(0) + 2, num_loops)


def exit_threshold_between(model, x, num_loops):
    """(threshold, the iterations each sequence then runs), with the threshold halfway across
    the widest gap between the exit criteria the eager model meets at t = 2 .. num_loops-1
    that still sends sequences to different iteration counts (any gap if none does). No
    criterion lies near it, so a compiled kernel's float rounding cannot flip a decision."""
    with torch.no_grad():
        model(x, num_loops=num_loops, loop_exit=False, trace=True)
    states = model.last_loop_trace.units[0].states
    crit = torch.stack([relative_change(states[t], states[t - 1]) for t in range(2, num_loops)])
    values = crit.flatten().sort().values.tolist()
    candidates = [(b - a, (a + b) / 2) for a, b in zip(values, values[1:])]
    varied = [c for c in candidates if exit_iterations(crit, c[1], num_loops).unique().numel() > 1]
    _, threshold = max(varied or candidates)
    return threshold, exit_iterations(crit, threshold, num_loops)


def test_compile_with_automatic_exit_matches_eager(device):
    num_loops = 5
    model = small_model(device, **dict(LOOPED, max_loops=6)).eval()
    x, y = batch(device)
    threshold, expected = exit_threshold_between(model, x, num_loops)
    compiled = torch.compile(model)
    out = {}
    for name, runner in (("eager", model), ("compiled", compiled)):
        model.last_loop_iterations = None  # so a stale value cannot pass for the compiled one
        with torch.no_grad():
            logits, _ = runner(x, y, num_loops=num_loops, loop_exit=True,
                               exit_threshold=threshold)
        out[name] = (logits, model.last_loop_iterations[0].clone())
    assert torch.equal(out["eager"][1], expected)
    assert int(expected.min()) < num_loops  # some sequence really exited early
    assert torch.equal(out["compiled"][1], expected)
    torch.testing.assert_close(out["compiled"][0], out["eager"][0], **FP32_TOL)


# ----------------------------------------------------------------------------------------------
# Generation cache


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_cached_logits_equal_full_forward(device, variant):
    model = small_model(device, **VARIANTS[variant]).eval()
    x, _ = batch(device, b=2, t=24)
    got, stats = teacher_forced_logits(model, x, prompt_length=4)
    with torch.no_grad():
        full, _ = model(x, x)
    torch.testing.assert_close(got, full[:, 3:-1], **FP32_TOL)
    assert stats["cached_steps"] == 24 - 5


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_cached_generation_equals_uncached(device, variant):
    model = small_model(device, **VARIANTS[variant]).eval()
    prompt, _ = batch(device, b=2, t=3)
    n_new = 64 + 10  # past block_size: the cache is re-prefilled too
    cached, stats = generate(model, prompt, n_new, temperature=0.0)
    uncached, _ = generate(model, prompt, n_new, temperature=0.0, use_cache=False)
    assert cached.device.type == torch.device(device).type and cached.shape == (2, 3 + n_new)
    assert torch.equal(cached, uncached)
    assert torch.equal(cached, model.generate(prompt, n_new, temperature=0.0))
    assert stats["cached_steps"] > 0
    runs = [
        generate(model, prompt, 30, temperature=1.5, top_k=10, use_cache=c,
                 generator=torch.Generator(device=device).manual_seed(4))[0]
        for c in (True, False)
    ]
    assert torch.equal(runs[0], runs[1])


# ----------------------------------------------------------------------------------------------
# DDP with nccl on one GPU


@pytest.fixture
def process_group(tmp_path):
    """An nccl process group of one rank in this process, left at the end of the test."""
    store = torch.distributed.FileStore(str(tmp_path / "store"), 1)
    torch.distributed.init_process_group("nccl", store=store, rank=0, world_size=1)
    yield
    torch.distributed.destroy_process_group()


def test_ddp_wrapped_step_equals_one_process_step(device, process_group):
    cfg, _ = parse_train_args(["--dataset=tiny", "--device=cuda:0"])
    assert torch.distributed.get_backend() == "nccl"
    model = small_model("cuda:0", **LOOPED).train()
    twin = copy.deepcopy(model)
    ddp = wrap_model(cfg, model, Distributed(True, 0, 1), "cuda:0")
    assert isinstance(ddp, torch.nn.parallel.DistributedDataParallel)
    x, y = batch("cuda:0")
    loss_ddp = ddp(x, y)[1]
    loss_one = twin(x, y)[1]
    loss_ddp.backward()  # all-reduces the gradients over the one rank
    loss_one.backward()
    torch.testing.assert_close(loss_ddp, loss_one)
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=1e-5, msg=name)


def torchrun_one_gpu(args, cwd):
    """`torchrun --standalone --nproc_per_node=1 -m blockloop.train args`; its output. It stays
    in this process group, so a `timeout` around pytest (gpu_check.sh) ends its worker too."""
    path = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, PYTHONPATH=path)
    lo = next((name for _, name in socket.if_nameindex() if name.startswith("lo")), None)
    if lo is not None:  # rendezvous and nccl's bootstrap on loopback: no network needed
        env.setdefault("NCCL_SOCKET_IFNAME", lo)
        env.setdefault("GLOO_SOCKET_IFNAME", lo)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
           "-m", "blockloop.train", *args]
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        output, _ = proc.communicate(timeout=TORCHRUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.terminate()  # torchrun passes SIGTERM on to its worker
        try:
            output, _ = proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            output, _ = proc.communicate()
        pytest.fail(f"torchrun did not finish in {TORCHRUN_TIMEOUT_S} s:\n{output[-4000:]}")
    assert proc.returncode == 0, output[-4000:]
    return output


def test_torchrun_on_one_gpu_trains_like_one_process(device, tmp_path):
    data = write_token_dataset(tmp_path / "data")
    # float32: the comparison is about DDP, not about bf16 rounding.
    extra = ("--max_iters=4", "--eval_interval=2", f"--device={device}", "--dtype=float32",
             "--loop_center_idx=1", "--max_loops=2", "--loop_input_injection=add")
    run(tiny_args(data, tmp_path / "single", *extra))
    output = torchrun_one_gpu(tiny_args(data, tmp_path / "ddp", *extra), tmp_path)
    assert "done: best val loss" in output, output[-4000:]
    a = load_checkpoint(tmp_path / "single" / "last.pt")
    b = load_checkpoint(tmp_path / "ddp" / "last.pt")
    assert a["iter_num"] == b["iter_num"] == 4
    for name, value in a["model"].items():
        torch.testing.assert_close(b["model"][name].cpu(), value.cpu(), **FP32_TOL, msg=name)
