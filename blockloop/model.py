"""The GPT model: nanoGPT's architecture and parameter names, with a loopable middle.

`GPT` is the only model class. Its blocks before the looped range run once, the range itself is
handed to `blockloop.looping.LoopRunner`, and the blocks after it run once. With looping off
(`loop_center_idx = -1`) the forward pass is the plain nanoGPT stack, so a nanoGPT checkpoint
(same `transformer.*` / `lm_head` names) loads and gives the same logits.

Positions: learned absolute embeddings (`wpe`, nanoGPT's and GPT-2's, the default) or rotary
embeddings (`position_embedding = "rope"`, `RotaryEmbedding`): q and k of every head are rotated
by their token's position in every attention call, so an attention score depends on the distance
between two tokens only, and the model has no position parameters.

Dropout (`dropout` > 0, training only) is `blockloop.dropout`'s: on CPU it draws its masks faster
than torch's and runs causal attention with dropout in query blocks; elsewhere it is torch's.

`GPTConfig` validates itself on construction: a bad value raises `ValueError` naming the key.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from blockloop.dropout import Dropout, causal_attention
from blockloop.looping import (
    LoopPlan,
    LoopRunner,
    effective_depth,
    unit_has_adapter,
    validate_loop_keys,
)

GELU_APPROXIMATIONS = ("none", "tanh")
POSITION_EMBEDDINGS = ("learned", "rope")
DEFAULT_ROPE_BASE = 10000.0


@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50304  # GPT-2's 50257 padded to a multiple of 64, as nanoGPT does
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True
    # nn.GELU's `approximate`: "none" (exact, nanoGPT) or "tanh" (GPT-2's "gelu_new", which
    # imported GPT-2 weights need to reproduce Hugging Face's logits).
    gelu_approximate: str = "none"
    # "learned" (nanoGPT's wpe, the default) or "rope" (rotary, no position parameters); the
    # RoPE frequencies are rope_base ** (-2i / head_size).
    position_embedding: str = "learned"
    rope_base: float = DEFAULT_ROPE_BASE
    # Looping (see README "Looping" and blockloop/looping.py for the exact semantics).
    loop_center_idx: int = -1
    loop_radius: int = 0
    max_loops: int = 1
    tied_looping: bool = True
    loop_input_injection: str = "none"
    concatenate_initial_representation: bool = False
    loop_noise_scale: float = 0.0
    loop_noise_in_eval: bool = False
    automatic_loop_exit: bool = False
    automatic_loop_exit_threshold: float = 1e-3
    automatic_loop_exit_in_training: bool = False
    loops_representation: bool = False
    loop_sampling: str = "fixed"
    # Each training step's count (the mean of sampled ones): "constant", "progressive" or
    # "curriculum" over the first loop_schedule_fraction of max_iters (looping.scheduled_counts).
    loop_schedule: str = "constant"
    loop_schedule_fraction: float = 0.5
    loop_backprop_depth: int = 0
    loop_checkpointing: bool = False
    # Second-generation looping (blockloop.looping's docstring has the formulas).
    loop_groups: list = field(default_factory=list)  # [[first, last], ...]; or centre/radius
    loop_counts: list = field(default_factory=list)  # per group; default max_loops each
    loop_state_init: str = "input"  # "input" (s0 = x0 + noise) or "noise" (s0 = noise)
    loop_state_norm: str = "none"  # "none" or "layernorm" (on the state entering an iteration)
    automatic_loop_exit_criterion: str = "relative_change"  # or "kl", "entropy", "delta_change"
    automatic_loop_exit_granularity: str = "sequence"  # or "token" (causal)

    def __post_init__(self):
        self.validate()

    @property
    def injection_mode(self) -> str:
        """The resolved injection mode (`concatenate_initial_representation` means "concat")."""
        if self.concatenate_initial_representation:
            return "concat"
        return self.loop_input_injection

    def validate(self) -> None:
        check_field_types(self)
        for key in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key}={getattr(self, key)}: must be a positive integer")
        if self.n_embd % self.n_head != 0:
            raise ValueError(
                f"n_embd={self.n_embd} must be divisible by n_head={self.n_head} "
                f"(each head gets n_embd/n_head channels)"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout}: must be in [0, 1)")
        if self.gelu_approximate not in GELU_APPROXIMATIONS:
            raise ValueError(
                f"gelu_approximate={self.gelu_approximate!r}: must be one of "
                f"{', '.join(repr(m) for m in GELU_APPROXIMATIONS)}"
            )
        self._validate_positions()
        validate_loop_keys(self)

    def _validate_positions(self) -> None:
        if self.position_embedding not in POSITION_EMBEDDINGS:
            raise ValueError(
                f"position_embedding={self.position_embedding!r}: must be one of "
                f"{', '.join(repr(m) for m in POSITION_EMBEDDINGS)}"
            )
        if not (math.isfinite(self.rope_base) and self.rope_base > 1):
            raise ValueError(f"rope_base={self.rope_base}: must be a finite number > 1")
        if self.position_embedding == "learned" and self.rope_base != DEFAULT_ROPE_BASE:
            raise ValueError(
                f"rope_base={self.rope_base} is only used with position_embedding='rope'; "
                f"drop it or set position_embedding='rope'"
            )
        if self.position_embedding == "rope" and (self.n_embd // self.n_head) % 2:
            raise ValueError(
                f"position_embedding='rope' rotates channel pairs: the head size n_embd/n_head="
                f"{self.n_embd // self.n_head} must be even"
            )

    def to_dict(self) -> dict:
        return asdict(self)


ARCHITECTURE_KEYS = (
    "block_size", "vocab_size", "n_layer", "n_head", "n_embd", "dropout", "bias",
    "gelu_approximate", "position_embedding", "rope_base",
)
# Keys that change how the stack is iterated, not its weights: they may be switched on when
# loading pretrained weights.
LOOP_KEYS = tuple(f.name for f in fields(GPTConfig) if f.name not in ARCHITECTURE_KEYS)


_FIELD_TYPES = {"int": int, "float": float, "bool": bool, "str": str, "list": list}


def check_field_types(obj, error: type[Exception] = ValueError) -> None:
    """Raise `error` naming the first field of dataclass `obj` whose value has the wrong type.

    The one type checker for every config: an int is accepted where a float is expected, a bool
    is never taken for a number.
    """
    for f in fields(obj):
        name = f.type if isinstance(f.type, str) else f.type.__name__
        expected, value = _FIELD_TYPES[name], getattr(obj, f.name)
        if expected is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        elif expected is int:
            ok = isinstance(value, int) and not isinstance(value, bool)
        else:
            ok = isinstance(value, expected)
        if not ok:
            raise error(f"{f.name}={value!r}: must be of type {name}")


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (PyTorch's has no bias=False before 2.1's `bias` arg)."""

    def __init__(self, ndim: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class RotaryEmbedding:
    """Rotary position embedding (RoPE): Su et al. 2021, "RoFormer: Enhanced Transformer with
    Rotary Position Embedding", arXiv:2104.09864.

    Channel pair (i, i + d/2) of a head of size d, at position p, is rotated by the angle
    p * theta_i, theta_i = base ** (-2i / d), i = 0 .. d/2 - 1. This is the GPT-NeoX / LLaMA
    layout; RoFormer pairs adjacent channels (2i, 2i + 1), which is the same map up to a fixed
    permutation of a head's channels (absorbed by the learned q/k projections). Then
    rot(q, p) . rot(k, p') depends on p - p' only.

    Angles are computed in float64 and rounded once to the tensors' dtype, so a key rotated at
    position 10_000 is as precise as one at position 0 (a float32 product p * theta would lose
    about p * 1e-7 radians). Positions 0 .. table_size-1 come from a table built once per
    (device, dtype); later ones (generation past block_size) are computed on demand. Holds no
    parameters and no buffers: nothing of it is in a state dict.
    """

    def __init__(self, head_size: int, base: float, table_size: int):
        self.head_size, self.base, self.table_size = head_size, float(base), table_size
        self._tables = {}
        self._recent = None  # ((start, length, device, dtype), (cos, sin)) beyond the table

    def _angles(self, start: int, length: int, device, dtype):
        # float64 is unavailable on some backends (MPS): those get the angles from the CPU.
        where = device if device.type in ("cpu", "cuda") else torch.device("cpu")
        half = torch.arange(0, self.head_size, 2, dtype=torch.float64, device=where)
        theta = self.base ** (-half / self.head_size)
        pos = torch.arange(start, start + length, dtype=torch.float64, device=where)
        angles = pos[:, None] * theta[None, :]
        return (angles.cos().to(device=device, dtype=dtype),
                angles.sin().to(device=device, dtype=dtype))

    def cos_sin(self, start: int, length: int, device, dtype):
        """cos and sin of the angles of positions start .. start+length-1: (length, d/2) each."""
        if start + length <= self.table_size:
            key = (device, dtype)
            if key not in self._tables:
                self._tables[key] = self._angles(0, self.table_size, device, dtype)
            cos, sin = self._tables[key]
            return cos[start: start + length], sin[start: start + length]
        key = (start, length, device, dtype)
        # One decoding step asks for the same position in every layer and iteration.
        if self._recent is None or self._recent[0] != key:
            self._recent = (key, self._angles(start, length, device, dtype))
        return self._recent[1]

    def __call__(self, q: torch.Tensor, k: torch.Tensor, start: int):
        """q, k (B, H, T, d) at positions start .. start+T-1 -> both rotated, same shapes."""
        cos, sin = self.cos_sin(start, q.shape[2], q.device, q.dtype)
        return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, rotary: RotaryEmbedding | None = None):
        super().__init__()
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.attn_dropout_p = config.dropout
        self.resid_dropout = Dropout(config.dropout)
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.rotary = rotary

    def forward(self, x, kv_cache=None):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        if self.rotary is not None:
            # The new tokens' absolute positions: a cache knows how many came before them.
            q, k = self.rotary(q, k, 0 if kv_cache is None else kv_cache.past_length)
        dropout_p = self.attn_dropout_p if self.training else 0.0
        if kv_cache is None:
            y = causal_attention(q, k, v, dropout_p)
        else:
            k, v, mask = kv_cache.extend(k, v)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate=config.gelu_approximate)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config: GPTConfig, rotary: RotaryEmbedding | None = None):
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config, rotary)
        self.ln_2 = LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, kv_cache=None):
        x = x + self.attn(self.ln_1(x), kv_cache)
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config  # validated when it was constructed
        # One rotary table shared by every attention (RoPE); learned positions are `wpe`.
        self.rotary = None
        modules = dict(wte=nn.Embedding(config.vocab_size, config.n_embd))
        if config.position_embedding == "rope":
            self.rotary = RotaryEmbedding(config.n_embd // config.n_head, config.rope_base,
                                          config.block_size)
        else:
            modules["wpe"] = nn.Embedding(config.block_size, config.n_embd)
        # nanoGPT's module order (wte, wpe, drop, h, ln_f): the initialisation draws follow it.
        modules.update(
            drop=Dropout(config.dropout),
            h=nn.ModuleList([Block(config, self.rotary) for _ in range(config.n_layer)]),
            ln_f=LayerNorm(config.n_embd, bias=config.bias),
        )
        self.transformer = nn.ModuleDict(modules)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # Weight tying: the token embedding is the output projection (nanoGPT, GPT-2).
        self.transformer.wte.weight = self.lm_head.weight
        self.loop_plan = LoopPlan.from_config(config)
        self.looper = LoopRunner(config, self.loop_plan) if self.loop_plan is not None else None

        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
        if self.looper is not None:
            self.looper.reset_adapters()
        self.last_loop_trace = None
        self.last_loop_iterations = None

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def get_num_params(self, non_embedding: bool = True) -> int:
        """Unique parameters (a looped block counts once). Position embeddings are left out by
        default, as in nanoGPT; the token embedding stays in because it is also the output head."""
        n_params = sum(p.numel() for p in self.parameters())
        if non_embedding and self.rotary is None:
            n_params -= self.transformer.wpe.weight.numel()
        return n_params

    def default_num_loops(self) -> int:
        return self.config.max_loops

    def effective_depth(self, num_loops: int | None = None) -> int:
        """Blocks applied per forward pass when the looped range runs `num_loops` times."""
        return effective_depth(self.config, num_loops)

    def flops_per_token(self, num_loops=None, backprop_loops=None, training: bool = True) -> float:
        """Matmul FLOPs per token (nanoGPT's PaLM-style estimate), counting every iteration run.

        Forward: 2 FLOPs per parameter applied (a looped block counts once per iteration) plus
        attention scores, 4 * n_embd * block_size per block application. Backward costs twice
        the forward of what carries gradients: with truncated backprop only the last
        `backprop_loops` iterations of each loop do, and without injection nothing before a
        truncated loop does. `num_loops` (and `backprop_loops`) may be a mean (random counts,
        automatic exit), one number for every group, or a list per group.
        """
        cfg = self.config
        n_block = sum(p.numel() for p in self.transformer.h[0].parameters())
        per_block = 2 * n_block + 4 * cfg.n_embd * cfg.block_size
        base = 2 * (self.lm_head.weight.numel()
                    + sum(p.numel() for p in self.transformer.ln_f.parameters()))
        if self.loop_plan is None:
            forward = base + cfg.n_layer * per_block
            return 3 * forward if training else forward
        groups = self.loop_plan.groups
        t = self._per_group(num_loops, [g.count for g in groups])
        outside = cfg.n_layer - self.loop_plan.num_blocks
        forward = base + outside * per_block + sum(
            self._group_flops(g, i, t[i], t[i], per_block) for i, g in enumerate(groups)
        )
        if not training:
            return forward
        depth = cfg.loop_backprop_depth
        b = self._per_group(backprop_loops, [ti if depth == 0 else min(ti, depth) for ti in t])
        # Without injection, truncation cuts the only path back to the blocks before a loop.
        cut = max((i for i in range(len(groups)) if b[i] < t[i] and cfg.injection_mode == "none"),
                  default=None)
        first = 0 if cut is None else groups[cut].first
        looped_after = sum(len(g.blocks) for g in groups if g.first >= first)
        grad = base + (cfg.n_layer - first - looped_after) * per_block + sum(
            self._group_flops(g, i, t[i], b[i], per_block)
            for i, g in enumerate(groups) if g.first >= first
        )
        return forward + 2 * grad

    @staticmethod
    def _per_group(value, default: list) -> list[float]:
        if value is None:
            return [float(v) for v in default]
        if isinstance(value, (list, tuple)):
            return [float(v) for v in value]
        return [float(value)] * len(default)

    def _group_flops(self, group, index: int, t: float, b: float, per_block: float) -> float:
        """Forward FLOPs of loop group `index` for the `b` of its `t` iterations counted."""
        units = 1 if self.loop_plan.tied else len(group.blocks)
        adapter = 0.0
        if self.looper.adapters is not None and unit_has_adapter(self.config, index):
            adapter = 2 * self.looper.adapter_params_per_unit()
        # The adapter runs from the second iteration on ("input" init), or from the first.
        skip = 0 if self.config.loop_state_init == "noise" else 1
        adapter_iterations = max(min(b, t - skip), 0)
        return b * len(group.blocks) * per_block + adapter_iterations * units * adapter

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        num_loops: int | None = None,
        loop_exit: bool | None = None,
        exit_threshold: float | None = None,
        kv_caches=None,
        exit_granularity: str | None = None,
        trace: bool | None = None,
    ):
        """Returns `(logits, loss)`. Without targets, logits for the last position only.

        `num_loops` (an int for every loop group, or a list per group), `loop_exit`,
        `exit_threshold`, `exit_granularity` and `trace` (record `last_loop_trace`) override the
        config for this call (the
        config itself is read at construction and not meant to be mutated); `kv_caches` is the
        generation cache from `blockloop.sampling`.
        """
        b, t = idx.size()
        if t > self.config.block_size:
            raise ValueError(
                f"sequence length {t} exceeds block_size={self.config.block_size}"
            )
        x = self.embed(idx, 0 if kv_caches is None else kv_caches.past_length)
        blocks = self.transformer.h
        if self.looper is None:
            for i, block in enumerate(blocks):
                x = block(x, None if kv_caches is None else kv_caches.get(i, 1))
            self.last_loop_trace = None
            self.last_loop_iterations = None
        else:
            x, iterations, trace = self.looper(
                x, blocks, num_loops=num_loops, loop_exit=loop_exit,
                exit_threshold=exit_threshold, kv_caches=kv_caches, lens=self.logit_lens,
                exit_granularity=exit_granularity, trace=trace,
            )
            self.last_loop_trace = trace
            self.last_loop_iterations = iterations
        if kv_caches is not None:
            kv_caches.advance(t)
        x = self.transformer.ln_f(x)
        if targets is not None:
            logits = self.lm_head(x)
            loss = F.cross_entropy(
                logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1
            )
        else:
            logits = self.lm_head(x[:, [-1], :])
            loss = None
        return logits, loss

    def embed(self, idx: torch.Tensor, past: int = 0) -> torch.Tensor:
        """The residual stream entering block 0 for token ids idx (B, T) at positions past ..
        past+T-1: drop(wte(idx) + wpe(pos)), or drop(wte(idx)) with RoPE (positions then act in
        attention) -> (B, T, C)."""
        if self.rotary is not None:
            return self.transformer.drop(self.transformer.wte(idx))
        pos = torch.arange(past, past + idx.shape[1], dtype=torch.long, device=idx.device)
        return self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))

    def logit_lens(self, x):
        """ln_f and lm_head applied to a residual stream x (B, L, C) -> logits (B, L, V)."""
        return self.lm_head(self.transformer.ln_f(x))

    def continue_after_unit(self, x, unit_index: int, num_loops=None):
        """The residual stream entering ln_f if looped unit `unit_index` had output `x`
        (B, L, C): the later units at `num_loops` iterations (no automatic exit) and the blocks
        after them. Used by analysis (the logit lens "continue" loss)."""
        x, _, _ = self.looper(x, self.transformer.h, num_loops=num_loops, loop_exit=False,
                              start_unit=unit_index + 1)
        return x

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        """AdamW with weight decay on matrices (>= 2-D) only, as nanoGPT does.

        The concat adapters are residual (`s + W[s; x0]`, W starting at zero), so decay pulls
        them towards pass-through, which is the behaviour we want to regularise towards. On
        CUDA and CPU the fused kernel runs the update (nanoGPT fuses on CUDA only): on the CPU
        baby model it took 1.2 ms per step against 5.7 ms for the multi-tensor path
        (BENCHMARKS.md). It is not bit-identical to the multi-tensor path, only equal to
        float rounding.
        """
        params = [p for p in self.parameters() if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        groups = [
            {"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        fused = device_type in ("cuda", "cpu")
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=fused or None)

    def estimate_mfu(self, tokens_per_second: float, peak_flops: float, num_loops=None) -> float:
        return self.flops_per_token(num_loops) * tokens_per_second / peak_flops

    @torch.no_grad()
    def crop_block_size(self, block_size: int) -> None:
        if block_size > self.config.block_size:
            raise ValueError(
                f"block_size={block_size} is larger than the model's {self.config.block_size}"
            )
        self.config.block_size = block_size
        if self.rotary is None:  # RoPE has no table of positions to cut
            self.transformer.wpe.weight = nn.Parameter(self.transformer.wpe.weight[:block_size])

    @torch.no_grad()
    def generate(
        self, idx, max_new_tokens, temperature=1.0, top_k=None, generator=None, vocab_limit=None
    ):
        """nanoGPT's generation loop without a cache (the reference for the cached sampler).

        `idx` int64 (B, L) -> (B, L + max_new_tokens); the sampling options are
        `sample_next_token`'s.
        """
        for _ in range(max_new_tokens):
            idx_cond = idx if idx.size(1) <= self.config.block_size else idx[:, -self.config.block_size :]
            logits, _ = self(idx_cond)
            idx_next = sample_next_token(
                logits[:, -1, :], temperature, top_k, generator, vocab_limit
            )
            idx = torch.cat((idx, idx_next), dim=1)
        return idx


def check_sampling_options(temperature, top_k) -> None:
    """Raise ValueError unless temperature is a finite number >= 0 (0 = greedy) and top_k is
    None or an integer >= 0 (None and 0 both mean no top-k)."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not (
        math.isfinite(temperature) and temperature >= 0
    ):
        raise ValueError(f"temperature={temperature!r}: must be a finite number >= 0 (0 = greedy)")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0):
        raise ValueError(f"top_k={top_k!r}: must be an integer >= 0 (0 or None = no top-k)")


def sample_next_token(logits, temperature=1.0, top_k=None, generator=None, vocab_limit=None):
    """One token id per row from last-position logits `(B, V)` -> int64 `(B, 1)`.

    temperature 0 is greedy (argmax); top_k None or 0 keeps every id; ids >= `vocab_limit` are
    never chosen (a padded vocabulary, as nanoGPT's 50304 for GPT-2's 50257, has ids the
    tokenizer cannot decode). Raises ValueError for bad options (`check_sampling_options`) and
    FloatingPointError when a row's logits are not finite (a diverged model), rather than
    returning the argmax of NaN.
    """
    check_sampling_options(temperature, top_k)
    if vocab_limit is not None and vocab_limit < logits.size(-1):
        logits = logits.clone()
        logits[..., vocab_limit:] = -float("inf")
    allowed = logits[..., :vocab_limit] if vocab_limit is not None else logits
    if not bool(torch.isfinite(allowed).all()):
        raise FloatingPointError("the model's logits are not finite (NaN or infinity)")
    if temperature == 0:
        return torch.argmax(logits, dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k:
        v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
        logits = logits.masked_fill(logits < v[:, [-1]], -float("inf"))
    probs = F.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)
