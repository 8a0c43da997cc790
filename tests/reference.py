"""An independent, functional GPT forward used as ground truth in tests.

Written from the architecture's definition (pre-LayerNorm blocks, causal softmax attention
computed explicitly, tanh-free exact GELU, tied head) directly on a state dict, optionally in
float64, and with an explicit block order so that loops can be unrolled by hand.
"""

import math

import torch
import torch.nn.functional as F


def layer_norm(x, sd, prefix):
    w = sd[prefix + ".weight"]
    b = sd.get(prefix + ".bias")
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    y = (x - mu) / torch.sqrt(var + 1e-5) * w
    return y + b if b is not None else y


def linear(x, sd, prefix):
    y = x @ sd[prefix + ".weight"].T
    b = sd.get(prefix + ".bias")
    return y + b if b is not None else y


def block(x, sd, i, n_head):
    p = f"transformer.h.{i}."
    h = layer_norm(x, sd, p + "ln_1")
    B, T, C = h.shape
    q, k, v = linear(h, sd, p + "attn.c_attn").split(C, dim=2)
    q, k, v = (z.view(B, T, n_head, C // n_head).transpose(1, 2) for z in (q, k, v))
    att = (q @ k.transpose(-2, -1)) / math.sqrt(C // n_head)
    mask = torch.tril(torch.ones(T, T, dtype=torch.bool))
    att = att.masked_fill(~mask, float("-inf")).softmax(-1)
    y = (att @ v).transpose(1, 2).reshape(B, T, C)
    x = x + linear(y, sd, p + "attn.c_proj")
    h = layer_norm(x, sd, p + "ln_2")
    h = linear(h, sd, p + "mlp.c_fc")
    h = 0.5 * h * (1.0 + torch.erf(h / math.sqrt(2.0)))
    return x + linear(h, sd, p + "mlp.c_proj")


def embed(idx, sd):
    T = idx.shape[1]
    return sd["transformer.wte.weight"][idx] + sd["transformer.wpe.weight"][:T]


def head(x, sd):
    x = layer_norm(x, sd, "transformer.ln_f")
    return x @ sd["transformer.wte.weight"].T


def forward(idx, state_dict, n_head, block_order, dtype=torch.float64):
    """Logits at every position for blocks applied in `block_order` (indices may repeat)."""
    sd = {k: v.detach().to(dtype) for k, v in state_dict.items()}
    x = embed(idx, sd)
    for i in block_order:
        x = block(x, sd, i, n_head)
    return head(x, sd)


def cross_entropy(logits, targets):
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
