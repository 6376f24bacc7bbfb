"""Outputs of a tuning job: JSON-lines log, evaluation against length, PNG plots, summary table."""
from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from lrnn.models import SequenceModel
from lrnn.tasks import Task
from lrnn.train import evaluate, plot_results, summarize


class JsonLog:
    """Append-only JSON-lines log (one object per outer step), rewritten on resume."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def reset(self, rows: Iterable[dict[str, Any]] = ()) -> None:
        """Replace the log by ``rows`` (those of the checkpoint a resumed run starts from)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(json.dumps(_finite(row)) + "\n" for row in rows))
        tmp.replace(self.path)

    def append(self, row: dict[str, Any]) -> None:
        with open(self.path, "a") as handle:
            handle.write(json.dumps(_finite(row)) + "\n")


def _finite(value: Any) -> Any:
    """JSON has no NaN or inf: ``null`` instead, recursively."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def write_json(obj: Any, path: str | Path) -> None:
    """Strict JSON (non-finite numbers as ``null``), indented, folder created."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(_finite(obj), indent=2))


def history_rows(columns: dict[str, list[float]]) -> list[dict[str, float]]:
    """Rows of a :class:`hypergrad.bilevel.History` column dict."""
    n = len(columns.get("step", []))
    return [{k: (int(v[i]) if k == "step" else v[i]) for k, v in columns.items()} for i in range(n)]


def length_curve(
    model: SequenceModel, task: Task, train_len: list[int], test_len: list[int], batch_size: int, seed: int, device
) -> dict[str, Any]:
    """Accuracy, scaled accuracy and sequence accuracy at every length from the shortest training
    length to the longest test length, and their means over both ranges (:func:`lrnn.train.summarize`)."""
    low, high = min(train_len[0], test_len[0]), max(train_len[1], test_len[1])
    lengths = task.lengths(low, high)
    if not task.running:
        stride = max(1, len(lengths) // 24)
        lengths = sorted(set(lengths[::stride]) | {lengths[-1]})
    curve = evaluate(model, task, lengths, batch_size, np.random.default_rng(seed), device)
    ranges = SimpleNamespace(train_len=tuple(train_len), test_len=tuple(test_len))
    return {"eval": curve, "summary": summarize(curve, ranges)}


def plot_trajectories(columns: dict[str, list[float]], path: str | Path, title: str = "") -> None:
    """Hyperparameter trajectories (columns ``hp/<name>/<i>``), validation loss and accuracy against outer step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted({k.split("/")[1] for k in columns if k.startswith("hp/")})
    panels = names + ["validation"]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    steps = np.asarray(columns["step"]) + 1
    for ax, name in zip(axes[0], panels):
        if name == "validation":
            ax.plot(steps, columns["value"], lw=0.8, alpha=0.6, label="outer loss (val batch)")
            acc = np.asarray(columns.get("monitor_scaled_accuracy", [math.nan] * len(steps)), dtype=float)
            keep = np.isfinite(acc)
            if keep.any():
                ax.plot(steps[keep], acc[keep], "o-", ms=3, label="val scaled accuracy")
            ax.set_title("validation")
        else:
            keys = sorted((k for k in columns if k.startswith(f"hp/{name}/")), key=lambda k: int(k.rsplit("/", 1)[1]))
            for key in keys:
                ax.plot(steps, columns[key], lw=1.0, label=key.rsplit("/", 1)[1] if len(keys) <= 8 else None)
            ax.set_title("lr (log)" if name == "log_lr" else name)
            if 1 < len(keys) <= 8:
                ax.legend(fontsize=7, title="entry", title_fontsize=7)
        ax.set_xlabel("outer step")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_length_curves(runs: list[dict[str, Any]], path: str | Path, title: str) -> None:
    """Validation accuracy against sequence length, one line per evaluated model."""
    plot_results(runs, path, title)


def summary_table(result: dict[str, Any]) -> str:
    """Text table: hyperparameters before and after, evaluations, timing."""
    lines = [f"== {result['name']}: {result['outer_steps']} outer steps, tuning {result['tuning_time_s']:.1f} s "
             f"in all (resumed runs included), this process {result['wall_time_s']:.1f} s =="]
    lines.append(f"{'hyperparameter':<16} {'initial':>28} {'final':>28}")
    for key, final in result["hyperparameters"]["final"].items():
        init = result["hyperparameters"]["initial"][key]
        lines.append(f"{key:<16} {_short(init):>28} {_short(final):>28}")
    lines.append(f"{'model':<30} {'steps':>6} {'scaled acc train':>16} {'scaled acc test':>16} {'seq acc @test max':>17}")
    for run in result["evaluations"]:
        s = run["summary"]
        lines.append(
            f"{run['name']:<30} {run['train_steps']:>6} {s['scaled_accuracy_train']:>16.4f} "
            f"{s['scaled_accuracy_test']:>16.4f} {s['sequence_accuracy_at_test_max']:>17.4f}"
        )
    return "\n".join(lines)


def _short(value: Any) -> str:
    flat = np.asarray(value, dtype=float).ravel()
    if flat.size == 1:
        return f"{flat[0]:.4g}"
    if flat.size <= 4:
        return "[" + ", ".join(f"{x:.3g}" for x in flat) + "]"
    return f"[{flat.min():.3g} … {flat.max():.3g}] ({flat.size})"
