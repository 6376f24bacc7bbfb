"""Discrete hyperparameters (``n_h``, number of layers, …) by an optuna study whose every trial
runs hypergradient tuning of the continuous ones (:func:`lrnn.tuning.job.run_job`).

* Storage: ``sqlite:///<out_dir>/study.db`` by default, or any optuna storage URL
  (``postgresql://…`` for several workers on several machines); the study is created or
  loaded by name, so an interrupted study continues where it stopped.
* Trial count: ``search.n_trials`` is the total over all sessions; trials that finished
  (complete, pruned, or failed for a reason of their own) count, interrupted ones do not.
* Workers: ``search.workers`` processes on this machine run trials side by side on the same
  storage; several machines each run the command on one shared storage URL.
* Interrupted trials: with ``search.exclusive = true`` (one command runs the study) a trial left
  ``RUNNING`` by a killed process is marked failed ("interrupted") and re-queued with the same choices; the
  retry resumes that trial's own checkpoint, so no outer step is lost.  With several machines
  (``exclusive = false``) optuna's heartbeat (``search.heartbeat`` seconds) detects dead
  trials and re-queues them the same way.
* Pruning: the monitored validation metric is reported every ``run.eval_every`` outer steps;
  after ``search.prune_warmup`` outer steps (default: half of ``outer.steps``) the median
  pruner stops a trial below the median of earlier trials at the same step.
* Failures: a diverging inner training (NaN or inf) marks the trial failed with the reason in
  its user attribute ``fail_reason``; the study goes on.
"""
from __future__ import annotations

import json
import math
import multiprocessing
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from lrnn.tuning.config import Config
from lrnn.tuning.hypergradient import InnerDivergenceError
from lrnn.tuning.job import run_job, with_model
from lrnn.tuning.report import write_json

FAIL_REASON = "fail_reason"
INTERRUPTED = "interrupted"
WORKER_STAGGER_S = 2.0


def _optuna():
    try:
        import optuna
    except ImportError as error:  # optional extra
        raise ImportError("the [search] section needs optuna: pip install 'hypergrad-lrnn[tune]'") from error
    return optuna


def storage_url(config: Config, out_dir: Path) -> str:
    """``search.storage`` or ``sqlite:///<out_dir>/study.db``."""
    if config.search.storage:
        return config.search.storage
    out_dir.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(out_dir / 'study.db').resolve()}"


def _sampler(optuna, config: Config):
    s = config.search
    if s.sampler == "grid":
        return optuna.samplers.GridSampler(dict(s.space), seed=config.run.seed)
    if s.sampler == "random":
        return optuna.samplers.RandomSampler(seed=config.run.seed)
    return optuna.samplers.TPESampler(seed=config.run.seed)


def _retry_callback(optuna):
    """optuna's re-queueing callback (``RetryHeartbeatStaleTrialCallback`` from 4.9, before it ``RetryFailedTrialCallback``)."""
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning, module="lrnn.tuning.search")
    return getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None) or optuna.storages.RetryFailedTrialCallback


def _storage(optuna, url: str, config: Config):
    """An optuna storage for ``url``; with several workers, heartbeats re-queue trials of dead workers."""
    if config.search.exclusive or not url.startswith(("sqlite", "postgresql", "mysql")):
        return optuna.storages.get_storage(url)
    retry = _retry_callback(optuna)(max_retry=3)
    beat = {"heartbeat_interval": config.search.heartbeat, "grace_period": 2 * config.search.heartbeat}
    if hasattr(optuna.storages, "RetryHeartbeatStaleTrialCallback"):
        return optuna.storages.RDBStorage(url, heartbeat_stale_trial_callback=retry, **beat)
    return optuna.storages.RDBStorage(url, failed_trial_callback=retry, **beat)


