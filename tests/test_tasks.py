"""Tests for blockloop.tasks: generators against literal pure-Python references, determinism of the
(seed, step, micro_step, rank) stream, disjointness of the held-out set, answer-only accuracy,
config validation messages, and the trivial-strategy floors of /work/shared/TASKS_NOTES.md."""

import math
import random

import numpy as np
import pytest
import torch

from blockloop.tasks import (
    HELDOUT_MODULUS,
    PHopTask,
    PointerTask,
    TaskError,
    answer_accuracy,
    baseline_floors,
    heldout_set,
    in_heldout_partition,
    task_from_config,
)


# ---- literal references (loops over positions, straight from the definitions) -------------------

def ref_hop(seq, i):
    earlier = [m for m in range(i) if seq[m] == seq[i]]
    return 1 + max(earlier) if earlier else None


def ref_phop_answer(seq, hops):
    i = len(seq) - 1
    for _ in range(hops):
        i = ref_hop(seq, i)
        if i is None:
            return None
    return seq[i]


def ref_pointer_answer(perm, q, hops):
    for _ in range(hops):
        q = perm[q]
    return q


def random_phop_configs(count, seed):
    rnd = random.Random(seed)
    configs = []
    while len(configs) < count:
        no_adj = rnd.random() < 0.5
        alphabet = rnd.randint(3 if no_adj else 2, 6)
        hops = rnd.randint(1, 4)
        n = rnd.randint(hops + 2 if no_adj else 2, 12)
        configs.append(PHopTask(n=n, alphabet=alphabet, hops=hops, no_adjacent_repeat=no_adj))
    return configs


# ---- p-hop ------------------------------------------------------------------------------------

@pytest.mark.parametrize("task", random_phop_configs(30, seed=1), ids=repr)
def test_phop_batch_matches_reference(task):
    x, y = task.get_batch(24, seed=5, step=3)
    assert x.dtype == torch.int64 and y.dtype == torch.int64
    assert x.shape == y.shape == (24, task.n + 1)
    assert (x[:, -1] == task.alphabet).all(), "SEP (= alphabet) closes every input"
    assert ((x[:, :-1] >= 0) & (x[:, :-1] < task.alphabet)).all()
    assert (y[:, :-1] == -1).all(), "targets only at the SEP position"
    for row, target in zip(x.tolist(), y[:, -1].tolist()):
        seq = row[:-1]
        if task.no_adjacent_repeat:
            assert all(a != b for a, b in zip(seq, seq[1:])), seq
        # Every example is well defined: the whole chain exists, and its end is the target.
        assert ref_phop_answer(seq, task.hops) == target, (seq, target)
    for hops in range(0, 7):
        want = [ref_phop_answer(row[:-1], hops) for row in x.tolist()]
        want = [-1 if a is None else a for a in want]
        assert task.answers(x, hops).tolist() == want


def test_phop_adjacent_repeats_occur_without_the_option():
    x, _ = PHopTask(n=16, alphabet=4, hops=2, no_adjacent_repeat=False).get_batch(64, 0, 0)
    assert (x[:, 1:-1] == x[:, :-2]).any(), "without the option, x_t = x_{t-1} must be possible"


@pytest.mark.parametrize("no_adj", [True, False])
def test_phop_tokens_are_roughly_uniform(no_adj):
    task = PHopTask(n=16, alphabet=4, hops=1, no_adjacent_repeat=no_adj)
    x, _ = task.get_batch(2000, seed=0, step=0)
    freq = torch.bincount(x[:, :-1].flatten(), minlength=4).double() / x[:, :-1].numel()
    # 32000 tokens: one symbol's frequency has sd < 0.003; 0.02 is far outside chance.
    assert (freq - 0.25).abs().max() < 0.02, freq


# ---- pointer chasing ----------------------------------------------------------------------------

@pytest.mark.parametrize("items,hops", [(2, 1), (3, 2), (5, 1), (5, 3), (8, 4), (12, 7)])
def test_pointer_batch_matches_reference(items, hops):
    task = PointerTask(items=items, hops=hops)
    x, y = task.get_batch(32, seed=2, step=7)
    assert x.shape == y.shape == (32, items + 2) and x.dtype == y.dtype == torch.int64
    assert (x[:, items] == items).all(), "SEP (= items) before the query"
    assert (y[:, :-1] == -1).all(), "target only at the last (query) position"
    for row, target in zip(x.tolist(), y[:, -1].tolist()):
        perm, q = row[:items], row[-1]
        assert sorted(perm) == list(range(items))
        assert 0 <= q < items
        assert ref_pointer_answer(perm, q, hops) == target
    for k in range(0, 6):
        want = [ref_pointer_answer(r[:items], r[-1], k) for r in x.tolist()]
        assert task.answers(x, k).tolist() == want


