"""Generation with a KV cache that understands loops, and the `blockloop sample` command.

Why a loop-aware cache: in a full forward pass every position goes through iteration i of a
looped block together, so a token's attention in block b at iteration i reads the keys and values
that the earlier positions produced in block b *at iteration i*. A cache that keeps one K/V buffer
per block would mix iterations. `LoopKVCache` therefore keeps one `LayerKVCache` per
(block, iteration): blocks outside the looped range have iteration 1 only, looped blocks have
iterations 1 .. num_loops. Each buffer is preallocated to `block_size` positions on first use
(with the dtype and device of the first keys written), so a decoding step appends in place.

Decoding: the prompt is processed in one forward pass (the prefill), then each new token alone,
attending to the cache. With a fixed iteration count this gives the logits of a full forward pass
over the same context, to float32 rounding.

Context longer than `block_size`, learned positions (`wpe` has `block_size` rows): a token's K/V
depend on its absolute position and cannot be shifted. When the cache is full, it is emptied and
the last `refill_keep` tokens (the new one included) are prefilled again at positions
0 .. refill_keep-1. The default, `refill_keep = block_size`, is exact: every step then conditions
on the last `block_size` tokens, as nanoGPT's uncached `GPT.generate` does (recomputing the
window: `model(idx[:, -block_size:])`), but past `block_size` each step is a full forward pass (no
saving). A smaller `refill_keep` (e.g. block_size // 2) re-prefills once every
`block_size - refill_keep + 1` tokens and is much faster, at the price of conditioning on between
`refill_keep` and `block_size` tokens instead of always `block_size`. A RoPE model re-prefills the
same way when `refill_keep` is given (exact for `refill_keep = block_size`: rotary attention
depends on relative positions only, so renumbering the window from 0 changes nothing).

Context longer than `block_size`, rotary positions (`position_embedding="rope"`, `refill_keep`
None): the cache rolls. Each (block, iteration) buffer is a ring of `block_size` entries; a new
token past `block_size` overwrites the oldest one. Keys stay rotated at their absolute positions
and the new query is rotated at its own, so every score sees a distance 0 .. block_size-1, as in
training. Each step is one cached single-token forward, and the memory stays `block_size` entries
per (block, iteration). What it computes, exactly: in every block and iteration, each token
attends to the keys and values of the last `block_size` tokens (itself included) as they were
computed when each of those tokens was processed, i.e. a full forward pass over the whole sequence
with a banded causal mask of width `block_size` (sliding-window attention). Cached decoding equals
that pass to float rounding (tested). It is *not* recomputing the window: there, every window
token is recomputed seeing the window only, whereas a cached key at block >= 1 or iteration >= 2
carries what its token saw of tokens that have since left the window. The two coincide on the
first block's first iteration only (a one-block model without loops rolls to exactly the
recomputed logits; deeper models differ, by an amount only a trained model can tell). Pass
`refill_keep=block_size` for the recomputed window. Models with `loop_state_init="noise"` never
roll: their evaluation noise is indexed by absolute position (< block_size), so they re-prefill.

Per-token adaptive exit (`adaptive_exit=True`, cached decoding only). The prompt prefill, and any
re-prefill, run the full `num_loops` iterations, except for a model with
`automatic_loop_exit_granularity="token"`, whose prefill exits per token (causally, so that
decoding equals a full forward pass with token exit); the criterion is the model's
`automatic_loop_exit_criterion`. Each new token then runs the loop runner's exit
rule on its own state: for each looped unit (the whole range when tied, each block when untied),
it stops at the first iteration t >= 2 with

    delta_t = ||s_t - s_(t-1)|| / (||s_(t-1)|| + 1e-6)   (L2 over channels, this token only)

below the threshold (`exit_threshold`, else the model's `automatic_loop_exit_threshold`), or at
`num_loops`. This is `blockloop.looping`'s per-sequence rule applied to a sequence of one new
token; rows of a batch exit independently. A token that stopped at iteration e < i is read by
later tokens at its last computed iteration: the buffer of (block, i) holds, at that token's
position, the K/V it produced in (block, e). (`LoopKVCache.advance` copies them forward.) The
logits therefore differ from a full forward pass with `loop_exit=True`, whose rule stops whole
sequences on the mean delta over all their tokens.

The cache's interface is what `GPT.forward` and the loop runner call: `past_length` (the
absolute position of the next token; it passes `block_size` when the cache rolls),
`get(block_idx, iteration)`, `advance(t)`, and `rows(active)` (the runner's hook: when some rows
have exited, the remaining iterations run on the active rows only), each layer's
`extend(k, v) -> (k_all, v_all, mask)` and `past_length` (RoPE rotates the new q, k with it).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path

import torch

from blockloop.checkpoint import find_run_checkpoint, load_model
from blockloop.errors import DivergedError, SampleError, one_line, run_command
from blockloop.evaluation import mean_iterations
from blockloop.looping import check_num_loops, is_looped
from blockloop.model import GPT, check_sampling_options, sample_next_token
from blockloop.runtime import resolve_device
from blockloop.tokenizers import (
    TokenizerUnavailableError,
    check_same_tokenizer,
    tokenizer_from_meta,
)

# nanoGPT's sample.py separates samples with this line.
SAMPLE_SEPARATOR = "---------------"


class LayerKVCache:
    """Keys and values of one (block, iteration) at every position so far, for a batch of rows."""

    def __init__(self, owner: "LoopKVCache"):
        self._owner = owner
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        # Which rows wrote their K/V for the positions of the current forward pass: rows that
        # exited earlier are filled in by `LoopKVCache.advance`.
        self.wrote_all = False
        self.wrote_rows: torch.Tensor | None = None

    def _allocate(self, like: torch.Tensor) -> None:
        _, h, _, d = like.shape
        shape = (self._owner.batch_size, h, self._owner.capacity, d)
        self.k = torch.zeros(shape, dtype=like.dtype, device=like.device)
        self.v = torch.zeros(shape, dtype=like.dtype, device=like.device)

    @property
    def past_length(self) -> int:
        """The absolute position of the first new token."""
        return self._owner.past_length

    def extend(self, k: torch.Tensor, v: torch.Tensor, rows: torch.Tensor | None = None):
        """Store the new positions' K/V; return (K, V) of all positions and the attention mask.

        `k`, `v`: (rows, heads, T, head_dim) for positions past .. past+T-1. The mask is None
        for a single new token (it may attend to every cached position and itself); otherwise a
        boolean (T, past+T) causal mask where True means "may attend". A rolling cache that is
        full returns its `block_size` entries in ring order (attention does not depend on the
        order of the keys). Raises ValueError when the new positions do not fit
        (`LoopKVCache.slots`).
        """
        past = self._owner.past_length
        t = k.shape[2]
        slots = self._owner.slots(t)
        held = min(past + t, self._owner.capacity)
        if self.k is None:
            self._allocate(k)
        if rows is None:
            self.k[:, :, slots] = k
            self.v[:, :, slots] = v
            k_all, v_all = self.k[:, :, :held], self.v[:, :, :held]
            self.wrote_all = True
        else:
            self.k[rows, :, slots] = k
            self.v[rows, :, slots] = v
            k_all, v_all = self.k[rows, :, :held], self.v[rows, :, :held]
            if self.wrote_rows is None:
                self.wrote_rows = torch.zeros(
                    self._owner.batch_size, dtype=torch.bool, device=k.device
                )
            self.wrote_rows[rows] = True
        if t == 1:
            mask = None
        else:  # several new tokens always fit without rolling (`slots`)
            mask = torch.ones(t, held, dtype=torch.bool, device=k.device).tril(diagonal=past)
        return k_all, v_all, mask

    def _fill_unwritten_from(self, prev: "LayerKVCache", slots: slice) -> None:
        """Rows that did not reach this iteration take the K/V of the previous iteration."""
        if self.wrote_all:
            return
        if self.k is None:
            self._allocate(prev.k)
        if self.wrote_rows is None:
            self.k[:, :, slots] = prev.k[:, :, slots]
            self.v[:, :, slots] = prev.v[:, :, slots]
        else:
            missing = (~self.wrote_rows).nonzero().squeeze(1)
            self.k[missing, :, slots] = prev.k[missing, :, slots]
            self.v[missing, :, slots] = prev.v[missing, :, slots]

    def _clear_marks(self) -> None:
        self.wrote_all = False
        self.wrote_rows = None


class _RowLayer:
    """A layer cache seen by a sub-batch: writes and reads rows `rows` only."""

    def __init__(self, layer: LayerKVCache, rows: torch.Tensor):
        self._layer = layer
        self._rows = rows

    @property
    def past_length(self) -> int:
        return self._layer.past_length

    def extend(self, k, v):
        return self._layer.extend(k, v, self._rows)


class _RowView:
    """`LoopKVCache.rows(active)`: the cache restricted to the rows still iterating."""

    def __init__(self, cache: "LoopKVCache", rows: torch.Tensor):
        self._cache = cache
        self._rows = rows

    def get(self, block_idx: int, iteration: int) -> _RowLayer:
        return _RowLayer(self._cache.get(block_idx, iteration), self._rows)


def can_roll(config) -> bool:
    """Whether a model's cache may roll past block_size (module docstring): rotary positions,
    and no "noise" state initialisation (its evaluation noise is per absolute position)."""
    noise_init = is_looped(config) and config.loop_state_init == "noise"
    return config.position_embedding == "rope" and not noise_init


class LoopKVCache:
    """One K/V buffer per (block, iteration) of a model, for `batch_size` rows.

    `rolling=True` (RoPE models, `can_roll`; ValueError otherwise): past block_size, a single
    new token overwrites the oldest entry instead of raising (the module docstring says what
    this computes). Each buffer holds at most block_size positions either way.
    """

    def __init__(self, model: GPT, batch_size: int, num_loops=None, rolling: bool = False):
        cfg = model.config
        plan = model.loop_plan
        if rolling and not can_roll(cfg):
            raise ValueError(
                "a rolling cache needs position_embedding='rope' (learned positions are "
                "absolute) and loop_state_init='input' (the noise init is per absolute position)"
            )
        self.rolling = rolling
        self.batch_size = batch_size
        self.capacity = cfg.block_size
        # Iterations per block: its group's count (num_loops: None, one int, or one per group).
        counts = {} if plan is None else {
            b: n for group, n in zip(plan.groups, plan.counts(num_loops)) for b in group.blocks
        }
        if any(n < 1 for n in counts.values()):
            raise ValueError(f"num_loops={num_loops}: must be >= 1")
        resolved = [1] if plan is None else plan.counts(num_loops)
        # The forward's num_loops: one int (one group, or a plain model), else one per group.
        self.num_loops = resolved[0] if len(resolved) == 1 else resolved
        self.iterations_of = counts
        self.looped_blocks = tuple(sorted(counts))
        self.layers: dict[tuple[int, int], LayerKVCache] = {}
        for b in range(cfg.n_layer):
            for i in range(1, counts.get(b, 1) + 1):
                self.layers[(b, i)] = LayerKVCache(self)
        self.past_length = 0

    def get(self, block_idx: int, iteration: int) -> LayerKVCache:
        """The buffer of block `block_idx` at `iteration` (1-based); ValueError if the cache
        was built for fewer iterations."""
        try:
            return self.layers[(block_idx, iteration)]
        except KeyError:
            raise ValueError(
                f"no cache for block {block_idx} at iteration {iteration}: this cache was built "
                f"for {self.num_loops} iteration(s); build it with the num_loops of the forward"
            ) from None

    def rows(self, rows: torch.Tensor) -> _RowView:
        """This cache restricted to batch rows `rows` (int64 (k,)), for the loop runner."""
        return _RowView(self, rows)

    def slots(self, t: int) -> slice:
        """The buffer entries of the next `t` positions: past .. past+t-1 while they fit; once a
        rolling cache is full, the ring slot of its one new token. ValueError otherwise."""
        past, cap = self.past_length, self.capacity
        if past + t <= cap:
            return slice(past, past + t)
        if self.rolling and t == 1:
            return slice(past % cap, past % cap + 1)
        if self.rolling:
            raise ValueError(
                f"a rolling KV cache past block_size={cap} takes one new token per forward pass, "
                f"got {t}"
            )
        raise ValueError(
            f"KV cache holds {past} positions; {t} more exceed block_size={cap}. Reset the cache "
            f"and prefill the last tokens again"
        )

    def advance(self, t: int) -> None:
        """Close a forward pass over `t` new positions: fill exited rows' later iterations."""
        slots = self.slots(t)
        for b in self.looped_blocks:
            # In increasing iteration order, so a row that stopped at e is copied e -> e+1 -> ...
            for i in range(2, self.iterations_of[b] + 1):
                self.layers[(b, i)]._fill_unwritten_from(self.layers[(b, i - 1)], slots)
        for layer in self.layers.values():
            layer._clear_marks()
        self.past_length += t

    def reset(self) -> None:
        """Forget every position (the buffers are kept and overwritten)."""
        self.past_length = 0
        for layer in self.layers.values():
            layer._clear_marks()


