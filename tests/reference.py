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


def looped_forward(idx, state_dict, config, num_loops=None, dtype=torch.float64):
    """Logits of a looped model written out from the definition in blockloop/looping.py's
    docstring (groups, tied/untied units, injection, state init, state norm; no exit, eval
    mode), on a state dict, independent of the model's code."""
    sd = {k: v.detach().to(dtype) for k, v in state_dict.items()}
    groups = config["groups"]
    counts = num_loops or [g[2] for g in groups]
    x, position, u = embed(idx, sd), 0, 0
    for (first, last, _), count in zip(groups, counts):
        for i in range(position, first):
            x = block(x, sd, i, config["n_head"])
        parts = [list(range(first, last + 1))] if config["tied"] else [[i] for i in range(first, last + 1)]
        for part in parts:
            x = unit_loop(x, sd, config, part, u, count, dtype)
            u += 1
        position = last + 1
    for i in range(position, config["n_layer"]):
        x = block(x, sd, i, config["n_head"])
    return head(x, sd)


def unit_loop(x0, sd, config, blocks, u, count, dtype):
    if config["state_init"] == "noise":
        gen = torch.Generator().manual_seed(config["eval_noise_seed"])
        eps = torch.randn(config["block_size"], x0.shape[-1], generator=gen)[: x0.shape[1]]
        s = config["noise_scale"] * eps.to(dtype).unsqueeze(0).expand_as(x0)
    else:
        s = x0
    for t in range(1, count + 1):
        if t == 1 and config["state_init"] == "input":
            inp = s
        elif config["injection"] == "none":
            inp = s
        elif config["injection"] == "add":
            inp = s + x0
        else:
            inp = s + linear(torch.cat([s, x0], dim=-1), sd, f"looper.adapters.{u}.proj")
        if config["state_norm"]:
            inp = layer_norm(inp, sd, f"looper.state_norms.{u}")
        for i in blocks:
            inp = block(inp, sd, i, config["n_head"])
        s = inp
    return s