def _requeue_interrupted(optuna, study, storage) -> list[int]:
    """Mark trials left RUNNING by a dead process as failed and re-queue them (one worker only)."""
    study_id = storage.get_study_id_from_name(study.study_name)
    requeue = _retry_callback(optuna)(max_retry=None)
    running = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
    for trial in running:
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
        storage.set_trial_user_attr(trial_id, FAIL_REASON, INTERRUPTED)
        storage.set_trial_state_values(trial_id, optuna.trial.TrialState.FAIL)
        frozen = storage.get_trial(trial_id)
        frozen.user_attrs = {k: v for k, v in frozen.user_attrs.items() if k != FAIL_REASON}
        requeue(study, frozen)  # a WAITING copy with the same choices, linked to this trial
    return [t.number for t in running]


def _finished(optuna, study) -> int:
    """Trials that count towards ``n_trials``: complete, pruned or failed, except failed ones that were retried."""
    trials = study.get_trials(deepcopy=False)
    retried = {n for t in trials for n in _retry_callback(optuna).retry_history(t)}
    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.FAIL)
    return sum(1 for t in trials if t.state in states and t.number not in retried)


def _origin(optuna, study, storage, trial) -> int:
    """Trial number whose checkpoint this trial continues (itself, or the interrupted one it retries)."""
    study_id = storage.get_study_id_from_name(study.study_name)
    frozen = storage.get_trial(storage.get_trial_id_from_study_id_trial_number(study_id, trial.number))
    number = _retry_callback(optuna).retried_trial_number(frozen)
    return trial.number if number is None else number