class _Decoder:
    """Feeds a batch of token streams through a model with a LoopKVCache and counts the work."""

    def __init__(self, model, batch_size, num_loops, adaptive_exit, exit_threshold, refill_keep):
        cfg = model.config
        self.model = model
        self.block_size = cfg.block_size
        keep = cfg.block_size if refill_keep is None else int(refill_keep)
        if not 1 <= keep <= cfg.block_size:
            raise ValueError(f"refill_keep={refill_keep}: must be in [1, block_size={cfg.block_size}]")
        self.refill_keep = keep
        # RoPE rolls unless a re-prefill window was asked for (module docstring).
        self.cache = LoopKVCache(model, batch_size, num_loops,
                                 rolling=refill_keep is None and can_roll(cfg))
        self.num_loops = self.cache.num_loops
        self.adaptive_exit = adaptive_exit
        self.exit_threshold = exit_threshold
        self.stats = _Counter(model, self.num_loops)

    def _forward(self, tokens, loop_exit, full):
        logits, _ = self.model(
            tokens,
            num_loops=self.num_loops,
            loop_exit=loop_exit,
            exit_threshold=self.exit_threshold,
            kv_caches=self.cache,
        )
        self.stats.count(self.model.last_loop_iterations, full=full)
        return logits[:, -1, :]

    @property
    def _prefill_exit(self) -> bool:
        # A token-granular model exits causally, so its prefill may exit per token too (and
        # then equals feeding the prompt one token at a time); otherwise prefills run full.
        granularity = self.model.config.automatic_loop_exit_granularity
        return self.adaptive_exit and granularity == "token"

    def prefill(self, context):
        """Empty the cache and process the last block_size tokens of `context`."""
        self.cache.reset()
        return self._forward(context[:, -self.block_size :], loop_exit=self._prefill_exit,
                             full=True)

    def feed(self, context):
        """Process the last token of `context` (all tokens so far); logits for the next one."""
        if self.cache.past_length >= self.block_size and not self.cache.rolling:
            self.cache.reset()
            return self._forward(context[:, -self.refill_keep :], loop_exit=self._prefill_exit,
                                 full=True)
        return self._forward(context[:, -1:], loop_exit=self.adaptive_exit, full=False)