@pytest.mark.parametrize("task", [PointerTask(items=3, hops=1), PHopTask(n=5, alphabet=3, hops=1)],
                         ids=repr)
def test_training_examples_are_uniform_over_the_training_partition(task):
    # Both samplers give every valid example the same probability (permutation and query uniform;
    # under no_adjacent_repeat each sequence has probability 1/(A (A-1)^(n-1))), and rejection keeps
    # that uniform over what is left. Tiny spaces (18 and 48 raw examples) make this checkable.
    x, _ = task.get_batch(12000, seed=0, step=0)
    examples, counts = torch.unique(x, dim=0, return_counts=True)
    raw, raw_answers = task._sample(np.random.default_rng(0), 20000)
    usable = {tuple(r) for r, a in zip(raw.tolist(), raw_answers.tolist()) if a != -1}
    assert {tuple(r) for r in examples.tolist()} == {
        r for r in usable if not in_heldout_partition(np.array([r]))[0]}
    freq = counts.double() / len(x)
    expected = 1 / len(examples)
    # sd of one frequency is at most sqrt(expected / 12000) <= 0.0038; allow about 4 sd.
    assert (freq - expected).abs().max() < 4 * math.sqrt(expected / len(x)), freq


# ---- stream determinism -------------------------------------------------------------------------

@pytest.mark.parametrize("task", [PHopTask(16, 4, 2), PointerTask(16, 2)], ids=repr)
def test_batches_are_a_pure_function_of_their_arguments(task):
    base = task.get_batch(16, seed=1, step=10, micro_step=2, rank=1)
    again = task.get_batch(16, seed=1, step=10, micro_step=2, rank=1)
    assert all(torch.equal(a, b) for a, b in zip(base, again))
    for kwargs in (dict(seed=2, step=10, micro_step=2, rank=1),
                   dict(seed=1, step=11, micro_step=2, rank=1),
                   dict(seed=1, step=10, micro_step=3, rank=1),
                   dict(seed=1, step=10, micro_step=2, rank=0)):
        other = task.get_batch(16, **kwargs)
        assert not torch.equal(base[0], other[0]), kwargs


# ---- held-out set -----------------------------------------------------------------------------

SMALL_SPACES = [PHopTask(n=5, alphabet=3, hops=1), PHopTask(n=6, alphabet=3, hops=2),
                PointerTask(items=4, hops=2)]


@pytest.mark.parametrize("task", SMALL_SPACES, ids=repr)
def test_heldout_disjoint_from_training_stream(task):
    # Example spaces of about 50-100 examples: 200 training batches of 64 sample every training
    # example many times, so any held-out example allowed into training would show up here.
    heldout_x, heldout_y = heldout_set(task, 100, seed=0)
    heldout = {tuple(r) for r in heldout_x.tolist()}
    train = set()
    for step in range(200):
        x, _ = task.get_batch(64, seed=0, step=step, micro_step=step % 3, rank=step % 2)
        train.update(tuple(r) for r in x.tolist())
    assert heldout and not heldout & train
    # Sensitivity: the raw sampler (before the partition filter) does produce held-out examples.
    raw, _ = task._sample(np.random.default_rng(0), 5000)
    assert heldout <= {tuple(r) for r in raw.tolist()}
    assert in_heldout_partition(heldout_x).all()
    assert (heldout_y[:, -1] != -1).all()


def test_heldout_partition_flags_heldout_rows_only_and_is_about_one_in_sixteen():
    task = PHopTask(16, 4, 2)
    hx, hy = heldout_set(task, 500, seed=3)
    assert in_heldout_partition(hx).all()
    assert not in_heldout_partition(task.get_batch(500, seed=3, step=0)[0]).any()
    assert torch.equal(hy[:, -1], task.answers(hx, 2)), "held-out targets are correct answers"
    raw, _ = task._sample(np.random.default_rng(1), 32000)
    frac = in_heldout_partition(raw).double().mean().item()
    # sd of the fraction over 32000 draws is 0.0014.
    assert abs(frac - 1 / HELDOUT_MODULUS) < 0.007, frac