def run_search(config: Config, *, out_dir: str | Path | None = None, progress: bool | None = None) -> dict[str, Any]:
    """Run (or continue) the study of ``config.search``; returns the trials table (also ``trials.json``).

    Every trial runs :func:`~lrnn.tuning.job.run_job` with the sampled ``[model]`` choices in
    ``<out_dir>/trial_<n>`` (resuming its checkpoint if the trial retries an interrupted one).
    With ``search.workers = N > 1``, N processes on this machine share the study's storage and
    run trials side by side (small models leave a GPU mostly idle, so N trials take about the
    time of one); their progress bars are off.
    """
    optuna = _optuna()
    s = config.search
    out = Path(out_dir if out_dir is not None else config.run.out_dir)
    url = storage_url(config, out)
    storage = _storage(optuna, url, config)
    study = _study(optuna, config, storage)
    if s.exclusive:
        _requeue_interrupted(optuna, study, storage)
    remaining = s.n_trials - _finished(optuna, study)
    if remaining > 0 and s.workers == 1:
        _optimize(config, out, url, remaining, progress)
    elif remaining > 0:
        workers = min(s.workers, remaining)
        shares = [remaining // workers + (i < remaining % workers) for i in range(workers)]
        print(f"{remaining} trials in {workers} worker processes; each writes "
              f"{out}/trial_<n>/log.jsonl as it goes", flush=True)
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(workers, mp_context=context) as pool:
            futures = [
                pool.submit(_optimize, config, out, url, share, False, i * WORKER_STAGGER_S)
                for i, share in enumerate(shares)
            ]
            for future in futures:
                future.result()
    table = trials_table(optuna, study)
    out.mkdir(parents=True, exist_ok=True)
    write_json(table, out / "trials.json")
    print(format_trials(table))
    return table


def _study(optuna, config: Config, storage):
    """The study of ``config.search`` in ``storage``, created on first use."""
    s = config.search
    direction = "minimize" if s.objective == "val_loss" else "maximize"
    warmup = s.prune_warmup if s.prune_warmup >= 0 else config.outer.steps // 2
    pruner = (
        optuna.pruners.MedianPruner(n_startup_trials=1, n_warmup_steps=warmup)
        if s.pruner == "median" else optuna.pruners.NopPruner()
    )
    return optuna.create_study(
        storage=storage, study_name=s.study_name or config.run.name, direction=direction,
        sampler=_sampler(optuna, config), pruner=pruner, load_if_exists=True,
    )


def _optimize(config: Config, out: Path, url: str, n_trials: int, progress: bool | None, delay: float = 0.0) -> None:
    """Run ``n_trials`` trials of the study in this process (one worker), after ``delay`` seconds.

    Workers start apart so that each asks the grid sampler after the previous one's trial is
    registered as running, and no grid point is handed out twice.
    """
    time.sleep(delay)
    optuna = _optuna()
    s = config.search
    storage = _storage(optuna, url, config)
    study = _study(optuna, config, storage)
    minimize = study.direction == optuna.study.StudyDirection.MINIMIZE

    def objective(trial) -> float:
        choices = {key: trial.suggest_categorical(key, values) for key, values in s.space.items()}
        origin = _origin(optuna, study, storage, trial)
        trial_config = with_model(config, **choices)
        trial_dir = out / f"trial_{origin}"

        def report(step_report) -> bool:
            metric = step_report.metrics.get("monitor_loss" if minimize else "monitor_scaled_accuracy")
            if metric is not None and math.isfinite(metric):
                trial.report(metric, step_report.step)
                if trial.should_prune():
                    raise optuna.TrialPruned(f"pruned at outer step {step_report.step} ({s.objective} {metric:.4g})")
            return False

        try:
            summary = run_job(trial_config, resume=True, out_dir=trial_dir, hooks=[report], progress=progress)
        except InnerDivergenceError as error:
            trial.set_user_attr(FAIL_REASON, str(error))
            raise
        trial.set_user_attr("final_hyperparameters", summary["hyperparameters"]["final"])
        trial.set_user_attr("test_scaled_accuracy", summary["evaluations"][0]["summary"]["scaled_accuracy_test"])
        trial.set_user_attr("wall_time_s", summary["wall_time_s"])
        trial.set_user_attr("tuning_time_s", summary["tuning_time_s"])
        if minimize:
            return summary["final_monitor"]["loss"]
        return summary["evaluations"][0]["summary"]["scaled_accuracy_test"]

    study.optimize(objective, n_trials=n_trials, catch=(InnerDivergenceError,))


def trials_table(optuna, study) -> dict[str, Any]:
    """Every trial: number, state, choices, value, final hyperparameters, failure reason, and times
    (``wall_time_s`` of the process that finished it, ``tuning_time_s`` of its outer loop over all
    resumed runs)."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        rows.append({
            "number": t.number, "state": t.state.name, "params": t.params, "value": t.value,
            "test_scaled_accuracy": t.user_attrs.get("test_scaled_accuracy"),
            "final_hyperparameters": t.user_attrs.get("final_hyperparameters"),
            "fail_reason": t.user_attrs.get(FAIL_REASON), "retry_of": _retry_callback(optuna).retried_trial_number(t),
            "wall_time_s": t.user_attrs.get("wall_time_s"), "tuning_time_s": t.user_attrs.get("tuning_time_s"),
        })
    complete = [r for r in rows if r["state"] == "COMPLETE"]
    best = None
    if complete:
        best = (min if study.direction == optuna.study.StudyDirection.MINIMIZE else max)(complete, key=lambda r: r["value"])
    return {"study": study.study_name, "direction": study.direction.name, "trials": rows, "best": best}


def format_trials(table: dict[str, Any]) -> str:
    """The trials table as text."""
    lines = [f"study {table['study']} ({table['direction'].lower()}):"]
    lines.append(f"{'#':>3} {'state':<9} {'choices':<36} {'value':>9} {'test acc':>9} {'eigen_scale':<22} note")
    for r in table["trials"]:
        hp = r["final_hyperparameters"] or {}
        s = hp.get("eigen_scale")
        s_text = "" if s is None else json.dumps(_round(s))[:22]
        value = "" if r["value"] is None else f"{r['value']:.4g}"
        acc = "" if r["test_scaled_accuracy"] is None else f"{r['test_scaled_accuracy']:.4f}"
        note = r["fail_reason"] or (f"retry of #{r['retry_of']}" if r["retry_of"] is not None else "")
        lines.append(f"{r['number']:>3} {r['state']:<9} {json.dumps(r['params']):<36} {value:>9} {acc:>9} {s_text:<22} {note[:80]}")
    return "\n".join(lines)


def _round(x: Any) -> Any:
    return [_round(v) for v in x] if isinstance(x, list) else round(float(x), 3)
