"""Group word problems (S3, S4): optuna over n_h, hypergradients for s, gates and β bias inside every trial.

    python benchmarks/tune_group_search.py --config examples/configs/s3_search.toml
    python benchmarks/tune_group_search.py --config examples/configs/s4_search.toml --device cpu

Runs the study of the config from scratch (``--resume``: continues the study left in
``runs/bench_<name>``, e.g. by a run that hit a time limit) with
:func:`lrnn.tuning.search.run_search`, then writes
``benchmarks/results/tune_<name>.json`` (trials table, environment, per-trial trajectories) and
``.png`` (eigen_scale and monitored validation accuracy against outer step, one line per trial),
and prints the trials table.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import time
from pathlib import Path

import numpy as np

from lrnn.train import environment
from lrnn.tuning.cli import add_set_option
from lrnn.tuning.config import load_config
from lrnn.tuning.report import write_json
from lrnn.tuning.search import run_search

ROOT = Path(__file__).parents[1]
RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--device", help="override run.device")
    parser.add_argument("--out", type=Path, help="results stem (default benchmarks/results/tune_<name>)")
    parser.add_argument("--resume", action="store_true", help="continue the study in runs/bench_<name>")
    add_set_option(parser)
    args = parser.parse_args()
    config = load_config(args.config, args.set)
    run_dir = ROOT / "runs" / f"bench_{config.run.name}"
    run = dataclasses.replace(config.run, out_dir=str(run_dir), progress=False, device=args.device or config.run.device)
    config = dataclasses.replace(config, run=run)
    if not args.resume:
        shutil.rmtree(run_dir, ignore_errors=True)
    start = time.perf_counter()
    table = run_search(config)
    wall = time.perf_counter() - start
    trials = {}
    for row in table["trials"]:
        if row["fail_reason"] == "interrupted":
            continue  # its retry continues it in the same folder
        folder = run_dir / f"trial_{row['number'] if row['retry_of'] is None else row['retry_of']}"
        summary, log = folder / "summary.json", folder / "log.jsonl"
        rows = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
        trials[row["number"]] = {
            "params": row["params"], "state": row["state"],
            "eigen_scale": [[r[k] for k in r if k.startswith("hp/eigen_scale/")] for r in rows],
            "monitor_scaled_accuracy": [r.get("monitor_scaled_accuracy") for r in rows],
            "evaluations": json.loads(summary.read_text())["evaluations"] if summary.exists() else None,
        }
    stem = args.out or RESULTS / f"tune_{config.run.name}"
    write_json({"environment": environment(), "config": config.to_dict(), "wall_time_s": wall, "table": table,
                "trials": trials}, stem.with_suffix(".json"))
    plot(config.task.name, trials, stem.with_suffix(".png"))
    print(f"wall time {wall:.0f} s")


def plot(task: str, trials: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for number, t in trials.items():
        label = f"#{number} " + ", ".join(f"{k}={v}" for k, v in t["params"].items()) + f" ({t['state'].lower()})"
        s = np.asarray([np.mean(x) if x else np.nan for x in t["eigen_scale"]], dtype=float)
        axes[0].plot(np.arange(1, len(s) + 1), s, label=label)
        acc = np.asarray([np.nan if a is None else a for a in t["monitor_scaled_accuracy"]], dtype=float)
        keep = np.isfinite(acc)
        axes[1].plot(np.arange(1, len(acc) + 1)[keep], acc[keep], "o-", ms=3, label=label)
    axes[0].set_ylabel("eigen_scale s (mean over layers)")
    axes[1].set_ylabel("validation scaled accuracy")
    for ax in axes:
        ax.set_xlabel("outer step")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.suptitle(f"{task}: optuna over n_h, hypergradients for s, gates and β bias")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
