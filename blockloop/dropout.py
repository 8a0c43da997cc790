"""Dropout that is fast on CPU: the residual/embedding dropout and causal attention with dropout.

On CPU, torch's dropout spends most of its time drawing the mask: `bernoulli_` produced about
71 million draws per second on the 2-core development machine, against about 178 million 31-bit
integers per second from `random_()` on the same generator (`bench_training.bench_dropout`).
With nanoGPT's Shakespeare dropout of 0.2 at 6x384 the draws were about a sixth of a training
step (BENCHMARKS.md). So on CPU the mask here is drawn as integers and compared with a
threshold; elsewhere (CUDA, where the fused kernels are fast) and under `torch.compile` (whose
generated code draws its own random numbers; the integer draw here would break the graph at every
dropout) torch's own dropout and `scaled_dot_product_attention` run.

The mask keeps an element with probability 1 - p' where p' = round(p * 2**31) / 2**31 (|p' - p|
<= 2**-32, finer than a float32 uniform draw) and scales kept elements by 1 / (1 - p), as
`torch.nn.functional.dropout` does (Srivastava et al. 2014, "Dropout", inverted scaling). Draws
come from torch's default CPU generator, so `torch.manual_seed` and a resumed generator state
reproduce them; they are not the same draws as torch's own dropout.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

_RANDOM_BITS = 31  # int32 `random_()` draws uniformly from [0, 2**31)
# Rows of queries per score block in `_BlockCausalAttention` (64 measured fastest of 32/64/128/256
# at T = 256, 6x384, BENCHMARKS.md).
QUERY_BLOCK = 64


def _fast_cpu_path(x: torch.Tensor) -> bool:
    """Whether the integer-threshold mask serves `x`: eager CPU only (module docstring)."""
    return x.device.type == "cpu" and not torch.compiler.is_compiling()


def _keep_mask(shape: torch.Size, p: float) -> torch.Tensor:
    """A bool CPU tensor of `shape`, each element True with probability 1 - p (see module)."""
    bits = torch.empty(shape, dtype=torch.int32).random_()
    return bits >= round(p * 2**_RANDOM_BITS)


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Inverted dropout of `x` (any shape): zero each element with probability p, scale the rest
    by 1 / (1 - p); `x` itself when not training or p == 0. Same shape and dtype as `x`.
    p must lie in [0, 1) (`GPTConfig` checks `dropout`; p == 1 would divide by zero here).
    Eager CPU tensors use the integer-threshold mask (module docstring); others `F.dropout`."""
    if not training or p == 0.0:
        return x
    if not _fast_cpu_path(x):
        return F.dropout(x, p, training=True)
    # mul_ on the product is safe for autograd: mul's backward keeps the mask, not its output.
    return (x * _keep_mask(x.shape, p)).mul_(1.0 / (1.0 - p))


class Dropout(nn.Module):
    """`nn.Dropout(p)` with the fast CPU mask (`dropout`); no parameters or buffers, so
    state dicts are nanoGPT's."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float
                     ) -> torch.Tensor:
    """Causal softmax attention with dropout on the attention weights, as
    `F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)` computes it.
    q, k, v: (B, H, T, d) -> (B, H, T, d): queries and keys are the same T positions (a training
    forward; cached decoding has no dropout and takes `scaled_dot_product_attention` directly).

    On CPU with dropout_p > 0 torch has no fused kernel: its math fallback forms all T x T
    scores and draws their mask with `bernoulli_`. Here `_BlockCausalAttention` does it in query
    blocks with the fast mask. Otherwise (no dropout, not CPU, or under `torch.compile`) the call
    goes to `scaled_dot_product_attention` (flash attention on CPU and CUDA)."""
    if dropout_p == 0.0 or not _fast_cpu_path(q):
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
    B, H, T, d = q.shape
    q, k, v = (x.reshape(B * H, T, d) for x in (q, k, v))
    return _BlockCausalAttention.apply(q, k, v, dropout_p).view(B, H, T, d)


def _query_blocks(T: int):
    """(start, end) of each block of `QUERY_BLOCK` query rows; block rows see keys 0 .. end-1."""
    return [(s, min(s + QUERY_BLOCK, T)) for s in range(0, T, QUERY_BLOCK)]


class _BlockCausalAttention(torch.autograd.Function):
    """softmax(q k^T / sqrt(d) + causal mask) with dropout, times v, in blocks of query rows.
    q, k, v: (N, T, d) -> (N, T, d).

    Each block of rows s..e-1 is scored against keys 0..e-1 only: about T^2/2 + 32 T scores
    instead of T^2 (5/8 of them at T = 256). The backward pass is written out, so the key and
    value gradients of all blocks accumulate in one buffer (autograd would zero-fill and add a
    full-size gradient per block slice). With P the softmax, keep the mask, W = P * keep /
    (1 - p) and dW the gradient of W: dv += W^T dout, dW = dout v^T, dS = W*dW - P *
    rowsum(W*dW) (the softmax gradient with dropout folded in), dq = dS k / sqrt(d), dk +=
    dS^T q / sqrt(d)."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cpu")
    def forward(ctx, q, k, v, dropout_p):
        T, d = q.shape[1], q.shape[2]
        scale, rescale = 1.0 / math.sqrt(d), 1.0 / (1.0 - dropout_p)
        future = torch.full((T, T), float("-inf"), dtype=q.dtype).triu_(1)
        out = torch.empty_like(q)
        saved = []
        ctx.blocks = _query_blocks(T)  # backward must walk the same blocks as this forward
        for start, end in ctx.blocks:
            probs = torch.softmax(torch.baddbmm(future[start:end, :end], q[:, start:end],
                                                k[:, :end].transpose(1, 2), alpha=scale), dim=-1)
            keep = _keep_mask(probs.shape, dropout_p)
            out[:, start:end] = torch.bmm((probs * keep).mul_(rescale), v[:, :end])
            saved += [probs, keep]
        ctx.save_for_backward(q, k, v, *saved)
        ctx.scale, ctx.rescale = scale, rescale
        return out

    @staticmethod
    @once_differentiable  # backward is not itself differentiable: refuse double backward
    @torch.amp.custom_bwd(device_type="cpu")  # under the forward's autocast state
    def backward(ctx, dout):
        q, k, v, *saved = ctx.saved_tensors
        dq, dk, dv = torch.empty_like(q), torch.zeros_like(k), torch.zeros_like(v)
        for (start, end), probs, keep in zip(ctx.blocks, saved[::2], saved[1::2]):
            weights = (probs * keep).mul_(ctx.rescale)
            block_dout = dout[:, start:end]
            # bmm into a fresh tensor, then add: bmm into a slice goes matrix by matrix.
            dv[:, :end] += torch.bmm(weights.transpose(1, 2), block_dout)
            w_dw = torch.bmm(block_dout, v[:, :end].transpose(1, 2)).mul_(weights)
            dscores = w_dw.sub_(probs * w_dw.sum(dim=-1, keepdim=True))
            dq[:, start:end] = torch.bmm(dscores, k[:, :end]).mul_(ctx.scale)
            dk[:, :end] += torch.bmm(dscores.transpose(1, 2), q[:, start:end]).mul_(ctx.scale)
        return dq, dk, dv, None
