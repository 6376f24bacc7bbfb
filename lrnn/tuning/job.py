"""A tuning job: hypergradient descent on the continuous hyperparameters of a DeltaProduct stack.

    λ_{s+1} = P_Λ(λ_s − α ∇̂f(λ_s)),   f(λ) = L_val(θ_t(λ), λ),

with ``θ_t(λ)`` the weights after ``t`` training steps (:mod:`lrnn.tuning.training`),
``∇̂f`` one of the methods of :mod:`lrnn.tuning.hypergradient` and the loop
:func:`hypergrad.bilevel.bilevel` (projection onto the box ``Λ``, warm start optional,
atomic checkpoints every ``run.checkpoint_every`` outer steps).  After the loop the tuned
model (and, with ``final.baseline``, a model trained with the initial hyperparameters for as
many steps) is evaluated at every length; the job writes into ``run.out_dir``:

* ``config.json``: the validated configuration;
* ``checkpoint.pt``: the loop's state (``--resume`` continues from it, bit for bit);
* ``log.jsonl``: one JSON object per outer step (outer loss, hypergradient norm,
  hyperparameters ``hp/<name>/<i>``, training loss, monitored validation metrics);
* ``trajectories.png``, ``accuracy_vs_length.png`` and ``summary.json``.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from hypergrad.bilevel import StepReport, bilevel
from hypergrad.checkpoint import Checkpoint, load_checkpoint
from lrnn.metrics import scaled_accuracy
from lrnn.models import SequenceModel
from lrnn.tasks import Batch, Task, make_task
from lrnn.train import TrainConfig, build_model, environment
from lrnn.tuning.config import Config
from lrnn.tuning.hypergradient import HypergradientSettings, TrainingHypergradient
from lrnn.tuning.hyperparams import HyperSpace, load_into_model
from lrnn.tuning.report import (
    JsonLog,
    history_rows,
    length_curve,
    plot_length_curves,
    plot_trajectories,
    summary_table,
    write_json,
)
from lrnn.tuning.training import InnerOptimizer, State, Trainer

FINAL_SALT = 2**30  # batch stream of the final (re)training runs
Hook = Callable[[StepReport], Any]


class JobError(RuntimeError):
    """A job cannot start or resume (existing output, changed config)."""


@dataclass
class Setup:
    """The objects a job is made of (see :func:`build`)."""

    config: Config
    task: Task
    model: SequenceModel
    space: HyperSpace
    trainer: Trainer
    hypergradient: TrainingHypergradient
    dtype: torch.dtype
    device: torch.device


def _inner_optimizer(config: Config, horizon: int) -> InnerOptimizer:
    c = config.inner
    return InnerOptimizer(
        c.optimizer, tuple(c.betas), c.eps, c.momentum, c.grad_clip, c.warmup, c.schedule, max(1, horizon)
    )


def build(config: Config) -> Setup:
    """Task, model (initialized from ``run.seed``), hyperparameter space, training map, hypergradient."""
    m, t, o = config.model, config.task, config.outer
    task = make_task(t.name)
    dtype = torch.float64 if config.run.dtype == "float64" else torch.float32
    device = torch.device(config.run.device)
    torch.manual_seed(config.run.seed)
    train_config = TrainConfig(
        task=t.name, num_layers=m.num_layers, d_model=m.d_model, num_heads=m.num_heads,
        num_householder=m.num_householder, eigen_scale=2.0, forget_gate=m.forget_gate, short_conv=m.short_conv,
        qk_activation=m.qk_activation, mlp_ratio=m.mlp_ratio, backend=m.backend, chunk_size=m.chunk_size,
    )
    model = build_model(train_config, task).to(device=device, dtype=dtype)
    space = config.hyper_space()
    train_lengths = task.lengths(*t.train_len)
    val_lengths = task.lengths(*t.val_len)
    if not train_lengths or not val_lengths:
        raise JobError(f"task {t.name!r} has no valid length in train_len {t.train_len} or val_len {t.val_len}")
    horizon = o.steps * config.inner.steps if o.warm_start else config.inner.steps
    trainer = Trainer(
        model, space, task, train_lengths, t.batch_size, _inner_optimizer(config, horizon), config.run.seed
    )
    settings = HypergradientSettings(
        method=o.method, inner_steps=config.inner.steps, truncate=o.truncate, segment=o.segment or None,
        val_lengths=tuple(val_lengths), val_batch_size=t.val_batch_size, aid_solver=o.aid_solver,
        aid_iterations=o.aid_iterations, aid_step_size=o.aid_step_size, aid_batch_size=o.aid_batch_size,
    )
    return Setup(config, task, model, space, trainer, TrainingHypergradient(trainer, settings), dtype, device)


def monitor_batches(setup: Setup) -> list[tuple[Batch, int]]:
    """Fixed held-out validation batches: ``(batch, first scored position)``.

    Running tasks: one batch of the longest validation length, scored from the shortest;
    the others: one batch at each of up to four lengths spread over the validation range.
    """
    t, task = setup.config.task, setup.task
    rng = np.random.default_rng([setup.config.run.seed, 2**31 + 2])
    lengths = task.lengths(*t.val_len)
    if task.running:
        picks = [(lengths[-1], lengths[0] - 1)]
    else:
        picks = [(n, 0) for n in sorted(set(lengths[:: max(1, len(lengths) // 4)][:3] + [lengths[-1]]))]
    out = []
    for length, start in picks:
        batch = task.sample(t.val_batch_size, length, rng)
        out.append((Batch(*(x.to(setup.device) for x in batch)), start))
    return out


@torch.no_grad()
def monitor(setup: Setup, params: dict, lam: dict, batches: list[tuple[Batch, int]]) -> tuple[float, float]:
    """``(loss, scaled accuracy)`` on the monitor batches (scored positions at validation lengths)."""
    losses, accs = [], []
    for batch, start in batches:
        mask = batch.mask.clone()
        mask[:, :start] = False
        logits = setup.trainer.logits(params, lam, batch.tokens)
        losses.append(float(F.cross_entropy(logits[mask], batch.labels[mask])))
        accs.append(float((logits.argmax(-1)[mask] == batch.labels[mask]).double().mean()))
    return float(np.mean(losses)), float(scaled_accuracy(float(np.mean(accs)), setup.task.num_classes))


def train_fixed(setup: Setup, lam: dict, steps: int, desc: str, progress: bool, salt: int = FINAL_SALT) -> State:
    """Train from ``θ₀`` for ``steps`` steps with fixed hyperparameters ``λ`` (schedule over ``steps``)
    on the minibatch stream ``salt``."""
    trainer = copy.copy(setup.trainer)
    trainer.optimizer = _inner_optimizer(setup.config, steps)
    state = trainer.initial_state()
    phi = trainer.step_map(salt)
    with torch.no_grad():
        for _ in tqdm(range(steps), desc=desc, disable=not progress, leave=False):
            state = phi(state, lam)
    return state


def evaluate_state(setup: Setup, name: str, state: State, lam: dict, steps: int) -> dict[str, Any]:
    """Evaluation of the model with ``state``'s weights and hyperparameters ``λ`` at every length."""
    model = load_into_model(copy.deepcopy(setup.model), state["params"], setup.space.full(lam))
    t = setup.config.task
    curve = length_curve(model, setup.task, t.train_len, t.test_len, t.eval_batch_size, setup.config.run.seed + 1, setup.device)
    return {
        "name": name, "train_steps": steps, "final_train_loss": float(state["loss"]),
        "config": {"task": t.name, "train_len": list(t.train_len), "test_len": list(t.test_len)}, **curve,
    }