def test_heldout_set_is_fixed_by_its_seed():
    task = PointerTask(16, 3)
    a, b, c = heldout_set(task, 64, 0), heldout_set(task, 64, 0), heldout_set(task, 64, 1)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_hopeless_configuration_raises_instead_of_looping():
    # x_1 must repeat x_0 out of a million symbols: about one candidate in a million is usable.
    task = PHopTask(n=2, alphabet=1_000_000, hops=1, no_adjacent_repeat=False)
    with pytest.raises(TaskError, match="phop_n"):
        task.get_batch(4, seed=0, step=0)


# ---- other hop counts ---------------------------------------------------------------------------

def test_targets_at_other_hop_counts():
    task = PHopTask(n=8, alphabet=4, hops=2)
    x, y = task.get_batch(200, seed=0, step=0)
    assert torch.equal(task.targets(x, 2), y)
    y4 = task.targets(x, 4)
    assert (y4[:, :-1] == -1).all()
    undefined = y4[:, -1] == -1
    assert undefined.any() and not undefined.all(), "n=8 leaves some 4-hop chains undefined"
    for row, target in zip(x.tolist(), y4[:, -1].tolist()):
        want = ref_phop_answer(row[:-1], 4)
        assert target == (-1 if want is None else want)


# ---- accuracy -----------------------------------------------------------------------------------

def one_hot_logits(pred, vocab):
    return torch.nn.functional.one_hot(pred, vocab).float()


def test_accuracy_counts_answer_positions_only():
    task = PHopTask(16, 4, 2)
    x, y = task.get_batch(10, seed=0, step=0)
    pred = torch.randint(0, task.vocab_size, y.shape, generator=torch.Generator().manual_seed(0))
    pred[:, -1] = y[:, -1]
    assert answer_accuracy(one_hot_logits(pred, task.vocab_size), y) == 1.0
    # Every non-answer prediction changed: accuracy unchanged.
    pred[:, :-1] = (pred[:, :-1] + 1) % task.vocab_size
    assert answer_accuracy(one_hot_logits(pred, task.vocab_size), y) == 1.0
    # One answer wrong: exactly one miss out of ten.
    pred[3, -1] = (y[3, -1] + 1) % task.alphabet
    assert answer_accuracy(one_hot_logits(pred, task.vocab_size), y) == pytest.approx(0.9)
    # Last-position-only logits give the same number.
    last = one_hot_logits(pred[:, -1:], task.vocab_size)
    assert answer_accuracy(last, y) == pytest.approx(0.9)


def test_accuracy_skips_rows_without_answer_and_rejects_bad_shapes():
    y = torch.full((4, 3), -1)
    y[0, 2], y[1, 2] = 1, 2
    pred = torch.tensor([[0, 0, 1], [0, 0, 0], [0, 0, 0], [0, 0, 0]])
    assert answer_accuracy(one_hot_logits(pred, 3), y) == 0.5
    with pytest.raises(TaskError, match="no answer"):
        answer_accuracy(torch.zeros(4, 3, 3), torch.full((4, 3), -1))
    y[0, 0] = 1
    with pytest.raises(TaskError, match="last position"):
        answer_accuracy(torch.zeros(4, 1, 3), y)
    with pytest.raises(TaskError, match="length"):
        answer_accuracy(torch.zeros(4, 2, 3), y)


# ---- config and validation ----------------------------------------------------------------------

def test_task_from_config_maps_keys():
    cfg = dict(phop_n=10, phop_alphabet=5, phop_hops=3, phop_no_adjacent_repeat=False,
               pointer_items=7, pointer_hops=4)
    assert task_from_config("phop", cfg) == PHopTask(10, 5, 3, False)
    assert task_from_config("pointer", cfg) == PointerTask(7, 4)
    task = task_from_config("phop", {})
    assert (task.vocab_size, task.seq_len) == (task.alphabet + 1, task.n + 1)
    pointer = task_from_config("pointer", {})
    assert (pointer.vocab_size, pointer.seq_len) == (pointer.items + 1, pointer.items + 2)


@pytest.mark.parametrize("dataset,cfg,key", [
    ("phop", dict(phop_n=1), "phop_n"),
    ("phop", dict(phop_n=16.0), "phop_n"),
    ("phop", dict(phop_n=True), "phop_n"),
    ("phop", dict(phop_n=3, phop_hops=2), "phop_n"),
    ("phop", dict(phop_alphabet=2), "phop_alphabet"),
    ("phop", dict(phop_alphabet=1, phop_no_adjacent_repeat=False), "phop_alphabet"),
    ("phop", dict(phop_hops=0), "phop_hops"),
    ("phop", dict(phop_no_adjacent_repeat="yes"), "phop_no_adjacent_repeat"),
    ("pointer", dict(pointer_items=1), "pointer_items"),
    ("pointer", dict(pointer_hops=0), "pointer_hops"),
    ("pointer", dict(pointer_hops="2"), "pointer_hops"),
    ("copy", {}, "dataset"),
])
def test_config_errors_name_the_key(dataset, cfg, key):
    with pytest.raises(TaskError, match=key):
        task_from_config(dataset, cfg)