class _Counter:
    """Loop iterations and block applications spent per produced logit row."""

    def __init__(self, model, num_loops):
        self.n_layer = model.config.n_layer
        self.units = [] if model.loop_plan is None else model.loop_plan.units
        self.num_loops = num_loops
        self.steps = 0
        self.cached_steps = 0
        self.full_forwards = 0
        self.iterations = 0.0
        self.block_applications = 0.0
        self.start = time.perf_counter()

    def count(self, unit_iterations, full: bool) -> None:
        self.steps += 1
        if full:
            self.full_forwards += 1
        else:
            self.cached_steps += 1
        if not self.units:
            self.iterations += 1.0
            self.block_applications += self.n_layer
            return
        self.iterations += mean_iterations(unit_iterations)
        per_unit = torch.stack([it.float() for it in unit_iterations])  # (units, rows)
        extra = sum(len(unit) * (per_unit[u] - 1) for u, unit in enumerate(self.units))
        self.block_applications += self.n_layer + extra.mean().item()

    def summary(self, device) -> dict:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - self.start
        # No token, no per-token figure (None, not NaN: nothing was measured).
        per_step = (lambda total: total / self.steps) if self.steps else (lambda _: None)
        return {
            "tokens": self.steps,
            "cached_steps": self.cached_steps,
            "full_forwards": self.full_forwards,
            "num_loops": self.num_loops,
            "mean_iterations": per_step(self.iterations),
            "mean_block_applications": per_step(self.block_applications),
            "seconds": seconds,
            "tokens_per_second": self.steps / seconds if seconds > 0 else float("inf"),
        }