def _comparable(config_dict: dict[str, Any]) -> dict[str, Any]:
    out = json.loads(json.dumps(config_dict))
    for key in ("progress", "threads", "out_dir"):
        out["run"].pop(key, None)
    out.pop("search", None)
    return out


def _prepare_output(config: Config, out: Path, resume: bool, log: JsonLog) -> None:
    checkpoint = out / "checkpoint.pt"
    saved = out / "config.json"
    if checkpoint.exists() and not resume:
        raise JobError(f"{checkpoint} exists: pass --resume to continue that run, or choose another run.out_dir")
    if resume and checkpoint.exists():
        if saved.exists() and _comparable(json.loads(saved.read_text())) != _comparable(config.to_dict()):
            raise JobError(f"the config differs from the one the checkpoint in {out} was made with ({saved})")
        state = load_checkpoint(checkpoint)
        log.reset(history_rows(state["history"]))
    else:
        log.reset()
    out.mkdir(parents=True, exist_ok=True)
    saved.write_text(json.dumps(config.to_dict(), indent=2))


def _outer_optimizer(config: Config) -> Callable[[list[torch.Tensor]], torch.optim.Optimizer]:
    lr = config.outer.lr
    if config.outer.optimizer == "adam":
        return lambda params: torch.optim.Adam(params, lr=lr)
    return lambda params: torch.optim.SGD(params, lr=lr)


