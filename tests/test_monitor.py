"""Training-time loop monitoring: the logged Lipschitz estimate and last-iteration change."""

import pytest
import torch

from blockloop.model import GPT, GPTConfig
from blockloop.monitor import loop_monitor
from tests.conftest import make_half_map, read_metrics, run, tiny_args, write_token_dataset


def contraction_model(groups):
    """Looped blocks that are exact identities and concat adapters W = [-0.5 I | 0]: every
    iteration maps s -> 0.5 s, whose Jacobian has all singular values 0.5."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=8, vocab_size=11, n_layer=4, n_head=2, n_embd=16,
                          bias=False, loop_groups=groups, max_loops=3,
                          loop_input_injection="concat"))
    return make_half_map(model, [i for a, b in groups for i in range(a, b + 1)])


def test_monitor_reports_each_group_lipschitz_and_change():
    model = contraction_model([[1, 1], [2, 3]])
    out = loop_monitor(model, torch.randint(0, 11, (3, 8)), power_iters=8)
    assert out["loop_lipschitz"] == pytest.approx([0.5, 0.5], rel=1e-3)
    # s_3 = 0.5 s_2: the relative change at the last iteration is 0.5.
    assert out["loop_delta_last"] == pytest.approx([0.5, 0.5], rel=1e-4)
    assert model.training  # mode restored


def test_training_logs_the_monitor_at_each_evaluation(tmp_path):
    data = write_token_dataset(tmp_path / "data")
    run(tiny_args(data, tmp_path / "out", "--max_iters=8", "--loop_groups=[[0,0],[1,1]]",
                  "--loop_counts=2,3"))
    evals = [r for r in read_metrics(tmp_path / "out") if r["kind"] == "eval"]
    assert len(evals) == 3
    for r in evals:
        assert len(r["loop_lipschitz"]) == 2 and all(v > 0 for v in r["loop_lipschitz"])
        assert len(r["loop_delta_last"]) == 2
    run(tiny_args(data, tmp_path / "off", "--max_iters=4", "--loop_center_idx=0",
                  "--max_loops=2", "--loop_monitor=False"))
    assert all("loop_lipschitz" not in r for r in read_metrics(tmp_path / "off"))
