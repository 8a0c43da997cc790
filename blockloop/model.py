"""The GPT model: nanoGPT's architecture and parameter names, with a loopable middle.

`GPT` is the only model class. Its blocks before the looped range run once, the range itself is
handed to `blockloop.looping.LoopRunner`, and the blocks after it run once. With looping off
(`loop_center_idx = -1`) the forward pass is the plain nanoGPT stack, so a nanoGPT checkpoint
(same `transformer.*` / `lm_head` names) loads and gives the same logits.

`GPTConfig` validates itself on construction: a bad value raises `ValueError` naming the key.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from blockloop.looping import (
    INJECTION_MODES,
    LOOP_SAMPLING_MODES,
    MAX_LOOPS_LIMIT,
    LoopPlan,
    LoopRunner,
    effective_depth,
)

GELU_APPROXIMATIONS = ("none", "tanh")


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
    loop_backprop_depth: int = 0
    loop_checkpointing: bool = False

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
        if self.loop_center_idx < -1:
            raise ValueError(
                f"loop_center_idx={self.loop_center_idx}: must be -1 (no looping) "
                f"or a block index in [0, {self.n_layer})"
            )
        if self.loop_radius < 0:
            raise ValueError(f"loop_radius={self.loop_radius}: must be >= 0")
        if self.loop_center_idx >= 0:
            lo = self.loop_center_idx - self.loop_radius
            hi = self.loop_center_idx + self.loop_radius
            if lo < 0 or hi >= self.n_layer:
                raise ValueError(
                    f"loop_center_idx={self.loop_center_idx}, loop_radius={self.loop_radius}: "
                    f"the looped range is blocks {lo}..{hi}, which leaves [0, {self.n_layer}) "
                    f"(n_layer={self.n_layer}); choose a centre and radius with "
                    f"radius <= centre <= n_layer - 1 - radius"
                )
        if not 1 <= self.max_loops <= MAX_LOOPS_LIMIT:
            raise ValueError(f"max_loops={self.max_loops}: must be in [1, {MAX_LOOPS_LIMIT}]")
        if self.loop_input_injection not in INJECTION_MODES:
            raise ValueError(
                f"loop_input_injection={self.loop_input_injection!r}: must be one of "
                f"{', '.join(repr(m) for m in INJECTION_MODES)}"
            )
        if self.concatenate_initial_representation and self.loop_input_injection not in (
            "none",
            "concat",
        ):
            raise ValueError(
                "concatenate_initial_representation=True asks for 'concat' injection, but "
                f"loop_input_injection={self.loop_input_injection!r}; set only one of them"
            )
        for key in ("loop_noise_scale", "automatic_loop_exit_threshold"):
            value = getattr(self, key)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{key}={value}: must be a finite number >= 0")
        if self.loop_sampling not in LOOP_SAMPLING_MODES:
            raise ValueError(
                f"loop_sampling={self.loop_sampling!r}: must be one of "
                f"{', '.join(repr(m) for m in LOOP_SAMPLING_MODES)}"
            )
        if self.loop_backprop_depth < 0:
            raise ValueError(
                f"loop_backprop_depth={self.loop_backprop_depth}: must be >= 0 "
                f"(0 backpropagates through every iteration)"
            )
        if self.loop_backprop_depth > 0 and self.automatic_loop_exit_in_training:
            # The gradient window is the last k of the planned iterations; exiting earlier could
            # leave no iteration carrying gradient at all.
            raise ValueError(
                "loop_backprop_depth > 0 cannot be combined with "
                "automatic_loop_exit_in_training=True; use one of them"
            )

    def to_dict(self) -> dict:
        return asdict(self)


ARCHITECTURE_KEYS = (
    "block_size", "vocab_size", "n_layer", "n_head", "n_embd", "dropout", "bias",
    "gelu_approximate",
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


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.attn_dropout_p = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.n_embd = config.n_embd

    def forward(self, x, kv_cache=None):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        dropout_p = self.attn_dropout_p if self.training else 0.0
        if kv_cache is None:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
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
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
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
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                ln_f=LayerNorm(config.n_embd, bias=config.bias),
            )
        )
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
        if non_embedding:
            n_params -= self.transformer.wpe.weight.numel()
        return n_params

    def default_num_loops(self) -> int:
        return self.config.max_loops

    def effective_depth(self, num_loops: int | None = None) -> int:
        """Blocks applied per forward pass when the looped range runs `num_loops` times."""
        return effective_depth(self.config, num_loops)

    def flops_per_token(
        self,
        num_loops: float | None = None,
        backprop_loops: float | None = None,
        training: bool = True,
    ) -> float:
        """Matmul FLOPs per token (nanoGPT's PaLM-style estimate), counting every iteration run.

        Forward: 2 FLOPs per parameter applied (a looped block counts once per iteration) plus
        attention scores, 4 * n_embd * block_size per block application. Backward costs twice
        the forward of what carries gradients: with truncated backprop only the last
        `backprop_loops` iterations of the loop do. `num_loops` may be a mean (random counts or
        automatic exit).
        """
        cfg = self.config
        t = float(cfg.max_loops if num_loops is None else num_loops)
        n_block = sum(p.numel() for p in self.transformer.h[0].parameters())
        n_head_and_norm = self.lm_head.weight.numel() + sum(
            p.numel() for p in self.transformer.ln_f.parameters()
        )
        attn_per_block = 4 * cfg.n_embd * cfg.block_size
        per_block_forward = 2 * n_block + attn_per_block
        base_forward = 2 * n_head_and_norm
        if self.loop_plan is None:
            forward = base_forward + cfg.n_layer * per_block_forward
            return 3 * forward if training else forward
        k = self.loop_plan.num_blocks
        outside = cfg.n_layer - k
        adapter_forward = 2 * self.looper.adapter_params_per_unit()
        units = len(self.loop_plan.units)
        loop_forward_per_iter = k * per_block_forward
        # The adapter runs from the second iteration on, once per unit.
        forward = (
            base_forward
            + outside * per_block_forward
            + t * loop_forward_per_iter
            + max(t - 1, 0) * units * adapter_forward
        )
        if not training:
            return forward
        depth = cfg.loop_backprop_depth
        if backprop_loops is None:
            backprop_loops = t if depth == 0 else min(t, depth)
        b = float(backprop_loops)
        # Without injection, truncation cuts the only path back to the blocks before the loop.
        reaches_before = b >= t or self.config.injection_mode != "none"
        outside_with_grad = outside if reaches_before else outside - self.loop_plan.start
        grad_forward = (
            base_forward
            + outside_with_grad * per_block_forward
            + b * loop_forward_per_iter
            + max(min(b, t - 1), 0) * units * adapter_forward
        )
        return forward + 2 * grad_forward

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        num_loops: int | None = None,
        loop_exit: bool | None = None,
        exit_threshold: float | None = None,
        kv_caches=None,
    ):
        """Returns `(logits, loss)`. Without targets, logits for the last position only.

        `num_loops`, `loop_exit` and `exit_threshold` override the config for this call (the
        config itself is read at construction and not meant to be mutated); `kv_caches` is the
        generation cache from `blockloop.sampling`.
        """
        b, t = idx.size()
        if t > self.config.block_size:
            raise ValueError(
                f"sequence length {t} exceeds block_size={self.config.block_size}"
            )
        past = 0 if kv_caches is None else kv_caches.past_length
        pos = torch.arange(past, past + t, dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        blocks = self.transformer.h
        if self.looper is None:
            for i, block in enumerate(blocks):
                x = block(x, None if kv_caches is None else kv_caches.get(i, 1))
            self.last_loop_trace = None
            self.last_loop_iterations = None
        else:
            plan = self.loop_plan
            for i in range(plan.start):
                x = blocks[i](x, None if kv_caches is None else kv_caches.get(i, 1))
            x, iterations, trace = self.looper(
                x,
                blocks,
                num_loops=num_loops,
                loop_exit=loop_exit,
                exit_threshold=exit_threshold,
                kv_caches=kv_caches,
            )
            for i in range(plan.stop, self.config.n_layer):
                x = blocks[i](x, None if kv_caches is None else kv_caches.get(i, 1))
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

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        """AdamW with weight decay on matrices (>= 2-D) only, as nanoGPT does.

        The concat adapters are residual (`s + W[s; x0]`, W starting at zero), so decay pulls
        them towards pass-through, which is the behaviour we want to regularise towards.
        """
        params = [p for p in self.parameters() if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        groups = [
            {"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        extra = {}
        if device_type == "cuda":
            extra["fused"] = True
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, **extra)

    def estimate_mfu(self, tokens_per_second: float, peak_flops: float, num_loops=None) -> float:
        return self.flops_per_token(num_loops) * tokens_per_second / peak_flops

    @torch.no_grad()
    def crop_block_size(self, block_size: int) -> None:
        if block_size > self.config.block_size:
            raise ValueError(
                f"block_size={block_size} is larger than the model's {self.config.block_size}"
            )
        self.config.block_size = block_size
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
