"""`blockloop experiment FILE`: train every variant x seed under one budget, then report.

An experiment goes through these modules in order; each holds one concern, so that e.g. a new
kind of matched baseline is an edit to `plan` alone:

- `spec`: experiment files (`read_experiment_file`), parsed by `blockloop.config`'s one parser
  and checked before anything runs; the format is in its docstring and in `--help`.
- `plan`: each variant resolved to a validated training config, budgets turned into iterations,
  and the parameter- and depth-matched plain references added for every looped variant
  (`add_baselines`, `REFERENCES`); `plan_experiment` lists every run.
- `child`: the run's own process: train, then evaluate the final model (`post_evaluate`: loop
  scaling, automatic-exit sweep, samples, hop accuracy) and write `result.json` with the code
  identity that made it.
- `runner`: the parent: which runs are done (same config and same code), the others up to
  `--jobs` at a time with progress and ETA, one `results.jsonl` record per run, then the report.
- `report`: `report/report.md` and its figures from the output directory.
- `depth_protocol`: the report's part for a section's `cross_model_depth` request (each trained
  iteration count evaluated at every count, with paired verdicts); `report` calls it.
- `files`: the output directory's file names, `load_results` and `safe_name`, shared by the
  runner and the report so that neither imports the other.
- `command`: the command line (`main`).

The names below are re-exported for callers and tests.
"""

from blockloop.errors import ExperimentError
from blockloop.experiment.child import post_evaluate, run_child
from blockloop.experiment.command import build_parser, main
from blockloop.experiment.files import (
    PLAN_FILE,
    REPORT_DIR,
    RESULTS_FILE,
    RUN_RESULT_FILE,
    RUNS_DIR,
    load_results,
    safe_name,
)
from blockloop.experiment.plan import REFERENCES, RunPlan, add_baselines, plan_experiment
from blockloop.experiment.report import write_report
from blockloop.experiment.runner import run_experiment
from blockloop.experiment.spec import (
    EVALUATION_DEFAULTS,
    Experiment,
    Section,
    Variant,
    read_experiment_file,
)

__all__ = [
    "EVALUATION_DEFAULTS", "PLAN_FILE", "REFERENCES", "REPORT_DIR", "RESULTS_FILE",
    "RUN_RESULT_FILE", "RUNS_DIR", "Experiment", "ExperimentError", "RunPlan", "Section",
    "Variant", "add_baselines", "build_parser", "load_results", "main", "plan_experiment",
    "post_evaluate", "read_experiment_file", "run_child", "run_experiment", "safe_name",
    "write_report",
]