@pytest.mark.parametrize("kwargs,key", [
    (dict(batch_size=0, seed=0, step=0), "batch_size"),
    (dict(batch_size=4, seed=-1, step=0), "seed"),
    (dict(batch_size=4, seed=0, step=-1), "step"),
    (dict(batch_size=4, seed=0, step=0, micro_step=-1), "micro_step"),
    (dict(batch_size=4, seed=0, step=0, rank=1.5), "rank"),
])
def test_batch_argument_errors_name_the_argument(kwargs, key):
    with pytest.raises(TaskError, match=key):
        PointerTask(8, 2).get_batch(**kwargs)
    with pytest.raises(TaskError, match="size"):
        heldout_set(PointerTask(8, 2), 0, 0)


def test_answers_rejects_wrong_input_shape():
    task = PHopTask(16, 4, 2)
    with pytest.raises(TaskError, match=r"\(B, 17\)"):
        task.answers(torch.zeros(4, 16, dtype=torch.int64), 2)


# ---- floors -------------------------------------------------------------------------------------

def test_floors_on_a_hand_made_set():
    task = PHopTask(n=4, alphabet=3, hops=2)
    # [0,1,0,1]: i_0=3 -> i_1=2 -> i_2=1, answer 1 (1-hop answer x_2 = 0).
    # [1,2,1,0]: x_3 = 0 has no earlier copy: undefined, y = -1, so the row is skipped.
    # [2,0,2,0]: i_0=3 -> i_1=2 -> i_2=1, answer 0 (1-hop answer x_2 = 2).
    seqs = [[0, 1, 0, 1], [1, 2, 1, 0], [2, 0, 2, 0]]
    x = torch.tensor([s + [3] for s in seqs])
    y = task.targets(x, 2)
    assert y[:, -1].tolist() == [1, -1, 0]
    floors = baseline_floors(task, x, y)
    assert floors["uniform"] == pytest.approx(1 / 3)
    assert floors["majority"] == pytest.approx(0.5)
    assert floors["copy_last"] == pytest.approx(1.0)  # both answers equal x_{n-1}
    assert floors["anything_but_last"] == pytest.approx(0.0)
    assert floors["hop_1_answer"] == pytest.approx(0.0)


def test_floors_match_tasks_notes():
    # TASKS_NOTES.md (n=16, A=4) quotes, to about a point: copy-last 49% at p=2 with the option and
    # 63% without, anything-but-last 33% at p=1, majority about 26%. 8000 examples give a
    # proportion sd <= 0.0056; 0.04 = 2 points for the notes' own rounding + ~4 sd of ours.
    n_examples = 8000
    tol = 0.04
    p2 = PHopTask(16, 4, 2)
    f = baseline_floors(p2, *p2.get_batch(n_examples, seed=0, step=0))
    assert f["copy_last"] == pytest.approx(0.49, abs=tol)
    assert f["majority"] == pytest.approx(0.26, abs=tol)
    assert f["hop_1_answer"] == 0.0, "with the option, the 1-hop answer never equals the 2-hop one"
    p1 = PHopTask(16, 4, 1)
    f = baseline_floors(p1, *p1.get_batch(n_examples, seed=0, step=0))
    # With the option the 1-hop answer follows x_{n-1}'s earlier copy, so it is never x_{n-1}:
    # 'anything but last' is exactly 1/3.
    assert f["anything_but_last"] == pytest.approx(1 / 3, abs=1e-12)
    assert f["copy_last"] == 0.0
    plain = PHopTask(16, 4, 2, no_adjacent_repeat=False)
    f = baseline_floors(plain, *plain.get_batch(n_examples, seed=0, step=0))
    assert f["copy_last"] == pytest.approx(0.63, abs=tol)


def test_pointer_floors_are_consistent():
    task = PointerTask(16, 2)
    x, y = task.get_batch(4000, seed=0, step=0)
    f = baseline_floors(task, x, y)
    assert f["uniform"] == 1 / 16
    # f^2(q) = q exactly when q lies on a cycle of length 1 or 2: 2/16 in expectation.
    assert f["copy_last"] == pytest.approx(2 / 16, abs=0.025)
    assert f["anything_but_last"] == pytest.approx((1 - f["copy_last"]) / 15)
