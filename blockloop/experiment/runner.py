"""The parent process of an experiment: which runs to do, running them side by side, results.

`run_experiment` plans the experiment (`plan`), decides which runs are already done, starts every
other run as its own process (`child`, forked from a server that imported torch once), up to
`jobs` at a time, each with `cpus // jobs` torch threads (on a small CPU two single-thread runs
side by side finish sooner than one two-thread run after another), tails each run's `metrics.jsonl` for progress (run i of
n, iteration, loss, ETA), appends one record per finished run to `results.jsonl`, and writes the
report. A run that ends without a result file, or with an error, is recorded as failed with its
error, and the others go on.

A run is done, and skipped on the next invocation, when its last record is "ok" with the same
resolved config (spec hash) and was made by this code (`records.same_code`): after an edit to the
package a finished run is rerun, unless `keep_other_code` keeps it (the report then names the
code that made each run). An interrupted experiment resumes where it stopped: unfinished runs
restart from scratch, and a run that finished but was never recorded is adopted from its
result.json; `force` reruns everything.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from blockloop.experiment.child import run_logged_child
from blockloop.experiment.comparisons import section_pairs, section_values, wide_pairs
from blockloop.experiment.files import (
    PLAN_FILE,
    RESULTS_FILE,
    RUN_LOG_FILE,
    RUN_METRICS_FILE,
    RUN_RESULT_FILE,
    RUN_SPEC_FILE,
    load_results,
)
from blockloop.experiment.plan import RunPlan, plan_experiment
from blockloop.experiment.report import write_report
from blockloop.experiment.spec import Experiment
from blockloop.records import append_jsonl, atomic_write_json, code_identity, same_code

def run_experiment(
    exp: Experiment,
    out_dir: Path,
    jobs: int,
    force: bool = False,
    status_interval: float = 15.0,
    log=print,
    keep_other_code: bool = False,
) -> dict:
    """Plan, run what is missing, write results.jsonl and the report. Returns a summary dict.

    `force` reruns every run; `keep_other_code` keeps finished runs made by other code (by
    default they are rerun). Sections with `adaptive_seeds` get further rounds: after each, the
    comparisons whose interval is still too wide get one more seed (`_more_seeds`)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cpus = cpu_count()
    threads = max(1, cpus // jobs)
    started_at = time.time()
    previous = {} if force else load_results(out_dir)
    extra_seeds: dict = {}
    totals = {"ok": 0, "failed": 0, "skipped": None}
    ran = set()  # run ids started by this invocation (with `force`, the only reusable ones)
    while True:
        runs, info = plan_experiment(exp, out_dir, threads, extra_seeds)
        interrupted = _run_round(exp, out_dir, runs, info, previous, (keep_other_code, force),
                                 (jobs, threads, cpus, started_at), totals, ran, log,
                                 status_interval)
        previous = {k: v for k, v in load_results(out_dir).items() if not force or k in ran}
        if interrupted or not _more_seeds(exp, info, previous, extra_seeds, log):
            break
    wall = time.time() - started_at
    info.update(wall_time_s=wall, finished=not interrupted, runs_ok_now=totals["ok"],
                runs_failed_now=totals["failed"], runs_total=len(runs),
                runs_skipped=totals["skipped"], runs_to_do=totals["ok"] + totals["failed"])
    atomic_write_json(out_dir / PLAN_FILE, info, indent=1)
    report_path = None
    if not interrupted:
        report_path = write_report(out_dir)
        log(f"report: {report_path}")
    log(f"{totals['ok']} runs done, {totals['failed']} failed, {totals['skipped']} skipped (done "
        f"before) in {fmt_time(wall)}")
    return {**totals, "interrupted": interrupted, "wall_time_s": wall, "report": report_path}


def _run_round(exp, out_dir: Path, runs: list, info: dict, previous: dict, reuse: tuple,
               machine: tuple, totals: dict, ran: set, log, status_interval: float) -> bool:
    """Run the runs of one plan that are not done yet; returns whether it was interrupted.
    `reuse` is (keep_other_code, force); `machine` (jobs, threads per run, CPUs, start time);
    `totals` (counts) and `ran` (run ids started or recorded by this invocation) are updated in
    place."""
    jobs, threads, cpus, started_at = machine
    keep_other_code, force = reuse
    todo, failed_at_plan, skipped = _triage(runs, previous, exp.name, out_dir, keep_other_code,
                                            log, adopt=not force, adopted=ran)
    # A planned failure is recorded once per invocation, not again in every adaptive round.
    failed_at_plan = [p for p in failed_at_plan if p.run_id not in ran]
    n = len(todo) + len(failed_at_plan)
    info.update(
        out_dir=str(out_dir), jobs=jobs, threads_per_run=threads, cpus=cpus,
        started_at=time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started_at)),
        runs_total=len(runs), runs_skipped=skipped, runs_to_do=n, finished=False,
        code=code_identity(),
    )
    atomic_write_json(out_dir / PLAN_FILE, info, indent=1)
    log(f"experiment '{exp.name}': {len(runs)} runs, {skipped} already done, {n} to run; "
        f"{jobs} at a time x {threads} thread(s); output in {out_dir}")
    for index, plan in enumerate(failed_at_plan, 1):
        log(f"[{index}/{n}] FAILED {plan.run_id}: {plan.error}")
        _record(out_dir, {**plan.record(exp.name), "status": "failed", "error": plan.error,
                          "code": code_identity()})
    scheduler = _Scheduler(exp.name, out_dir, jobs, threads, n, log, status_interval)
    scheduler.index = scheduler.n_failed = len(failed_at_plan)
    # Longest first: the last runs to start are short, so the jobs finish close together.
    ran.update(p.run_id for p in todo + failed_at_plan)
    interrupted = scheduler.run(sorted(todo, key=lambda p: -p.cost()))
    totals["ok"] += scheduler.n_ok
    totals["failed"] += scheduler.n_failed
    if totals["skipped"] is None:  # later rounds skip this invocation's own runs
        totals["skipped"] = skipped
    return interrupted