@torch.no_grad()
def generate(
    model: GPT,
    idx: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    adaptive_exit: bool = False,
    exit_threshold: float | None = None,
    *,
    num_loops: int | None = None,
    refill_keep: int | None = None,
    vocab_limit: int | None = None,
) -> tuple[torch.Tensor, dict]:
    """Append `max_new_tokens` sampled tokens to `idx` (B, T); returns (tokens, stats).

    Sampling options are `sample_next_token`'s (temperature 0 greedy, top_k None or 0 = all,
    ids >= `vocab_limit` never drawn: pass the tokenizer's size for a padded vocabulary).
    Raises ValueError for bad options and DivergedError (a FloatingPointError) naming the
    token, looped unit and iteration where the loop state stopped being finite.

    `use_cache=False` recomputes the whole (cropped) context for every token, as nanoGPT's
    `GPT.generate` does. Both paths draw with `sample_next_token`, so with the same generator
    they sample the same tokens wherever their logits agree. Loops run `num_loops` iterations
    (default: the model's `max_loops`) with the config's automatic exit ignored, unless
    `adaptive_exit` asks for the per-token rule of the module docstring (cache only).
    Past block_size the cache re-prefills `refill_keep` tokens (default block_size: the
    recomputed window, exactly), except a RoPE model with `refill_keep=None`, whose cache rolls
    (sliding-window attention, one cached step per token; see the module docstring). A prompt
    longer than block_size is cropped to its last block_size tokens first, as nanoGPT does.

    stats: `tokens` (logit rows produced, one per new token), `cached_steps` (single-token
    forwards through the cache), `full_forwards` (prefills, re-prefills, or every step without
    cache), `num_loops`, `mean_iterations` (loop iterations spent on the position whose logits
    gave each new token, averaged over rows and looped units; prefills count `num_loops`; 1
    without looping),
    `mean_block_applications` (blocks applied to that position), `seconds`, `tokens_per_second`.
    """
    if idx.dim() != 2 or idx.shape[1] < 1:
        raise ValueError(f"idx must be (batch, length) with length >= 1, got shape {tuple(idx.shape)}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens}: must be >= 0")
    if adaptive_exit and not use_cache:
        raise ValueError(
            "adaptive exit is per token and needs the KV cache; drop use_cache=False (--no_cache)"
        )
    check_sampling_options(temperature, top_k)
    draw = functools.partial(_draw, model, temperature=temperature, top_k=top_k,
                             generator=generator, vocab_limit=vocab_limit)
    if not use_cache:
        return _generate_uncached(model, idx, max_new_tokens, draw, num_loops)
    decoder = _Decoder(model, idx.shape[0], num_loops, adaptive_exit, exit_threshold, refill_keep)
    if max_new_tokens == 0:
        return idx, decoder.stats.summary(idx.device)
    logits = decoder.prefill(idx)
    for n in range(max_new_tokens):
        idx_next = draw(logits, n)
        idx = torch.cat((idx, idx_next), dim=1)
        # The last token's own successor is never needed, so its forward is skipped.
        if n + 1 < max_new_tokens:
            logits = decoder.feed(idx)
    return idx, decoder.stats.summary(idx.device)


