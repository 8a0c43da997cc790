"""Tiny Shakespeare as GPT-2 BPE tokens (nanoGPT's `shakespeare` data set).

Same text and same 90/10 character split as shakespeare_char (see there for the online and
offline sources); each part is encoded with GPT-2's BPE and stored as uint16.
"""

from __future__ import annotations

import numpy as np

from ..tokenizers import GPT2Tokenizer
from .common import TokenDirWriter, print_summary, split_text
from .shakespeare_char import load_tiny_shakespeare


def prepare(out_dir, offline: bool = False, source: str | None = None) -> dict:
    """Write a GPT-2 BPE Tiny Shakespeare token directory; returns its meta."""
    text, origin = load_tiny_shakespeare(offline, source)
    print(f"source: {origin}")
    tokenizer = GPT2Tokenizer(offline=offline or None)
    print(f"tokenizer: {tokenizer.source}")
    train_text, val_text = split_text(text)
    with TokenDirWriter(out_dir, "shakespeare", tokenizer.vocab_size, tokenizer.to_meta(), origin) as writer:
        # encode_ordinary, as nanoGPT: a literal "<|endoftext|>" in the text stays plain text.
        writer.write("train", np.array(tokenizer.encoding.encode_ordinary(train_text), dtype=np.int64))
        writer.write("val", np.array(tokenizer.encoding.encode_ordinary(val_text), dtype=np.int64))
        meta = writer.commit({"tokenizer_source": tokenizer.source})
    print_summary(meta, out_dir)
    return meta