def _more_seeds(exp: Experiment, info: dict, records: dict, extra_seeds: dict, log) -> bool:
    """Adaptive seeding: one more seed, the same for all, to both variants of every comparison
    whose 95% interval is wider than its section's `adaptive_seeds.target_width`
    (`comparisons.wide_pairs`), within `max_seeds` per variant and `max_runs` added runs per
    section; a pair is extended only whole, so every added run has its partner. Updates
    `extra_seeds` (section -> variant -> seeds); returns whether anything was added."""
    added = False
    for section, sec_info in zip(exp.sections, info["sections"]):
        rule = section.adaptive_seeds
        if rule is None:
            continue
        extra = extra_seeds.setdefault(section.name, {})
        planned = {v["name"]: v["seeds"] for v in sec_info["variants"]}
        values = section_values(sec_info, info["runs"], records)
        spent = sum(len(s) for s in extra.values())
        chosen = []
        for pair in wide_pairs(section_pairs(sec_info["variants"]), values, planned,
                               rule["target_width"]):
            new = [n for n in pair if n not in chosen]
            if (spent + len(chosen) + len(new) <= rule["max_runs"]
                    and all(len(planned[n]) < rule["max_seeds"] for n in new)):
                chosen += new
        if not chosen:
            continue
        seed = max(s for seeds in planned.values() for s in seeds) + 1
        for name in chosen:
            extra.setdefault(name, []).append(seed)
        added = True
        log(f"adaptive seeding: {section.name}: seed {seed} for {', '.join(chosen)} (their "
            f"comparisons' 95% intervals are wider than {rule['target_width']:g})")
    return added


