"""`blockloop COMMAND ...`: a thin dispatcher to each command's own `main(argv)`.

Commands import lazily so that `blockloop --help` is instant and a command's dependencies are
only loaded when it runs.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "prepare": ("blockloop.prepare", "write train.bin/val.bin/meta.json for a dataset"),
    "train": ("blockloop.train", "train a (looped) GPT: blockloop train [CONFIG] [--key=value ...]"),
    "sample": ("blockloop.sampling", "generate text from a checkpoint"),
    "experiment": ("blockloop.experiment", "run a grid of variants x seeds and write a report"),
    "analyze": ("blockloop.analysis", "what happens to the representation across loops"),
}


def usage() -> str:
    lines = ["usage: blockloop COMMAND [ARGS ...]", "", "commands:"]
    for name, (_, text) in COMMANDS.items():
        lines.append(f"  {name:<11} {text}")
    lines += ["", "'blockloop COMMAND --help' lists a command's options and their defaults."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"error: unknown command '{name}'\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return module.main(rest)


if __name__ == "__main__":
    sys.exit(main())
