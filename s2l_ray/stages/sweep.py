"""Stage `sweep`: fine-tune and evaluate the target on every (method, budget, seed) of a grid.

    trajectories + clusters (computed once) --select_from per trial--> trials/<t>/selection/
    ingest examples --the selected rows--> trials/<t>/subset.parquet
    Ray Tune grid over trials: each trial builds and fits a TorchTrainer (the reference stage's
        `fit`, DeepSpeed), then evaluates the final model in a Ray task
        --> trials/<t>/model/ (HF), predictions.parquet, result.json
    results.parquet / results.csv (one row per trial), summary.md (mean ± std over seeds)

Everything before Tune is checked first (budgets, step plans, the held-out set), so a bad grid
fails before any training. An interrupted sweep resumes: selections already written are kept,
Tune restores its experiment (`Tuner.restore`), a finished trial reports its stored result, and an
unfinished one resumes its fine-tune from Ray Train's last checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

from s2l_ray.config import S2LConfig
from s2l_ray.io.atomic import copy_tree_atomic, write_json_atomic
from s2l_ray.stages.base import read_report

log = logging.getLogger(__name__)
TRIAL_RESOURCES = {"cpu": 0, "memory": 256 * 2**20}  # the trial driver only waits on Ray Train


def materialize(cfg: S2LConfig, trial: Any, d: Path, dirs: dict[str, Path]) -> Path:
    """The trial's training rows: the selection for it, written once (kept across resumes)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from s2l_ray.io.parquet import map_files, parquet_files
    from s2l_ray.stages.results import FULL
    from s2l_ray.stages.select import rows_with_ids, select_from

    if trial.method == FULL:
        return dirs["examples"]
    subset = d / "subset.parquet"
    if subset.is_file():
        return subset
    sel = trial_select(cfg, trial.method, trial.budget)
    report = select_from(dirs["cluster"], dirs["trajectories"], dirs["examples"],
                         d / "selection", sel, trial.seed)
    write_json_atomic(d / "selection" / "report.json", report)
    ids = pq.read_table(d / "selection" / "selected.parquet", columns=["id"])["id"].to_pylist()
    cols = ["id", "source", "input_ids", "n_prompt_tokens"]
    rows = pa.concat_tables(map_files(rows_with_ids, parquet_files(dirs["examples"], "ingest"),
                                 ids, cols))
    if rows.num_rows != trial.size:
        raise RuntimeError(f"sweep: trial {trial.name} selected {rows.num_rows} rows, expected "
                           f"{trial.size}")
    pq.write_table(rows, d / "subset.tmp.parquet")
    os.replace(d / "subset.tmp.parquet", subset)
    return subset


def trial_select(cfg: S2LConfig, method: str, budget: int | float) -> Any:
    """The select section a trial runs: cfg.select with the trial's method and budget (a sweep
    variant such as 's2l_cap' names the method and the options it forces)."""
    from s2l_ray.config import SWEEP_VARIANTS

    base, forced = SWEEP_VARIANTS.get(method, (method, {}))
    return replace(cfg.select, method=base, budget=budget, **forced)


def _evaluate_task(model_dir: str, eval_dir: str, ecfg: Any, trust: bool) -> Any:
    from s2l_ray.stages.evaluate import evaluate_model

    return evaluate_model(model_dir, eval_dir, ecfg, trust)


