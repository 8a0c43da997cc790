"""Synthetic depth-sensitive tasks: p-hop induction and pointer chasing.

Why this module exists: looping a block only pays off on problems whose answer needs several
sequential steps of attention. Both tasks here have a knob (the hop count) that sets exactly how
many steps are needed, the same input format at every hop count (so a model trained at p hops can
be asked, at test time, for the answer at p' hops), and a single answer position per example.

Batches follow the contract in docs/CONTRACTS.md: ``get_batch(batch_size, seed, step,
micro_step=0, rank=0) -> (x, y)`` gives int64 CPU tensors of shape (B, L); ``y`` is -1 (ignored by
the loss) everywhere except the answer position, which is always the last position. A batch is a
pure function of its arguments, so a resumed run sees exactly the batches it would have seen.

Held-out rule (why the evaluation set can never leak into training): every example ``x`` (the full
model input row) is given a 64-bit hash ``h(x)`` (see :func:`in_heldout_partition`); the example
belongs to the held-out partition iff ``h(x) % HELDOUT_MODULUS == 0``. The training stream rejects
and resamples every example of that partition, and :func:`heldout_set` keeps only examples of it.
The two are therefore disjoint by construction, whatever the seeds, for about 1/16 of the example
space given up by training.

Floors (:func:`baseline_floors`): accuracies that trivial strategies reach on a given set, e.g.
copying the last token, so that reports can print them next to every model accuracy (see
the README for why: a failing model can look half right).
"""

from __future__ import annotations

import functools
import math
import numbers
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import torch

from blockloop.errors import TaskError

HELDOUT_MODULUS = 16
TASK_DATASETS = ("phop", "pointer")
# Same defaults as blockloop.config.TrainConfig, for callers that pass a partial dict.
TASK_CONFIG_DEFAULTS: dict[str, Any] = {
    "phop_n": 16,
    "phop_alphabet": 4,
    "phop_hops": 2,
    "phop_no_adjacent_repeat": True,
    "pointer_items": 8,
    "pointer_hops": 2,
}

# Tags keep the training and held-out random streams apart even when their seeds coincide (the
# partition already makes the examples disjoint; this only avoids correlated sampling work).
_STREAM_TRAIN = 0
_STREAM_HELDOUT = 1
# Sampling gives up (with a TaskError) once it has drawn this many candidates per wanted example:
# below a 1/1000 acceptance rate the configuration is almost surely not what the user meant.
_MAX_DRAWS_PER_EXAMPLE = 1000
# Cap on one round of candidates, so a low acceptance rate cannot allocate unbounded memory.
_MAX_ROUND = 1 << 16


def _check_int(key: str, value: Any, minimum: int, why: str = "") -> None:
    # bool is an int subclass; True as a sequence length is a config mistake, not a 1.
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise TaskError(f"{key} must be an int >= {minimum}{why}, got {value!r}")


def _check_bool(key: str, value: Any) -> None:
    if not isinstance(value, (bool, np.bool_)):
        raise TaskError(f"{key} must be True or False, got {value!r}")


def _check_batch_args(batch_size: int, seed: int, step: int, micro_step: int, rank: int) -> None:
    _check_int("batch_size", batch_size, 1)
    for key, value in (("seed", seed), ("step", step), ("micro_step", micro_step), ("rank", rank)):
        _check_int(key, value, 0)


def _as_numpy(x: torch.Tensor | np.ndarray, seq_len: int, who: str) -> np.ndarray:
    arr = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    if arr.ndim != 2 or arr.shape[1] != seq_len:
        raise TaskError(f"{who}: x must have shape (B, {seq_len}), got {tuple(arr.shape)}")
    return arr.astype(np.int64, copy=False)


# ----------------------------------------------------------------------------------------------
# Held-out partition


def _splitmix64(z: np.ndarray) -> np.ndarray:
    # A standard 64-bit mixing function; numpy uint64 array arithmetic wraps, which is intended.
    z = z + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