def run_job(
    config: Config, *, resume: bool = False, out_dir: str | Path | None = None, hooks: Sequence[Hook] = (),
    progress: bool | None = None,
) -> dict[str, Any]:
    """Run (or resume) a tuning job; returns the summary (also written to ``summary.json``).

    Args:
        config: a validated :class:`~lrnn.tuning.config.Config`.
        resume: continue from ``<out_dir>/checkpoint.pt`` if it exists.
        out_dir: overrides ``config.run.out_dir``.
        hooks: ``hook(report)`` after every outer step (after logging); returning ``True`` stops
            the loop; exceptions propagate (e.g. ``optuna.TrialPruned``).
        progress: progress bars (default ``config.run.progress``).

    Raises:
        JobError: the output folder holds a checkpoint and ``resume`` is false, or the config changed.
        InnerDivergenceError: the inner training produced NaN or inf.
    """
    start = time.perf_counter()
    out = Path(out_dir if out_dir is not None else config.run.out_dir)
    progress = config.run.progress if progress is None else progress
    if config.run.threads > 0:
        torch.set_num_threads(config.run.threads)
    log = JsonLog(out / "log.jsonl")
    _prepare_output(config, out, resume, log)
    setup = build(config)
    space, trainer = setup.space, setup.trainer
    lam0 = space.initial(setup.dtype, setup.device)
    batches = monitor_batches(setup)
    steps, every = config.outer.steps, config.run.eval_every

    def on_step(report: StepReport) -> bool:
        row = report.metrics
        for key, value in report.lam.items():
            for i, x in enumerate(value.flatten().tolist()):
                row[f"hp/{key}/{i}"] = x
        state = report.hypergradient.info.w
        row["train_loss"] = float(state["loss"])
        row["inner_step"] = float(state["step"])
        if every > 0 and ((report.step + 1) % every == 0 or report.step + 1 == steps):
            row["monitor_loss"], row["monitor_scaled_accuracy"] = monitor(setup, state["params"], report.lam, batches)
        log.append(row)
        return any([bool(hook(report)) for hook in hooks])  # noqa: C419 (every hook runs)

    result = bilevel(
        setup.hypergradient, lam0, trainer.initial_state(), steps=steps, optimizer=_outer_optimizer(config),
        bounds=space.bounds(setup.dtype, setup.device), warm_start=config.outer.warm_start, seed=config.run.seed,
        callbacks=[on_step], checkpoint=Checkpoint(out / "checkpoint.pt", every=config.run.checkpoint_every),
        progress=progress,
    )
    space.check(result.lam)
    tuning_time = result.history["wall_time"][-1] if len(result.history) else 0.0
    evaluations = _final_models(setup, result, lam0, progress)
    summary = {
        "name": config.run.name,
        "environment": environment(),
        "config": config.to_dict(),
        "outer_steps": result.steps,
        "stopped_early": result.stopped,
        "hyperparameters": {"initial": space.describe(lam0), "final": space.describe(result.lam)},
        "final_lambda": {k: v.tolist() for k, v in result.lam.items()},
        "final_monitor": dict(zip(("loss", "scaled_accuracy"), monitor(setup, result.w["params"], result.lam, batches))),
        "evaluations": evaluations,
        "history": result.history.state_dict(),
        "tuning_time_s": tuning_time,
        "wall_time_s": time.perf_counter() - start,
    }
    _write_outputs(summary, out)
    return summary


def _final_models(setup: Setup, result: Any, lam0: dict, progress: bool) -> list[dict[str, Any]]:
    c = setup.config
    if c.final.retrain_steps > 0:
        steps = c.final.retrain_steps
        state = train_fixed(setup, result.lam, steps, "retrain (tuned)", progress)
        name = "tuned hyperparameters (retrained)"
    elif c.outer.warm_start:
        steps, state, name = int(result.w["step"]), result.w, "tuned (trained while tuning)"
    else:
        steps = c.inner.steps
        state = train_fixed(setup, result.lam, steps, "train (tuned)", progress)
        name = "tuned hyperparameters"
    evaluations = [evaluate_state(setup, name, state, result.lam, steps)]
    if c.final.baseline and steps > 0:
        base = train_fixed(setup, lam0, steps, "train (initial)", progress)
        evaluations.append(evaluate_state(setup, "initial hyperparameters", base, lam0, steps))
    return evaluations


def _write_outputs(summary: dict[str, Any], out: Path) -> None:
    write_json(summary, out / "summary.json")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("(no PNG plots: matplotlib is not installed)")
    else:
        plot_trajectories(summary["history"], out / "trajectories.png", summary["name"])
        title = f"{summary['name']}: accuracy against length"
        plot_length_curves(summary["evaluations"], out / "accuracy_vs_length.png", title)
    print(summary_table(summary))


def with_model(config: Config, **choices: Any) -> Config:
    """A copy of ``config`` with ``[model]`` fields replaced (e.g. ``num_householder=2``)."""
    return dataclasses.replace(config, model=dataclasses.replace(config.model, **choices))