def _draw(model, logits, n, **options):
    """`sample_next_token` for the `n`-th new token; non-finite logits become a DivergedError
    that says where the loop broke (`LoopRunner.nonfinite_onset`)."""
    try:
        return sample_next_token(logits, **options)
    except FloatingPointError:
        onset = None if model.looper is None else model.looper.nonfinite_onset()
        where = "" if onset is None else (
            f"; the loop state first held NaN or infinity at iteration {onset[1]} of looped "
            f"unit {onset[0]}"
        )
        raise DivergedError(
            f"the logits of generated token {n + 1} are not finite{where}; the model was "
            f"trained with max_loops={model.config.max_loops}: run fewer iterations "
            f"(--num_loops)"
        ) from None


def _generate_uncached(model, idx, max_new_tokens, draw, num_loops):
    block_size = model.config.block_size
    loops = LoopKVCache(model, 0, num_loops).num_loops  # resolved, for the stats
    stats = _Counter(model, loops)
    for n in range(max_new_tokens):
        logits, _ = model(idx[:, -block_size:], num_loops=num_loops, loop_exit=False)
        stats.count(model.last_loop_iterations, full=True)
        idx_next = draw(logits[:, -1, :], n)
        idx = torch.cat((idx, idx_next), dim=1)
    return idx, stats.summary(idx.device)