@functools.lru_cache(maxsize=None)
def _position_weights(length: int) -> np.ndarray:
    # Derived by arithmetic only (no RNG), so the partition cannot change with a numpy upgrade.
    return _splitmix64(np.arange(1, length + 1, dtype=np.uint64))


def _example_hash(x: np.ndarray) -> np.ndarray:
    weighted = (x.astype(np.uint64) * _position_weights(x.shape[1])[None, :]).sum(
        axis=1, dtype=np.uint64
    )
    return _splitmix64(weighted ^ np.uint64(x.shape[1]))


def _heldout_mask(x: np.ndarray) -> np.ndarray:
    return _example_hash(x) % np.uint64(HELDOUT_MODULUS) == 0


def in_heldout_partition(x: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Bool tensor (B,): whether each row of model input ``x`` belongs to the held-out partition.

    Rule: ``splitmix64(sum_t x_t * w_t mod 2^64, xor L) % HELDOUT_MODULUS == 0`` with fixed
    position weights ``w_t = splitmix64(t + 1)``. Training batches never contain such a row;
    held-out sets contain only such rows.
    """
    arr = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    if arr.ndim != 2:
        raise TaskError(f"in_heldout_partition: x must have shape (B, L), got {tuple(arr.shape)}")
    return torch.from_numpy(_heldout_mask(arr.astype(np.int64, copy=False)))


# ----------------------------------------------------------------------------------------------
# Shared sampling driver


def _rng(stream: int, *keys: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([stream, *keys])))


def _fill(task: "PHopTask | PointerTask", rng: np.random.Generator, size: int, heldout: bool,
          who: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw candidate rows until ``size`` are usable: answer defined and in the wanted partition.

    Only the missing rows are redrawn each round; the round size follows the acceptance rate seen
    so far, so the held-out set (about 1 in 16 candidates usable) needs few rounds too.
    """
    rows: list[np.ndarray] = []
    answers: list[np.ndarray] = []
    have = drawn = accepted = 0
    while have < size:
        need = size - have
        if accepted:
            rate = accepted / drawn
        elif drawn:
            # Nothing usable yet: assume a rate below what was seen, so rounds grow geometrically.
            rate = 1.0 / (2 * drawn)
        else:
            # Training keeps almost every candidate; the held-out partition keeps about 1 in 16.
            rate = 1.0 / HELDOUT_MODULUS if heldout else 1.0
        count = min(_MAX_ROUND, max(need, math.ceil(1.1 * need / rate)))
        x, ans = task._sample(rng, count)
        ok = (ans >= 0) & (_heldout_mask(x) == heldout)
        drawn += count
        accepted += int(ok.sum())
        x, ans = x[ok][:need], ans[ok][:need]
        rows.append(x)
        answers.append(ans)
        have += len(ans)
        if have < size and drawn >= _MAX_DRAWS_PER_EXAMPLE * size:
            hint = task._acceptance_hint()
            if heldout:
                hint += "; or the held-out partition of this small example space is nearly empty"
            raise TaskError(
                f"{who}: only {accepted} of {drawn} sampled examples were usable ({hint})")
    x = np.concatenate(rows)
    y = np.full_like(x, -1)
    y[:, task.answer_position] = np.concatenate(answers)
    return torch.from_numpy(x), torch.from_numpy(y)


# ----------------------------------------------------------------------------------------------
# Tasks


def _phop_chain(seq: np.ndarray, hops: int) -> np.ndarray:
    """Answer ``x_{i_hops}`` of each row of ``seq`` (B, n) with ``i_0 = n-1``; -1 where undefined.

    Only the positions on the chain are looked up (not all n), so a hop costs O(B n).
    """
    batch, n = seq.shape
    rows = np.arange(batch)
    positions = np.arange(n)
    pos = np.full(batch, n - 1)
    ok = np.ones(batch, dtype=bool)
    for _ in range(hops):
        current = seq[rows, pos]
        earlier = (seq == current[:, None]) & (positions[None, :] < pos[:, None])
        prev = np.where(earlier, positions[None, :], -1).max(axis=1)
        ok &= prev >= 0
        # Undefined rows keep a valid position so the gather above stays in range.
        pos = np.where(ok, prev + 1, pos)
    return np.where(ok, seq[rows, pos], -1)


@dataclass(frozen=True)
class PHopTask:
    """p-hop induction: tokens x_0..x_{n-1} over ``alphabet`` symbols, then SEP (id = alphabet).

    ``hop(i) = 1 + max{m < i : x_m = x_i}``; from ``i_0 = n-1`` follow ``hops`` hops; the answer is
    ``x_{i_hops}``, the target at the SEP position. Sequences whose chain is undefined are
    resampled.
    With ``no_adjacent_repeat`` each token differs from the one before, which removes the
    ``hop(i) = i`` shortcut.
    """

    n: int
    alphabet: int
    hops: int
    no_adjacent_repeat: bool = True

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        _check_int("phop_n (PHopTask.n)", self.n, 2)
        _check_int("phop_hops (PHopTask.hops)", self.hops, 1)
        _check_bool("phop_no_adjacent_repeat (PHopTask.no_adjacent_repeat)",
                    self.no_adjacent_repeat)
        if self.no_adjacent_repeat:
            # With 2 symbols and no repeats the sequence alternates and every answer is fixed.
            _check_int("phop_alphabet (PHopTask.alphabet)", self.alphabet, 3,
                       " when phop_no_adjacent_repeat is True")
            # Each hop then moves back by at least one position and a hop needs i >= 2, so a chain
            # of `hops` steps from n-1 needs n >= hops + 2.
            if self.n < self.hops + 2:
                raise TaskError(
                    f"phop_n (PHopTask.n) must be >= phop_hops + 2 = {self.hops + 2} when "
                    f"phop_no_adjacent_repeat is True (otherwise no chain is defined), got {self.n}"
                )
        else:
            _check_int("phop_alphabet (PHopTask.alphabet)", self.alphabet, 2)

    @property
    def sep(self) -> int:
        return self.alphabet

    @property
    def vocab_size(self) -> int:
        return self.alphabet + 1

    @property
    def seq_len(self) -> int:
        return self.n + 1

    @property
    def answer_position(self) -> int:
        return self.n

    @property
    def num_answers(self) -> int:
        """How many distinct answer tokens exist (for chance and 'anything but' floors)."""
        return self.alphabet

    def _sample(self, rng: np.random.Generator, count: int) -> tuple[np.ndarray, np.ndarray]:
        if self.no_adjacent_repeat:
            # x_t = x_{t-1} + s_t (mod A) with s_t uniform on 1..A-1 is uniform over the other
            # A-1 symbols, and the cumulative sum does it for all positions at once.
            first = rng.integers(0, self.alphabet, size=(count, 1))
            steps = rng.integers(1, self.alphabet, size=(count, self.n - 1))
            seq = np.concatenate([first, first + np.cumsum(steps, axis=1)], axis=1) % self.alphabet
        else:
            seq = rng.integers(0, self.alphabet, size=(count, self.n))
        ans = _phop_chain(seq, self.hops)
        x = np.concatenate([seq, np.full((count, 1), self.sep)], axis=1).astype(np.int64)
        return x, ans

    def _acceptance_hint(self) -> str:
        return ("few sequences have a defined hop chain; raise phop_n or lower phop_alphabet or "
                f"phop_hops (n={self.n}, alphabet={self.alphabet}, hops={self.hops})")

    def get_batch(self, batch_size: int, seed: int, step: int, micro_step: int = 0,
                  rank: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Training batch (x, y), int64 (B, n+1); never contains a held-out-partition example."""
        _check_batch_args(batch_size, seed, step, micro_step, rank)
        rng = _rng(_STREAM_TRAIN, seed, step, micro_step, rank)
        return _fill(self, rng, batch_size, heldout=False, who="phop get_batch")

    def answers(self, x: torch.Tensor | np.ndarray, hops: int) -> torch.Tensor:
        """Answer at ``hops`` hops (0 = x_{n-1}) for each row of model input x; -1 where the
        chain is undefined."""
        _check_int("hops", hops, 0)
        seq = _as_numpy(x, self.seq_len, "PHopTask.answers")[:, : self.n]
        return torch.from_numpy(_phop_chain(seq, hops))

    def targets(self, x: torch.Tensor | np.ndarray, hops: int) -> torch.Tensor:
        """y for the same inputs at another hop count; rows with an undefined chain are all -1,
        so :func:`answer_accuracy` skips them."""
        return _targets(self, x, hops)


@dataclass(frozen=True)
class PointerTask:
    """Pointer chasing: input ``f(0) .. f(items-1) SEP q`` for a random permutation f (SEP = items);
    the answer ``f^hops(q)`` is the target at the last position (the q token)."""

    items: int
    hops: int

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        _check_int("pointer_items (PointerTask.items)", self.items, 2)
        _check_int("pointer_hops (PointerTask.hops)", self.hops, 1)

    @property
    def sep(self) -> int:
        return self.items

    @property
    def vocab_size(self) -> int:
        return self.items + 1

    @property
    def seq_len(self) -> int:
        return self.items + 2

    @property
    def answer_position(self) -> int:
        return self.items + 1

    @property
    def num_answers(self) -> int:
        """How many distinct answer tokens exist (for chance and 'anything but' floors)."""
        return self.items

    @staticmethod
    def _chase(perm: np.ndarray, query: np.ndarray, hops: int) -> np.ndarray:
        rows = np.arange(len(query))
        for _ in range(hops):
            query = perm[rows, query]
        return query

    def _sample(self, rng: np.random.Generator, count: int) -> tuple[np.ndarray, np.ndarray]:
        # The argsort of i.i.d. uniforms is a uniformly random permutation, row by row.
        perm = np.argsort(rng.random((count, self.items)), axis=1)
        query = rng.integers(0, self.items, size=count)
        x = np.concatenate(
            [perm, np.full((count, 1), self.sep), query[:, None]], axis=1
        ).astype(np.int64)
        return x, self._chase(perm, query, self.hops)

    def _acceptance_hint(self) -> str:
        return f"pointer_items={self.items} gives too few distinct examples"

    def get_batch(self, batch_size: int, seed: int, step: int, micro_step: int = 0,
                  rank: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Training batch (x, y), int64 (B, items+2); never holds a held-out-partition example."""
        _check_batch_args(batch_size, seed, step, micro_step, rank)
        rng = _rng(_STREAM_TRAIN, seed, step, micro_step, rank)
        return _fill(self, rng, batch_size, heldout=False, who="pointer get_batch")

    def answers(self, x: torch.Tensor | np.ndarray, hops: int) -> torch.Tensor:
        """``f^hops(q)`` (0 = q itself) for each row of model input x; always defined."""
        _check_int("hops", hops, 0)
        arr = _as_numpy(x, self.seq_len, "PointerTask.answers")
        return torch.from_numpy(self._chase(arr[:, : self.items], arr[:, -1], hops))

    def targets(self, x: torch.Tensor | np.ndarray, hops: int) -> torch.Tensor:
        """y for the same inputs at another hop count."""
        return _targets(self, x, hops)


Task = PHopTask | PointerTask


def _targets(task: Task, x: torch.Tensor | np.ndarray, hops: int) -> torch.Tensor:
    ans = task.answers(x, hops)
    y = torch.full((len(ans), task.seq_len), -1, dtype=torch.int64)
    y[:, task.answer_position] = ans
    return y


def heldout_set(task: Task, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed evaluation set of ``size`` examples, all from the held-out partition (disjoint from
    every training batch). Small example spaces may repeat examples within the set."""
    _check_int("size", size, 1)
    _check_int("seed", seed, 0)
    return _fill(task, _rng(_STREAM_HELDOUT, seed), size, heldout=True, who="heldout_set")


def task_from_config(dataset: str, cfg: Mapping[str, Any]) -> Task:
    """Build the task named ``dataset`` from config keys; missing keys take TASK_CONFIG_DEFAULTS."""
    def get(key: str) -> Any:
        return cfg.get(key, TASK_CONFIG_DEFAULTS[key])

    if dataset == "phop":
        return PHopTask(n=get("phop_n"), alphabet=get("phop_alphabet"), hops=get("phop_hops"),
                        no_adjacent_repeat=get("phop_no_adjacent_repeat"))
    if dataset == "pointer":
        return PointerTask(items=get("pointer_items"), hops=get("pointer_hops"))
    allowed = ", ".join(map(repr, TASK_DATASETS))
    raise TaskError(f"dataset must be one of {allowed}, got {dataset!r}")


# ----------------------------------------------------------------------------------------------
# Scoring


def answer_accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    """Exact-match accuracy of ``argmax(logits)`` at the positions where ``y != -1`` only.

    ``logits`` is (B, L, V) aligned with ``y`` (B, L), or (B, 1, V) from a model that computed the
    last position only; the latter requires every answer of ``y`` to sit at the last position.
    """
    if logits.dim() != 3 or y.dim() != 2 or logits.shape[0] != y.shape[0]:
        raise TaskError(f"answer_accuracy: logits must be (B, L, V) and y (B, L), got "
                        f"{tuple(logits.shape)} and {tuple(y.shape)}")
    if logits.shape[1] == 1 and y.shape[1] != 1:
        if bool((y[:, :-1] != -1).any()):
            raise TaskError("answer_accuracy: last-position logits (B, 1, V) given but y has "
                            "answers before the last position")
        y = y[:, -1:]
    elif logits.shape[1] != y.shape[1]:
        raise TaskError(f"answer_accuracy: logits length {logits.shape[1]} must be 1 or equal "
                        f"y length {y.shape[1]}")
    count = int((y != -1).sum())
    if count == 0:
        raise TaskError("answer_accuracy: y has no answer positions (all -1)")
    # argmax is never -1, so positions without an answer can never count as correct.
    correct = int((logits.argmax(dim=-1) == y).sum())
    return correct / count


def baseline_floors(task: Task, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """Accuracies of trivial strategies on (x, y), to print next to every model accuracy.

    Keys: ``uniform`` (1 / number of answer tokens); ``majority`` (always the most frequent answer
    of this very set, an upper bound for any constant guess); ``copy_last`` (the 0-hop answer:
    x_{n-1} for p-hop, q for pointer); ``anything_but_last`` (a uniform guess among the answer
    tokens other than that one: expected accuracy); ``hop_k_answer`` for k = 1 .. task.hops - 1
    (answering with fewer hops than asked). Rows whose y has no answer are skipped.
    """
    answer = y[:, task.answer_position]
    keep = answer != -1
    if not bool(keep.any()):
        raise TaskError("baseline_floors: y has no answer at the answer position")
    x, answer = x[keep], answer[keep]
    last = task.answers(x, 0)
    floors = {
        "uniform": 1.0 / task.num_answers,
        "majority": torch.bincount(answer).max().item() / len(answer),
        "copy_last": (last == answer).double().mean().item(),
        "anything_but_last": (last != answer).double().mean().item() / (task.num_answers - 1),
    }
    for k in range(1, task.hops):
        floors[f"hop_{k}_answer"] = (task.answers(x, k) == answer).double().mean().item()
    return floors
