"""Meta-training loop (progress bar, checkpoints) and batched prediction.

Training minimises, over random windows of the training pool, the forecast loss

    mae:    mean_{k, observed} |y_{L+k} − ŷ_{L+k}| / s
    smape:  mean_{k, observed} 2 |y − ŷ| / (|y| + |ŷ|)

with Adam and gradient-norm clipping; the learning rate decays by cosine to 10 %.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from examples.meta_forecasting.data import Batch, WindowSampler
from examples.meta_forecasting.model import MetaForecaster, ModelConfig


@dataclass
class TrainConfig:
    """Optimisation settings (stored in checkpoints and results)."""

    steps: int = 200
    batch_size: int = 256
    lr: float = 3e-3
    hyper_lr: float = 3e-2
    weight_decay: float = 0.0
    loss: Literal["mae", "smape"] = "mae"
    grad_clip: float = 1.0
    seed: int = 0
    checkpoint_every: int = 0


def forecast_loss(pred: Tensor, future: Tensor, mask: Tensor, scale: Tensor, kind: str) -> Tensor:
    """Masked mean forecast loss (see the module docstring)."""
    m = mask.to(pred.dtype)
    if kind == "mae":
        err = (pred - future).abs() / scale[:, None]
    elif kind == "smape":
        denom = (pred.abs() + future.abs()).clamp_min(1e-8)
        err = 2 * (pred - future).abs() / denom
    else:
        raise ValueError(f"loss must be 'mae' or 'smape', got {kind!r}")
    return (err * m).sum() / m.sum().clamp_min(1)


def save_checkpoint(path: Path, model: MetaForecaster, opt: torch.optim.Optimizer, step: int, tcfg: TrainConfig) -> None:
    """Model and optimiser state with both configs (``torch.load(path)`` restores them)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step,
         "model_config": model.cfg.to_dict(), "train_config": asdict(tcfg)},
        path,
    )


def load_model(path: str | Path) -> MetaForecaster:
    """Rebuild a :class:`MetaForecaster` from a checkpoint written by :func:`train`."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    model = MetaForecaster(ModelConfig(**state["model_config"]))
    model.load_state_dict(state["model"])
    return model


def train(
    model: MetaForecaster,
    sampler: WindowSampler,
    tcfg: TrainConfig,
    *,
    checkpoint: str | Path | None = None,
    progress: bool = True,
) -> dict:
    """Meta-train ``model`` on windows from ``sampler``; return the loss history and timing.

    A checkpoint is written every ``tcfg.checkpoint_every`` steps (if positive) and at the end
    when ``checkpoint`` is given. Raises ``FloatingPointError`` on a non-finite loss.
    """
    torch.manual_seed(tcfg.seed)
    rng = np.random.default_rng(tcfg.seed)
    hyper = [p for n, p in model.named_parameters() if n.startswith("log_")]
    rest = [p for n, p in model.named_parameters() if not n.startswith("log_")]
    opt = torch.optim.Adam(
        [{"params": rest, "weight_decay": tcfg.weight_decay}, {"params": hyper, "lr": tcfg.hyper_lr}], lr=tcfg.lr
    )
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(i, tcfg.steps) / max(tcfg.steps, 1)))
    )
    device = next(model.parameters()).device
    losses = []
    start, cpu_start = time.perf_counter(), time.process_time()
    model.train()
    bar = tqdm(range(tcfg.steps), disable=not progress, desc=f"{model.cfg.head} seed {tcfg.seed}", leave=False)
    for step in bar:
        batch = sampler.sample(tcfg.batch_size, rng).to(device)
        pred, scale = model(batch.past, batch.past_mask)
        loss = forecast_loss(pred, batch.future, batch.future_mask, scale, tcfg.loss)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite training loss at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % 20 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
        if checkpoint is not None and tcfg.checkpoint_every > 0 and (step + 1) % tcfg.checkpoint_every == 0:
            save_checkpoint(Path(checkpoint), model, opt, step + 1, tcfg)
    if checkpoint is not None:
        save_checkpoint(Path(checkpoint), model, opt, tcfg.steps, tcfg)
    return {"loss": losses, "train_seconds": time.perf_counter() - start, "train_cpu_seconds": time.process_time() - cpu_start}


@torch.no_grad()
def predict(model: MetaForecaster, batch: Batch, batch_size: int = 1024) -> np.ndarray:
    """Forecasts ``[N, H]`` (float64 numpy) for every window of ``batch``."""
    model.eval()
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(batch.past), batch_size):
        pred, _ = model(batch.past[i : i + batch_size].to(device), batch.past_mask[i : i + batch_size].to(device))
        out.append(pred.double().cpu().numpy())
    return np.concatenate(out)


def write_json(path: str | Path, payload: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=float) + "\n")
