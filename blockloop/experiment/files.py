"""The layout of an experiment's output directory, shared by the runner and the report.

Both sides of an experiment read and write the same files: the runner writes them, the report
reads them. Their names, the reading of `results.jsonl` and the rule that turns a name from an
experiment file into a path component live here, so neither side imports the other.

Layout of the output directory::

    experiment.json      the plan and the last invocation's timing (read by the report)
    results.jsonl        one record per run (the last line for a run wins)
    runs/<section>/<variant>-s<seed>/   checkpoints, metrics.jsonl, log.txt, spec.json, result.json
    report/report.md     tables, figures (PNG) and how to read them
"""

from __future__ import annotations

import re
from pathlib import Path

from blockloop.records import read_jsonl

PLAN_FILE = "experiment.json"
RESULTS_FILE = "results.jsonl"
RUNS_DIR = "runs"
REPORT_DIR = "report"
RUN_SPEC_FILE = "spec.json"
RUN_RESULT_FILE = "result.json"
RUN_LOG_FILE = "log.txt"
RUN_METRICS_FILE = "metrics.jsonl"

_NAME_OK = re.compile(r"[^A-Za-z0-9._-]")


def safe_name(name: str) -> str:
    """`name` as one harmless path component: other characters become '_', and a leading dot is
    prefixed so that '.', '..' and hidden names cannot occur."""
    cleaned = _NAME_OK.sub("_", name)
    if not cleaned or cleaned.startswith("."):
        cleaned = "_" + cleaned
    return cleaned


def load_results(out_dir: str | Path) -> dict:
    """run_id -> its latest record in results.jsonl (a line cut short by a kill is ignored)."""
    records = {}
    for rec in read_jsonl(Path(out_dir) / RESULTS_FILE):
        if isinstance(rec, dict) and "run_id" in rec:
            records[rec["run_id"]] = rec
    return records
