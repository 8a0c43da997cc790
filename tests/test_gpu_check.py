"""benchmarks/gpu_check.sh and gpu_check.py without a GPU: the CPU dry run end to end, the
datasheet peak lookup (an unknown device gets no MFU, never a guessed one), MFU arithmetic."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.sh"


def load_gpu_check():
    """benchmarks/gpu_check.py as a module (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # its dataclass looks its module up there
    spec.loader.exec_module(module)
    return module


gpu_check = load_gpu_check()


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """(the JSON, the output) of `bash benchmarks/gpu_check.sh --dry_run --json ...`."""
    out = tmp_path_factory.mktemp("gpu_check") / "result.json"
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1")
    proc = subprocess.run(["bash", str(SCRIPT), "--dry_run", "--json", str(out)], env=env,
                          cwd=out.parent, capture_output=True, text=True, timeout=180)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    return json.loads(out.read_text()), output


def test_dry_run_times_both_variants_at_the_same_depth(dry_run):
    result, _ = dry_run
    rows = {r["variant"]: r for r in result["results"]}
    assert set(rows) == {"plain", "looped"}
    for r in rows.values():
        assert r["tokens_per_s"] > 0 and r["step_ms"] > 0
        assert r["flops_per_token"] > 0 and r["last_loss"] > 0
        assert r["mfu"] is None and r["peak_memory_bytes"] is None  # CPU: no peak, no CUDA
    plain, looped = rows["plain"], rows["looped"]
    assert looped["effective_depth"] == plain["effective_depth"] == plain["n_layer"]
    assert looped["n_layer"] * 2 == plain["n_layer"]
    assert looped["loop_groups"] == [[0, looped["n_layer"] - 1]] and looped["max_loops"] == 2
    assert looped["params"] < plain["params"]
    # Every iteration counted: the same matmul work per token but for the parameter-free parts.
    assert looped["flops_per_token"] == pytest.approx(plain["flops_per_token"], rel=1e-9)
    assert result["settings"]["steps"] == 5 and result["settings"]["warmup"] == 3


def test_dry_run_runs_the_cuda_tests_and_prints_the_table(dry_run):
    _, output = dry_run
    assert "CUDA tests" in output and "skipped" in output  # pytest -m cuda ran, and skipped
    assert "| variant | blocks -> depth |" in output
    assert "| plain | 4 -> 4 |" in output and "| looped | 2 -> 4 |" in output
    assert "MFU n/a: dry run on the CPU" in output
    assert f"torch {torch.__version__}" in output


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H100 80GB HBM3", 989.4e12),
    ("NVIDIA H100 PCIe", 756e12),
    ("NVIDIA H200", 989.4e12),
    ("NVIDIA A100-SXM4-80GB", 312e12),
    ("NVIDIA A100-PCIE-40GB", 312e12),
    ("NVIDIA A100 80GB PCIe", 312e12),
    ("NVIDIA L4", 121e12),
])
def test_known_devices_get_their_datasheet_peak(name, peak):
    got, source = gpu_check.peak_bf16_flops(name)
    assert got == peak and "datasheet" in source


@pytest.mark.parametrize("name", [
    "NVIDIA GeForce RTX 4090", "NVIDIA H100 NVL", "NVIDIA H200 NVL", "NVIDIA GH200 480GB",
    "NVIDIA A10", "NVIDIA L40S", "Tesla V100-SXM2-16GB", "",
])
def test_unknown_devices_get_no_peak_and_a_reason(name):
    got, reason = gpu_check.peak_bf16_flops(name)
    assert got is None
    assert "not in the peak table" in reason and "--peak_flops" in reason


def test_mfu_is_flops_per_token_times_throughput_over_the_given_peak(tmp_path, monkeypatch):
    out = tmp_path / "r.json"
    compiled = []
    # The compile path without compiling (too slow here): torch.compile is recorded and
    # returns the model itself.
    monkeypatch.setattr(torch, "compile", lambda m: compiled.append(m) or m)
    args = ["--dry_run", "--peak_flops", "1e12", "--warmup", "1", "--steps", "2", "--compile",
            "--dtype", "bfloat16", "--variants", "looped", "--json", str(out)]
    assert gpu_check.main(args) == 0
    (r,) = json.loads(out.read_text())["results"]
    assert len(compiled) == 1 and r["variant"] == "looped" and r["last_loss"] > 0
    assert r["mfu"] == pytest.approx(r["flops_per_token"] * r["tokens_per_s"] / 1e12)


def test_gpu_settings_take_the_device_peak_but_not_for_float32(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H200")
    parse = gpu_check.build_parser().parse_args
    settings = gpu_check.resolve_settings(parse([]))
    assert (settings.device, settings.dtype, settings.compile) == ("cuda", "bfloat16", True)
    assert (settings.batch_size, settings.warmup, settings.steps) == (16, 5, 50)
    assert settings.model == gpu_check.GPT2_124M and settings.peak_flops == 989.4e12
    assert gpu_check.resolve_settings(parse(["--dtype", "float32"])).peak_flops is None
    assert gpu_check.resolve_settings(parse(["--peak_flops", "5e14"])).peak_flops == 5e14
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H200 NVL")
    assert gpu_check.resolve_settings(parse([])).peak_flops is None


def test_without_cuda_the_gpu_run_stops_and_bad_counts_are_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="--dry_run"):
        gpu_check.main([])
    with pytest.raises(SystemExit):
        gpu_check.main(["--dry_run", "--steps", "0"])