@torch.no_grad()
def teacher_forced_logits(
    model: GPT,
    idx: torch.Tensor,
    prompt_length: int = 1,
    *,
    num_loops: int | None = None,
    adaptive_exit: bool = False,
    exit_threshold: float | None = None,
    refill_keep: int | None = None,
) -> tuple[torch.Tensor, dict]:
    """Decode the given tokens one by one through the cache, as generation would.

    The first `prompt_length` tokens are prefilled; then each token is fed alone. Returns logits
    (B, T - prompt_length, V) predicting idx[:, prompt_length:], and the stats of `generate`.
    With adaptive exit this measures what the per-token rule costs in loss on held-out text.
    """
    t = idx.shape[1]
    if not 1 <= prompt_length < t:
        raise ValueError(f"prompt_length={prompt_length}: must be in [1, {t - 1}] for {t} tokens")
    decoder = _Decoder(model, idx.shape[0], num_loops, adaptive_exit, exit_threshold, refill_keep)
    rows = [decoder.prefill(idx[:, :prompt_length])]
    for n in range(prompt_length + 1, t):
        rows.append(decoder.feed(idx[:, :n]))
    return torch.stack(rows, dim=1), decoder.stats.summary(idx.device)


# ----------------------------------------------------------------------------------------------
# the `blockloop sample` command