def run_trial(config: dict[str, Any], cfg: S2LConfig, root: str, sink: Any = None) -> None:
    """Tune's function trainable: fine-tune the target on one trial's subset, then evaluate."""
    import time

    import pyarrow.parquet as pq
    import ray
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from s2l_ray.core.schedule import TrainPlan
    from s2l_ray.runtime import cluster_has_gpus, quiet_ray_data
    from s2l_ray.training.driver import fit

    d = Path(root) / "trials" / config["trial"]
    done = d / "result.json"
    if done.is_file():  # finished before an interruption: report the stored result
        tune.report(json.loads(done.read_text()))
        return
    spec = json.loads((d / "trial.json").read_text())
    quiet_ray_data()  # this trial's process builds the Dataset: its progress lines stay off
    model = d / "model"
    t0 = time.time()
    if not (model / "config.json").is_file():
        p = spec["plan"]
        plan = TrainPlan(**{**p, "checkpoint_steps": tuple(p["checkpoint_steps"])})
        target = replace(cfg.target, model=spec.get("model_path", cfg.target.model))
        ckpts = fit(cfg, target, "target", Path(spec["subset"]), plan, d,
                    spec["tokenizer"], seed=spec["seed"], callbacks=[TuneReportCallback()],
                    log_lines=4, progress=(sink, config["trial"]) if sink is not None else None)
        copy_tree_atomic(Path(ckpts[-1]["dir"]) / "hf", model)
        write_json_atomic(d / "train.json", {"train_loss": ckpts[-1]["train_loss"],
                                       "steps": plan.total_steps, "epochs": plan.epochs,
                                       "train_seconds": time.time() - t0})
        shutil.rmtree(d / "ray_train", ignore_errors=True)  # optimizer states: done with them
    e = cfg.eval
    gpu = cluster_has_gpus() if e.use_gpu is None else e.use_gpu
    # Outside the trial's placement group (which holds no CPU): training has freed its workers.
    task = ray.remote(_evaluate_task).options(
        num_cpus=e.cpus, num_gpus=1 if gpu else 0,
        scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=None))
    metrics, preds = ray.get(task.remote(str(model), spec["eval_dir"], replace(e, use_gpu=gpu),
                                         cfg.target.trust_remote_code))
    pq.write_table(preds, d / "predictions.parquet")
    result = {**{k: spec[k] for k in ("trial", "method", "budget", "size", "fraction",
                                      "seed")},
              **json.loads((d / "train.json").read_text()), **metrics}
    write_json_atomic(done, result)
    if not cfg.sweep.keep_models:
        shutil.rmtree(model)
    tune.report(result)


def trial_detail(counts: dict[str, float], steps: dict[str, int]) -> str:
    """`trials 3/8 done; t1 40/120, t2 7/120` (the trials under way, steps done/total)."""
    done = sum(counts.get(t, 0) >= n for t, n in steps.items())
    running = [f"{t} {counts[t]:,.0f}/{n:,}" for t, n in steps.items() if 0 < counts.get(t, 0) < n]
    return f"trials {done}/{len(steps)} done" + (f"; {', '.join(running)}" if running else "")


def _sweep_progress(cfg: S2LConfig, work: Path, steps: dict[str, int]) -> tuple[Any, Any]:
    """The sweep's progress: one ProgressSink that every trial's rank-0 worker pushes its step
    count to, and a Progress on this driver over all trials' steps, each trial's in the line.
    A trial finished before an interruption counts as done (its steps are not in the rate)."""
    import ray

    from s2l_ray.stages.progress import polled, progress_sink, stage_progress

    sink = progress_sink()
    finished = {t: n for t, n in steps.items() if (work / "trials" / t / "result.json").is_file()
                or (work / "trials" / t / "model" / "config.json").is_file()}
    ray.get([sink.set.remote(t, n) for t, n in finished.items()])

    def detail() -> str:
        return trial_detail(ray.get(sink.all.remote(), timeout=5), steps)

    return sink, stage_progress(cfg, "sweep", sum(steps.values()), "steps", rate_unit="steps/s",
                                base=sum(finished.values()), poll=polled(sink), detail=detail)


def _tune(cfg: S2LConfig, work: Path, names: list[str], sink: Any = None) -> None:
    from ray import tune

    class Progress(tune.Callback):
        done = 0

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **kw: Any) -> None:
            r = trial.last_result or {}
            self.done += 1
            log.info("sweep: trial %s finished (%d/%d this session): macro_em %s, macro_loss "
                     "%.4f", r.get("trial"), self.done, len(names),
                     f"{r['macro_em']:.3f}" if "macro_em" in r else "n/a",
                     r.get("macro_loss", float("nan")))

    trainable = tune.with_resources(
        tune.with_parameters(run_trial, cfg=cfg, root=str(work), sink=sink), TRIAL_RESOURCES)
    path = work / "tune"
    if tune.Tuner.can_restore(str(path)):
        log.info("sweep: resuming the Tune experiment in %s", path)
        tuner = tune.Tuner.restore(str(path), trainable=trainable, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable, param_space={"trial": tune.grid_search(names)},
            tune_config=tune.TuneConfig(max_concurrent_trials=cfg.sweep.max_concurrent_trials),
            run_config=tune.RunConfig(
                name="tune", storage_path=str(work), verbose=0, callbacks=[Progress()],
                failure_config=tune.FailureConfig(max_failures=cfg.sweep.max_failures)))
    grid = tuner.fit()
    if grid.errors:
        raise RuntimeError(f"sweep: {len(grid.errors)} of {len(names)} trials failed; the first:"
                           f" {grid.errors[0]}. Rerun the same command to retry them (finished"
                           " trials are kept)")