def _triage(runs: list, previous: dict, experiment_name: str, out_dir: Path,
            keep_other_code: bool, log, adopt: bool = True,
            adopted: set | None = None) -> tuple[list, list, int]:
    """(runs to start, runs that failed at planning, number of runs already done). With `adopt`
    a run that finished without being recorded is recorded from its result.json (its id added
    to `adopted`); `--force` turns that off, so that it reruns every run."""
    todo, failed_at_plan, skipped, other_code = [], [], 0, 0
    for plan in runs:
        rec = previous.get(plan.run_id)
        if _finished(rec, plan, keep_other_code):
            skipped += 1
            continue
        if _finished(rec, plan, keep_other_code=True):
            other_code += 1
        if plan.error is not None:
            failed_at_plan.append(plan)
            continue
        found = _adopt_finished(plan, experiment_name, keep_other_code) if adopt else None
        if found is not None:
            # The run finished but the experiment was stopped before recording it.
            _record(out_dir, found)
            if adopted is not None:
                adopted.add(plan.run_id)
            skipped += 1
        else:
            todo.append(plan)
    if other_code:
        log(f"{other_code} finished run(s) were made by other code (the package or torch "
            f"changed since): running them again (--keep_other_code keeps them)")
    return todo, failed_at_plan, skipped


def _finished(rec: dict | None, plan: RunPlan, keep_other_code: bool) -> bool:
    """Whether record or result `rec` is a finished run of `plan` that can be reused."""
    return (rec is not None and rec.get("status") == "ok"
            and rec.get("spec_hash") == plan.spec_hash
            and (keep_other_code or same_code(rec.get("code"))))


