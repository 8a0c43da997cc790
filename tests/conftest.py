"""Shared test helpers: a tiny on-disk token dataset, tiny training arguments, a quiet run.

Test modules import these (`from tests.conftest import ...`) rather than from one another.
"""

import json

import numpy as np
import pytest
import torch

from blockloop.config import parse_train_args
from blockloop.train import train


def write_token_dataset(root, vocab=11, train_tokens=4000, val_tokens=600, seed=0):
    """A tiny dataset in the on-disk format (docs/CONTRACTS.md): a noisy repeating pattern."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for split, n in (("train", train_tokens), ("val", val_tokens)):
        base = np.arange(n) % (vocab - 1)
        noise = rng.integers(0, vocab, n)
        ids = np.where(rng.random(n) < 0.1, noise, base).astype(np.uint16)
        ids.tofile(root / f"{split}.bin")
    itos = [chr(ord("a") + i) for i in range(vocab)]
    meta = {"format": "blockloop-tokens-v1", "dataset": "tiny", "vocab_size": vocab, "dtype": "uint16",
            "tokenizer": {"kind": "char", "itos": itos}, "source": "test",
            "train_tokens": train_tokens, "val_tokens": val_tokens}
    (root / "meta.json").write_text(json.dumps(meta))
    return root


def tiny_args(data_dir, out_dir, *extra):
    return [f"--data_dir={data_dir}", f"--out_dir={out_dir}", "--dataset=tiny", "--batch_size=4",
            "--block_size=16", "--n_layer=2", "--n_head=2", "--n_embd=16", "--eval_iters=2",
            "--eval_interval=4", "--log_interval=1", "--learning_rate=3e-3", "--warmup_iters=2",
            "--lr_decay_iters=12", "--min_lr=3e-4", "--gradient_accumulation_steps=2",
            "--progress=False", "--device=cpu", *extra]


def run(args):
    cfg, model = parse_train_args(args)
    return train(cfg, model, log=lambda *a: None)


def read_metrics(out_dir):
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for the module: the machine is shared, and tiny models gain nothing
    from threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_half_map(model, looped_blocks):
    """Make the looped blocks exact identities (output projections zero) and every concat
    adapter W = [-0.5 I | 0], b = 0: then u_t = s + W[s; x0] = 0.5 s, each iteration after the
    first maps s -> 0.5 s, and its Jacobian is 0.5 I. Returns the model."""
    with torch.no_grad():
        for i in looped_blocks:
            model.transformer.h[i].attn.c_proj.weight.zero_()
            model.transformer.h[i].mlp.c_proj.weight.zero_()
        for adapter in model.looper.adapters:
            eye = torch.eye(adapter.proj.weight.shape[0])
            adapter.proj.weight.copy_(torch.cat([-0.5 * eye, 0 * eye], dim=1))
            if adapter.proj.bias is not None:
                adapter.proj.bias.zero_()
    return model