def build_parser() -> argparse.ArgumentParser:
    """The `blockloop sample` argument parser (options, defaults and help)."""
    p = argparse.ArgumentParser(
        prog="blockloop sample",
        description="Generate text from a checkpoint written by `blockloop train`.",
    )
    p.add_argument(
        "--out_dir", default="out",
        help="training output dir; reads best.pt, else last.pt (default: %(default)s)",
    )
    p.add_argument(
        "--start",
        default="\n",
        help="prompt text, or FILE:path to read it from a file; for synthetic-task models, "
        "token ids separated by spaces or commas (default: %(default)r)",
    )
    p.add_argument(
        "--num_samples", type=int, default=10, help="samples to draw (default: %(default)s)"
    )
    p.add_argument(
        "--max_new_tokens", type=int, default=500,
        help="tokens generated per sample (default: %(default)s)",
    )
    p.add_argument(
        "--temperature", type=float, default=0.8,
        help="<1 sharper, >1 flatter; 0 is greedy (default: %(default)s)",
    )
    p.add_argument(
        "--top_k", type=int, default=200,
        help="sample among the k likeliest; 0 = all (default: %(default)s)",
    )
    p.add_argument("--seed", type=int, default=1337, help="same seed, same text (default: %(default)s)")
    p.add_argument(
        "--device", default="auto",
        help="cpu, cuda, cuda:1, mps ...; auto = cuda if available (default: %(default)s)",
    )
    p.add_argument(
        "--num_loops", type=int, default=None,
        help="loop iterations (default: None = the model's max_loops)",
    )
    p.add_argument(
        "--adaptive_exit", action="store_true",
        help="per-token exit: each new token loops until its state stops changing "
        "(default: False)",
    )
    p.add_argument(
        "--exit_threshold", type=float, default=None,
        help="delta below which a token stops looping "
        "(default: None = the model's automatic_loop_exit_threshold)",
    )
    p.add_argument(
        "--no_cache", action="store_true",
        help="recompute the whole context per token, nanoGPT's way (default: False)",
    )
    p.add_argument(
        "--data_dir", default=None,
        help="the data directory the model was trained on, only for checkpoints written before "
        "checkpoints carried their tokenizer (default: the run's)",
    )
    p.add_argument(
        "--refill_keep", type=int, default=None,
        help="tokens re-prefilled when the context outgrows block_size "
        "(default: None = block_size, exact; smaller is faster; a RoPE model's cache rolls "
        "instead unless this is given)",
    )
    return p


class _IdCodec:
    """Synthetic-task models have no text: prompts and samples are token ids."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def encode(self, text: str) -> list[int]:
        try:
            ids = [int(s) for s in text.replace(",", " ").split()]
        except ValueError:
            raise SampleError(
                f"--start={text!r}: this is a synthetic-task model; give token ids separated by "
                f"spaces or commas"
            ) from None
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise SampleError(f"--start: token id {bad[0]} is outside [0, {self.vocab_size})")
        return ids

    def decode(self, ids) -> str:
        return " ".join(str(int(i)) for i in ids)


def _data_meta(path: Path) -> dict | None:
    """meta.json at `path` as a dict; None if absent; SampleError if unreadable."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise SampleError(f"tokenizer meta {path} is unreadable: {one_line(e)}") from None


def _tokenizer(meta: dict, vocab_size: int, data_dir: str | None = None):
    """The tokenizer the checkpoint was trained with: its own copy (written since checkpoints
    carry it), else the data directory's meta.json (`data_dir`, default the run's). A data
    directory whose meta.json no longer matches the checkpoint is named on stderr and not used."""
    if meta.get("task"):
        return _IdCodec(vocab_size)
    where = data_dir or meta.get("data_dir")
    current = _data_meta(Path(where) / "meta.json") if where else None
    if "tokenizer" in meta:
        spec = meta
        try:
            check_same_tokenizer(meta, current or meta, Path(str(where)) / "meta.json")
        except ValueError as e:
            print(f"note: {one_line(e)}; decoding with the checkpoint's own vocabulary",
                  file=sys.stderr)
    elif current is not None:
        spec = current
    else:
        raise SampleError(
            "tokenizer meta missing: this checkpoint does not carry its tokenizer and no "
            "meta.json was found"
            + (f" at {Path(where) / 'meta.json'}" if where else "")
            + "; pass --data_dir=<the data directory it was trained on>"
        )
    try:
        return tokenizer_from_meta(spec)
    except (ValueError, TokenizerUnavailableError) as e:
        raise SampleError(f"tokenizer: {e}") from None


