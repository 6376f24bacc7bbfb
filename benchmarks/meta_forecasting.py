"""Zero-shot meta-forecasting benchmark: meta-train on M1 + M3, forecast Tourism (never seen).

For one frequency, in one run:

* Meta-GLAR (GRU encoder + per-series ridge head, implicit hypergradients) for each seed;
* the same network with a global linear head for each seed;
* seasonal naive; AutoETS and Theta from statsforecast per target series (when installed);

scored by sMAPE, MASE, MAPE, ND and NRMSE on the official Tourism holdouts. Per-seed
results, mean ± standard deviation over seeds, and the median ensemble of the seeds'
forecasts go into ``benchmarks/results/meta_forecasting_<frequency>.json`` with a PNG
of forecasts against actuals.

    python benchmarks/meta_forecasting.py --frequency quarterly

Training runs go to ``--jobs`` worker processes (default: one per usable core) with
``--threads`` torch threads each (default 1); the baselines run meanwhile in the main
process. Small recurrent and batched-solve kernels scale poorly over threads, and
several threads per process stall badly on a loaded machine, so processes of one
thread are the fast configuration on CPU.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from concurrent.futures import ProcessPoolExecutor
import multiprocessing
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from examples.meta_forecasting.baselines import seasonal_naive, statsforecast_forecasts  # noqa: E402
from examples.meta_forecasting.data import WindowSampler  # noqa: E402
from examples.meta_forecasting.metrics import evaluate  # noqa: E402
from examples.meta_forecasting.model import MetaForecaster  # noqa: E402
from examples.meta_forecasting.plots import plot_forecasts  # noqa: E402
from examples.meta_forecasting.protocol import (  # noqa: E402
    fit_forecast,
    model_config,
    train_config,
    with_seed,
    zero_shot_task,
)

METRICS = ("smape", "mase", "mape", "nd", "nrmse")
RESULTS = Path(__file__).resolve().parent / "results"


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def environment(threads: int, jobs: int = 1) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "device": f"cpu ({cpu})",
        "torch_threads": threads,
        "jobs": jobs,
        "cpu_count": os.cpu_count(),
        "affinity": usable_cores(),
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def summarize(per_seed: list[dict]) -> dict:
    """Mean, standard deviation (ddof 1), min and max over seeds of every measure."""
    out = {}
    for m in METRICS:
        v = np.array([r["metrics"][m] for r in per_seed])
        out[m] = {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
                  "min": float(v.min()), "max": float(v.max())}
    return out


def baselines(args: argparse.Namespace, target, score, rows: dict, forecasts: dict, notes: list) -> None:
    """Seasonal naive, and AutoETS and Theta when statsforecast is installed (and not switched off)."""
    f = seasonal_naive(target.train, target.horizon, target.period)
    rows["seasonal naive"] = {"metrics": score(f), "seconds": 0.0}
    forecasts["seasonal naive"] = f
    if args.no_statsforecast:
        notes.append("AutoETS/Theta skipped (--no-statsforecast)")
    else:
        try:
            for name in ("autoets", "theta"):
                f, seconds = statsforecast_forecasts(target.train, target.horizon, target.period, name)
                label = {"autoets": "AutoETS", "theta": "Theta"}[name]
                rows[label] = {"metrics": score(f), "seconds": seconds}
                forecasts[label] = f
        except ImportError:
            notes.append("AutoETS/Theta skipped: statsforecast not installed")


def _fit(task, mcfg, tcfg, checkpoint, progress, threads):
    """One training run (also the body of a worker process)."""
    torch.set_num_threads(threads)
    return fit_forecast(task, mcfg, tcfg, checkpoint=checkpoint, progress=progress)


def step_timing(args: argparse.Namespace) -> None:
    """Seconds per training step (forward + backward) with implicit vs autograd differentiation of the ridge."""
    task = zero_shot_task(args.frequency)
    batch = None
    out = {}
    for adapt in ("implicit", "autograd"):
        mcfg = model_config(task, adapt=adapt)
        sampler = WindowSampler(task.pool, mcfg.context, mcfg.horizon, min_past=task.min_past)
        batch = batch or sampler.sample(train_config(task).batch_size, np.random.default_rng(0))
        torch.manual_seed(0)
        model = MetaForecaster(mcfg)
        times = []
        for i in range(12):
            start = time.perf_counter()
            pred, _ = model(batch.past, batch.past_mask)
            pred.sum().backward()
            times.append(time.perf_counter() - start)
        out[adapt] = {"median_s": float(np.median(times[2:])), "min_s": float(np.min(times[2:]))}
        print(f"{adapt:9s} median {out[adapt]['median_s'] * 1e3:.1f} ms  min {out[adapt]['min_s'] * 1e3:.1f} ms per step")
    payload = {"benchmark": "meta_forecasting_step_timing", "frequency": args.frequency,
               "batch_size": len(batch.past), "model": model_config(task).to_dict(),
               "environment": environment(args.threads), "results": out, "load_average": os.getloadavg()}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"meta_forecasting_step_timing_{args.frequency}{args.tag}.json").write_text(json.dumps(payload, indent=2) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--frequency", default="quarterly", choices=["yearly", "quarterly", "monthly"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, help="training steps (default: the frequency's, protocol.TRAIN_DEFAULTS)")
    p.add_argument("--global-steps", type=int, help="steps of the global-head network (default --steps)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per training process")
    p.add_argument("--jobs", type=int, default=0,
                   help="training runs in parallel worker processes (0: one per usable core; 1: all in this process)")
    p.add_argument("--no-statsforecast", action="store_true", help="skip AutoETS and Theta")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--no-ablation", action="store_true", help="skip the untrained-encoder ablation")
    p.add_argument("--checkpoints", default="runs/meta_forecasting", help="checkpoint folder ('' for none)")
    p.add_argument("--tag", default="", help="suffix of the result files")
    p.add_argument("--step-timing", action="store_true", help="only time training steps, implicit vs autograd")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.step_timing:
        return step_timing(args)
    wall, cpu = time.perf_counter(), time.process_time()

    task = zero_shot_task(args.frequency)
    n_steps = args.steps if args.steps is not None else train_config(task).steps
    target = task.target
    actual = np.stack(target.test)
    score = lambda f: evaluate(actual, f, target.train, target.period)  # noqa: E731
    rows: dict[str, dict] = {}
    forecasts: dict[str, np.ndarray] = {}

    jobs: list[tuple] = []
    notes: list[str] = []
    variants = [("Meta-GLAR", "local", n_steps), ("global head", "global", args.global_steps or n_steps)]
    if not args.no_ablation:  # the same model with its random initial encoder and initial λ, ρ
        variants.append(("Meta-GLAR, untrained", "local", 0))
    runs: dict[str, list[dict]] = {label: [] for label, _, _ in variants}
    seed_forecasts: dict[str, list[np.ndarray]] = {label: [] for label, _, _ in variants}
    configs = {}
    for label, head, steps in variants:
        mcfg, tcfg = model_config(task, head=head), train_config(task, steps=steps)
        configs[label] = {"model": mcfg.to_dict(), "train": vars(tcfg)}
        for seed in args.seeds:
            ckpt = f"{args.checkpoints}/{args.frequency}_{head}_seed{seed}.pt" if args.checkpoints and steps else None
            jobs.append((label, seed, (task, mcfg, with_seed(tcfg, seed), ckpt, not args.no_progress, args.threads)))
    n_jobs = min(args.jobs or usable_cores(), len(jobs))
    if n_jobs > 1:  # seeds and heads in parallel processes (longest first), baselines meanwhile in this one
        pool = ProcessPoolExecutor(n_jobs, mp_context=multiprocessing.get_context("spawn"))
        futures = [pool.submit(_fit, *job) for _, _, job in jobs]
    baselines(args, target, score, rows, forecasts, notes)
    for i, (label, seed, job) in enumerate(jobs):
        f, record = futures[i].result() if n_jobs > 1 else _fit(*job)
        record.update(seed=seed, metrics=score(f))
        runs[label].append(record)
        seed_forecasts[label].append(f)
        print(f"{label:12s} seed {seed}: sMAPE {record['metrics']['smape']:.3f}  "
              f"train {record['train_seconds']:.1f}s", flush=True)
    for label in runs:
        ensemble = np.median(np.stack(seed_forecasts[label]), axis=0)
        rows[f"{label} (mean over seeds)"] = {"summary": summarize(runs[label]),
                                             "seconds": float(sum(r["train_seconds"] for r in runs[label]))}
        rows[f"{label} (median ensemble)"] = {"metrics": score(ensemble)}
        forecasts[label] = seed_forecasts[label][0]

    total, cpu_total = time.perf_counter() - wall, time.process_time() - cpu
    train_cpu = sum(r["train_cpu_seconds"] for rs in runs.values() for r in rs)
    print(f"\nZero-shot {'+'.join(('M1', 'M3'))} → Tourism {args.frequency} (h={target.horizon}, "
          f"{len(target)} series), {len(args.seeds)} seeds, {total:.0f}s wall on {n_jobs} worker(s) × "
          f"{args.threads} thread(s); CPU: {train_cpu:.0f}s training, {cpu_total:.0f}s main process "
          f"(load average {os.getloadavg()[0]:.1f})")
    print(f"{'method':40s}" + "".join(f"{m:>16s}" for m in METRICS))
    for name, row in rows.items():
        if "summary" in row:
            cells = "".join(f"{row['summary'][m]['mean']:9.3f}±{row['summary'][m]['std']:<6.3f}" for m in METRICS)
        else:
            cells = "".join(f"{row['metrics'][m]:16.3f}" for m in METRICS)
        print(f"{name:40s}{cells}")

    stem = f"meta_forecasting_{args.frequency}{args.tag}"
    RESULTS.mkdir(parents=True, exist_ok=True)
    shown = {k: forecasts[k] for k in ("Meta-GLAR", "AutoETS", "seasonal naive") if k in forecasts}
    png = plot_forecasts(RESULTS / f"{stem}.png", target, shown,
                         title=f"Tourism {args.frequency}: zero-shot forecasts (trained on M1+M3)")
    payload = {
        "benchmark": "meta_forecasting",
        "protocol": {"train": f"M1+M3 {args.frequency} (whole series)", "test": f"Tourism {args.frequency}",
                     "horizon": target.horizon, "n_test_series": len(target),
                     "n_train_series": runs["Meta-GLAR"][0]["n_train_series"],
                     "n_train_series_too_short": runs["Meta-GLAR"][0]["n_train_series_too_short"],
                     "n_test_series_padded": runs["Meta-GLAR"][0]["n_target_padded"]},
        "environment": environment(args.threads, n_jobs),
        "seeds": args.seeds,
        "configs": configs,
        "results": rows,
        "per_seed": runs,
        "notes": notes,
        "wall_seconds": total,
        "train_cpu_seconds": train_cpu,
        "cpu_seconds_main_process": cpu_total,
        "load_average_at_end": os.getloadavg(),
        "plot": png.name,
        "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
    }
    (RESULTS / f"{stem}.json").write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {RESULTS / (stem + '.json')} and {png}")


if __name__ == "__main__":
    main()