def prebuild_target(cfg: S2LConfig) -> str:
    """The target's path for from_pretrained. An offline tiny target (a `tiny-pre:*` one takes
    a short pre-training) is built here, once, with its progress in this log, rather than inside
    the first trial; trials load this path (their processes need not see this one's cache)."""
    from s2l_ray.models.specs import resolve_model

    return resolve_model(cfg.target.model, cfg)


def _plan(cfg: S2LConfig, inputs: dict[str, Path]) -> tuple[list[Any], dict[str, Any]]:
    """The trials and each one's step plan: every check that can fail before any training."""
    from s2l_ray.stages.results import plan_trials
    from s2l_ray.training.driver import plan_training

    n = read_report(inputs["ingest"])["valid"]
    trials = plan_trials(cfg.sweep.methods, cfg.sweep.budgets, cfg.sweep.seeds, n)
    plans = {t.name: plan_training(cfg.target, "target", t.size) for t in trials}
    return trials, plans


def check(cfg: S2LConfig, inputs: dict[str, Path]) -> None:
    """Budgets, step plans and the held-out set, before the work folder is made."""
    from s2l_ray.stages.evaluate import eval_source_of

    _plan(cfg, inputs)
    eval_source_of(cfg, inputs["ingest"])


def run(cfg: S2LConfig, inputs: dict[str, Path], work: Path) -> dict[str, Any]:
    """Run the grid in `work` (kept across interruptions); results table, summary, report."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from s2l_ray.stages.evaluate import prepare_eval_set
    from s2l_ray.stages.results import (
        budget_label,
        headline,
        markdown_summary,
        result_table,
        summarize,
    )

    rep = read_report(inputs["ingest"])
    n = rep["valid"]
    trials, plans = _plan(cfg, inputs)
    dirs = {"cluster": inputs["cluster"], "trajectories": inputs["trajectories"],
            "examples": inputs["ingest"] / "examples"}
    target_path = prebuild_target(cfg)
    eval_dir = work / "eval"
    if not (eval_dir / "report.json").is_file():  # held-out set: prepared once per sweep
        eval_report = prepare_eval_set(cfg, inputs["ingest"], eval_dir)
        write_json_atomic(eval_dir / "report.json", eval_report)
    log.info("sweep: %d trials (%s x budgets %s x seeds %s) of the target %s", len(trials),
             ", ".join(cfg.sweep.methods), cfg.sweep.budgets, cfg.sweep.seeds, cfg.target.model)
    for t in trials:
        d = work / "trials" / t.name
        d.mkdir(parents=True, exist_ok=True)
        subset = materialize(cfg, t, d, dirs)
        write_json_atomic(d / "trial.json", {
            "trial": t.name, **t.as_dict(), "fraction": t.size / n, "subset": str(subset),
            "plan": plans[t.name].as_dict(), "tokenizer": rep["tokenizer"],
            "model_path": target_path,
            "eval_dir": str(eval_dir)})
    sink, progress = _sweep_progress(cfg, work, {t.name: plans[t.name].total_steps
                                                 for t in trials})
    progress.start()
    try:
        # Longest first: with trials run a few at a time, the full-data trial started last
        # would train alone at the end while the other slots idle.
        longest = sorted(trials, key=lambda t: -plans[t.name].total_steps)
        _tune(cfg, work, [t.name for t in longest], sink)
    finally:
        speed = progress.stop()
        import ray

        ray.kill(sink)
    rows = [json.loads((work / "trials" / t.name / "result.json").read_text()) for t in trials]
    for r in rows:  # counts and fractions in one column: keep it text, as configured
        r["budget"] = budget_label(r["budget"])
    table = pa.Table.from_pylist(rows)
    pq.write_table(table, work / "results.parquet")
    table.to_pandas().to_csv(work / "results.csv", index=False)
    summary = summarize(rows)
    (work / "summary.md").write_text(
        result_table(rows, title=f"Result: target {cfg.target.model}, {n} examples") + "\n"
        + markdown_summary(summary, title="All metrics"))
    log.info("sweep: results in %s\n%s", Path(cfg.run.output_dir) / "sweep" / "results.csv",
             (work / "summary.md").read_text())
    return {"trials": len(trials), "examples": n, "summary": summary, "headline": headline(rows),
            "train_steps_per_s": speed["per_s"], "tune_seconds": speed["seconds"],
            "eval": json.loads((eval_dir / "report.json").read_text())}