def _check_args(args) -> None:
    if args.num_samples < 1:
        raise SampleError(f"--num_samples={args.num_samples}: must be >= 1")
    if args.max_new_tokens < 0:
        raise SampleError(f"--max_new_tokens={args.max_new_tokens}: must be >= 0")
    try:
        check_sampling_options(args.temperature, args.top_k)
    except ValueError as e:
        raise SampleError(f"--{e}") from None
    if args.exit_threshold is not None and not args.exit_threshold >= 0:
        raise SampleError(f"--exit_threshold={args.exit_threshold}: must be >= 0")
    if args.adaptive_exit and args.no_cache:
        raise SampleError("--adaptive_exit is per token and needs the KV cache; drop --no_cache")


def _check_model_args(args, model: GPT) -> None:
    """The options whose limits depend on the model; SampleError naming the option."""
    if args.num_loops is not None:
        try:
            check_num_loops(model.config, args.num_loops, "--num_loops")
        except ValueError as e:
            raise SampleError(str(e)) from None
    if args.refill_keep is not None and not 1 <= args.refill_keep <= model.config.block_size:
        raise SampleError(
            f"--refill_keep={args.refill_keep}: must be in [1, block_size={model.config.block_size}]"
        )


def _prompt_ids(start: str, tokenizer) -> list[int]:
    """`--start` (text, or FILE:path) encoded; SampleError if unreadable or empty."""
    if start.startswith("FILE:"):
        try:
            start = Path(start[5:]).read_text(encoding="utf-8")
        except OSError as e:
            raise SampleError(f"--start: cannot read {start[5:]}: {e.strerror or e}") from None
        except UnicodeDecodeError as e:
            raise SampleError(
                f"--start: {start[5:]} is not UTF-8 text (byte {e.start}); save the prompt as "
                f"UTF-8"
            ) from None
    try:
        ids = tokenizer.encode(start)
    except ValueError as e:
        raise SampleError(f"--start: {e}") from None
    if not ids:
        raise SampleError("--start encodes to no tokens; give at least one character")
    return ids


def _sample(args) -> None:
    """Load the run's model and print `--num_samples` samples (stats to stderr).
    Raises a BlockloopError (SampleError, ConfigError, CheckpointError) for what the user
    can fix."""
    _check_args(args)
    device = resolve_device(args.device)
    model, payload = load_model(find_run_checkpoint(args.out_dir), device)
    _check_model_args(args, model)
    tokenizer = _tokenizer(payload.get("meta") or {}, model.config.vocab_size, args.data_dir)
    ids = _prompt_ids(args.start, tokenizer)
    x = torch.tensor([ids], dtype=torch.long, device=device)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    for n in range(args.num_samples):
        y, stats = generate(
            model,
            x,
            args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k or None,
            generator=generator,
            use_cache=not args.no_cache,
            adaptive_exit=args.adaptive_exit,
            exit_threshold=args.exit_threshold,
            num_loops=args.num_loops,
            refill_keep=args.refill_keep,
            vocab_limit=tokenizer.vocab_size,
        )
        print(tokenizer.decode(y[0].tolist()))
        print(SAMPLE_SEPARATOR, flush=True)
        print(_stats_line(n, args.num_samples, stats), file=sys.stderr)


def _stats_line(n: int, total: int, stats: dict) -> str:
    """The stderr line after sample `n`: tokens, speed and mean loop iterations."""
    line = f"sample {n + 1}/{total}: {stats['tokens']} tokens"
    if stats["tokens"]:
        line += (
            f", {stats['tokens_per_second']:.1f} tokens/s, mean loop iterations "
            f"{stats['mean_iterations']:.2f} of {stats['num_loops']}"
        )
    return line


def main(argv: list[str] | None = None) -> int:
    """`blockloop sample`: 0 on success; a BlockloopError prints one `error: ...` line and
    returns its exit code (2 for bad input); argparse's usage errors return 2."""
    parser = build_parser()
    try:
        args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    except SystemExit as e:  # --help (0) or a usage error (2), already printed by argparse
        return int(e.code or 0)
    with torch.no_grad():
        return run_command(lambda: _sample(args))


if __name__ == "__main__":
    sys.exit(main())