def _adopt_finished(plan: RunPlan, experiment_name: str, keep_other_code: bool) -> dict | None:
    """A run whose process finished (result.json present, same config) but was never recorded."""
    try:
        result = json.loads((plan.run_dir / RUN_RESULT_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if not _finished(result, plan, keep_other_code):
        return None
    return {**result, **plan.record(experiment_name), "iters": plan.iters,
            "run_dir": str(plan.run_dir)}


def _record(out_dir: Path, record: dict) -> None:
    append_jsonl(out_dir / RESULTS_FILE, record)


# ----------------------------------------------------------------------------------------------
# Running processes side by side


@dataclass
class _Active:
    """A run whose process is running, with its progress read from metrics.jsonl."""

    plan: RunPlan
    index: int  # i of "run i of n"
    proc: _RunProcess
    started: float
    metrics_offset: int = 0
    iteration: int = 0
    loss: float | None = None
    val_loss: float | None = None

    def poll_metrics(self) -> None:
        path = self.plan.run_dir / RUN_METRICS_FILE
        try:
            with open(path) as f:
                f.seek(self.metrics_offset)
                chunk = f.read()
        except OSError:
            return
        # Only whole lines are consumed; a line being written is read next time.
        end = chunk.rfind("\n") + 1
        self.metrics_offset += len(chunk[:end].encode())
        for line in chunk[:end].splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            self.iteration = max(self.iteration, rec.get("iter", 0))
            if rec.get("kind") == "train":
                self.loss = rec.get("loss")
            elif rec.get("kind") == "eval":
                self.val_loss = rec.get("val_loss")

    def fraction(self) -> float:
        return min(1.0, self.iteration / max(self.plan.iters or 1, 1))


class _Scheduler:
    """Starts runs up to `jobs` at a time, records each as it ends, and logs progress."""

    def __init__(self, experiment_name: str, out_dir: Path, jobs: int, threads: int, n: int,
                 log, status_interval: float):
        self.experiment_name, self.out_dir, self.log = experiment_name, out_dir, log
        self.jobs, self.threads, self.n = jobs, threads, n
        self.status_interval = status_interval
        self.active: list[_Active] = []
        self.eta = _Eta(jobs)
        self.index = self.n_ok = self.n_failed = 0
        self.started_at = self.last_status = time.time()

    def run(self, todo: list) -> bool:
        """Run every plan in `todo`; returns whether it was interrupted (Ctrl-C or SIGTERM)."""
        previous_sigterm = _sigterm_as_interrupt()
        try:
            while todo or self.active:
                while todo and len(self.active) < self.jobs:
                    self._start(todo.pop(0))
                time.sleep(0.2)
                now = time.time()
                for a in list(self.active):
                    a.poll_metrics()
                    if a.proc.poll() is None:
                        continue
                    self.active.remove(a)
                    self._finish(a)
                if self.active and now - self.last_status >= self.status_interval:
                    self.last_status = now
                    self._status(todo, now)
        except KeyboardInterrupt:
            self._stop_all()
            return True
        except BaseException:
            # The runner's own failure must not leave runs training unattended (and
            # multiprocessing would wait for them at exit).
            self._stop_all()
            raise
        finally:
            _restore_sigterm(previous_sigterm)
        return False

    def _start(self, plan: RunPlan) -> None:
        self.index += 1
        self.log(f"[{self.index}/{self.n}] start {plan.run_id} ({plan.iters} iterations)")
        self.active.append(_start(plan, self.index, self.threads))

    def _finish(self, a: _Active) -> None:
        record = _collect(a, self.experiment_name)
        _record(self.out_dir, record)
        self.eta.finished(a.plan, record["elapsed_s"])
        prefix = f"[{a.index}/{self.n}]"
        if record["status"] == "ok":
            self.n_ok += 1
            metric = (f"val accuracy {record['final_val_accuracy']:.3f}"
                      if "final_val_accuracy" in record else
                      f"best val loss {record.get('best_val_loss') or float('nan'):.4f}")
            self.log(f"{prefix} done {a.plan.run_id} in {fmt_time(record['elapsed_s'])}: {metric}")
        else:
            self.n_failed += 1
            first_line = record["error"].splitlines()[0]
            self.log(f"{prefix} FAILED {a.plan.run_id}: {first_line} "
                     f"(log: {a.plan.run_dir / RUN_LOG_FILE})")

    def _status(self, todo: list, now: float) -> None:
        left = self.eta.estimate(todo, self.active, now)
        parts = [
            f"[{a.index}/{self.n}] {a.plan.run_id} it {a.iteration}/{a.plan.iters}"
            + (f" loss {a.loss:.3f}" if a.loss is not None else "")
            for a in self.active
        ]
        self.log(" | ".join(parts) + f" | {self.n_ok + self.n_failed}/{self.n} finished, "
                 f"elapsed {fmt_time(now - self.started_at)}, ETA "
                 + (fmt_time(left) if left is not None else "(measuring)"))

    def _stop_all(self) -> None:
        self.log("interrupted: stopping the running runs (finished runs are kept; run the same "
                 "command again to continue)")
        for a in self.active:
            # A Ctrl-C in a terminal reaches the children too, a SIGTERM to the runner does not:
            # ask each to stop (training saves and exits on SIGINT), then end the ones that hang.
            if a.proc.poll() is None:
                a.proc.send_signal(signal.SIGINT)
            try:
                a.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                a.proc.kill()
                a.proc.wait()


class _Eta:
    """Remaining wall time from the work left, at the speed runs have shown so far.

    Speed is seconds per unit of estimated cost (training FLOPs), per section because tiny
    synthetic-task models and language models spend very different time per FLOP.
    """

    def __init__(self, jobs: int):
        self.jobs = jobs
        self.done = {}  # section -> [seconds, cost]

    def finished(self, plan: RunPlan, seconds: float) -> None:
        s = self.done.setdefault(plan.section, [0.0, 0.0])
        s[0] += seconds
        s[1] += plan.cost()

    def estimate(self, pending, active, now: float) -> float | None:
        rates = {sec: s[0] / s[1] for sec, s in self.done.items() if s[1] > 0}
        for a in active:
            frac = a.fraction()
            if a.plan.section not in rates and frac > 0.05:
                rates[a.plan.section] = (now - a.started) / (frac * a.plan.cost())
        if not rates:
            return None
        fallback = sum(rates.values()) / len(rates)
        left = 0.0
        for p in pending:
            left += p.cost() * rates.get(p.section, fallback)
        for a in active:
            rate = rates.get(a.plan.section, fallback)
            left += max(0.0, (1 - a.fraction()) * a.plan.cost() * rate)
        return left / self.jobs


def _child_env(threads: int) -> dict:
    """The environment a run starts with: the runner's, as it is now (the fork server's is as
    it was when the server started), with the run's thread count for libraries that read it
    when they load in the run (torch's own pool is set by `threads`). A value the user set is
    kept."""
    env = dict(os.environ)
    for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env.setdefault(key, str(threads))
    return env


_FORKSERVER = None


def _process_context():
    """The multiprocessing context runs start from: a fork server that imports torch and the
    child module once (a fresh interpreter per run costs several seconds of imports)."""
    global _FORKSERVER
    if _FORKSERVER is None:
        _FORKSERVER = multiprocessing.get_context("forkserver")
        _FORKSERVER.set_forkserver_preload(["blockloop.experiment.child"])
    return _FORKSERVER


class _RunProcess:
    """A run's process with the part of `subprocess.Popen`'s interface the scheduler uses."""

    def __init__(self, spec_path: Path, log_path: Path, threads: int):
        self._process = _process_context().Process(
            target=run_logged_child,
            args=(str(spec_path), str(log_path), os.getcwd(), _child_env(threads)),
        )
        self._process.start()

    def poll(self) -> int | None:
        """The exit code, None while running."""
        return self._process.exitcode

    @property
    def returncode(self) -> int | None:
        """The exit code (negative: killed by that signal), None while running."""
        return self._process.exitcode

    def send_signal(self, sig: int) -> None:
        if self._process.exitcode is None:
            os.kill(self._process.pid, sig)

    def wait(self, timeout: float | None = None) -> int:
        """The exit code; raises subprocess.TimeoutExpired if still running after `timeout` s."""
        self._process.join(timeout)
        if self._process.exitcode is None:
            raise subprocess.TimeoutExpired(f"run process {self._process.pid}", timeout)
        return self._process.exitcode

    def kill(self) -> None:
        self._process.kill()


def _start(plan: RunPlan, index: int, threads: int) -> _Active:
    if plan.run_dir.exists():
        # An unfinished run restarts from scratch; its directory is ours by construction.
        shutil.rmtree(plan.run_dir)
    plan.run_dir.mkdir(parents=True)
    spec = {"run_id": plan.run_id, "values": plan.values, "evaluation": plan.evaluation,
            "spec_hash": plan.spec_hash}
    spec_path = plan.run_dir / RUN_SPEC_FILE
    atomic_write_json(spec_path, spec, indent=1)
    proc = _RunProcess(spec_path, plan.run_dir / RUN_LOG_FILE, threads)
    return _Active(plan=plan, index=index, proc=proc, started=time.time())


def _log_tail(path: Path, lines: int = 5) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _collect(a: _Active, experiment_name: str) -> dict:
    """The results.jsonl record of a finished run process."""
    plan = a.plan
    base = {**plan.record(experiment_name), "iters": plan.iters, "run_dir": str(plan.run_dir),
            "elapsed_s": time.time() - a.started}
    try:
        result = json.loads((plan.run_dir / RUN_RESULT_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        result = None
    if result is None or result.get("spec_hash") != plan.spec_hash:
        tail = _log_tail(plan.run_dir / RUN_LOG_FILE)
        return {**base, "status": "failed", "code": code_identity(),
                "error": f"the run process exited with code {a.proc.returncode} without a "
                         f"result; last lines of its log:\n{tail}"}
    return {**result, **base}


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def _sigterm_as_interrupt():
    """Make SIGTERM stop the runner like Ctrl-C does (children stopped, results kept)."""
    try:
        return signal.signal(signal.SIGTERM, _raise_interrupt)
    except ValueError:
        return None  # not the main thread: signals cannot be handled here


def _restore_sigterm(previous) -> None:
    if previous is not None:
        signal.signal(signal.SIGTERM, previous)


def fmt_time(seconds: float) -> str:
    """A duration as 42s, 3m07s or 2h05m."""
    seconds = max(0, int(round(seconds)))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def cpu_count() -> int:
    """CPUs this process may use (its affinity where the OS tells it)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1
