"""`blockloop experiment FILE`: the command line of the experiment runner.

A thin layer: it reads the experiment file (`spec`), runs it (`runner`) or only rewrites the
report (`report`), and turns the outcome into an exit status: 0 all runs ok, 1 some run failed,
2 bad file or options, 130 interrupted.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from blockloop.errors import ExperimentError, one_line, run_command
from blockloop.experiment.files import PLAN_FILE, safe_name
from blockloop.experiment.report import write_report
from blockloop.experiment.runner import cpu_count, run_experiment
from blockloop.experiment.spec import FORMAT_HELP, read_experiment_file

EXIT_HELP = """Exit status: 0 all runs ok, 1 some run failed (see the report), 2 bad file/options,
130 interrupted."""


def build_parser() -> argparse.ArgumentParser:
    """The `blockloop experiment` argument parser; --help also prints the file format."""
    parser = argparse.ArgumentParser(
        prog="blockloop experiment",
        description="Train every variant x seed of an experiment file under the same budget, "
        "data order and evaluation batches, then write results.jsonl and a report "
        "(Markdown + PNG). Runs already recorded with the same config and the same code are "
        "skipped, so an interrupted experiment continues where it stopped.",
        epilog=FORMAT_HELP + "\n" + EXIT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("config", metavar="CONFIG", help="experiment file, e.g. config/experiment_default.py")
    parser.add_argument("--out", metavar="DIR", help="output directory (default: experiments/<name>)")
    parser.add_argument(
        "--jobs", type=int, default=None, metavar="N",
        help=f"runs side by side, each with (CPUs / N) threads (default: the number of CPUs, "
        f"here {cpu_count()}: single-thread runs in parallel use a small CPU best)",
    )
    parser.add_argument("--force", action="store_true", help="rerun every run, even recorded ones")
    parser.add_argument(
        "--keep_other_code", "--keep-other-code", action="store_true",
        help="keep finished runs made by other code (another version of the package or of "
        "torch) instead of running them again; the report names the code that made each run",
    )
    parser.add_argument("--report-only", action="store_true",
                        help="only rewrite the report from the results already recorded")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run `blockloop experiment` with `argv` (default: sys.argv[1:]); returns the exit status."""
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    try:
        exp = read_experiment_file(args.config)
    except ExperimentError as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return e.exit_code
    out_dir = Path(args.out) if args.out else Path("experiments") / safe_name(exp.name)
    if args.report_only:
        if not (out_dir / PLAN_FILE).exists():
            print(f"error: {out_dir / PLAN_FILE} not found; run the experiment first", file=sys.stderr)
            return 2
        print(f"report: {write_report(out_dir)}")
        return 0
    jobs = args.jobs if args.jobs is not None else cpu_count()
    if jobs < 1:
        print("error: --jobs must be >= 1", file=sys.stderr)
        return 2
    return run_command(lambda: _run(exp, out_dir, jobs, args))


def _run(exp, out_dir: Path, jobs: int, args) -> int:
    summary = run_experiment(exp, out_dir, jobs, force=args.force,
                             keep_other_code=args.keep_other_code)
    if summary["interrupted"]:
        return 130
    return 1 if summary["failed"] else 0
