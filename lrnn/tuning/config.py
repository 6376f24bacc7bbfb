"""Configuration of a tuning job: TOML sections as dataclasses, strictly validated.

A config file has the sections ``[run]``, ``[task]``, ``[model]``, ``[inner]``, ``[outer]``,
``[hyper.<name>]`` (``eigen_scale``, ``step_gates``, ``beta_bias``, ``lr``, ``weight_decay``),
``[final]`` and, for an optuna search over discrete choices, ``[search]`` with
``[search.space]``.  Every key is optional.  A key that does not exist raises
:class:`ConfigError` naming it and listing the valid keys of its section; so does a value of
the wrong type or out of range, and a hyperparameter whose ``init`` or ``bounds`` leave the
range the model accepts (``s ∈ [1, 2]``, ``m ∈ [0, 1]``, ``lr > 0``, ``weight_decay ≥ 0``).
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

from lrnn.tasks import TASKS
from lrnn.tuning.hyperparams import (
    HYPERPARAMETERS,
    HyperparameterError,
    HyperSetting,
    HyperSpace,
)


class ConfigError(ValueError):
    """An invalid configuration: the message names the key and what is allowed."""


@dataclass
class RunSection:
    """``[run]``: output folder, seed, device, checkpointing and logging."""

    name: str = "tune"
    out_dir: str = "runs/tune"
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"
    threads: int = 0
    checkpoint_every: int = 1
    eval_every: int = 10
    progress: bool = True


@dataclass
class TaskSection:
    """``[task]``: the generated task, training / validation / test lengths and batch sizes."""

    name: str = "parity"
    train_len: list = field(default_factory=lambda: [3, 40])
    val_len: list = field(default_factory=lambda: [40, 128])
    test_len: list = field(default_factory=lambda: [40, 256])
    batch_size: int = 32
    val_batch_size: int = 32
    eval_batch_size: int = 256


@dataclass
class ModelSection:
    """``[model]``: the DeltaProduct stack (:class:`lrnn.models.SequenceModel`)."""

    num_layers: int = 1
    d_model: int = 32
    num_heads: int = 2
    num_householder: int = 1
    mlp_ratio: int = 2
    short_conv: bool = True
    qk_activation: str = "silu"
    forget_gate: bool = False
    backend: str = "chunked"
    chunk_size: int = 64


@dataclass
class InnerSection:
    """``[inner]``: the training (lower level); ``steps`` training steps per outer step."""

    optimizer: str = "adam"
    steps: int = 10
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    momentum: float = 0.0
    grad_clip: float = 1.0
    warmup: int = 0
    schedule: str = "constant"


@dataclass
class OuterSection:
    """``[outer]``: the hypergradient method and the projected outer optimizer."""

    method: str = "truncated_itd"
    steps: int = 100
    truncate: int = 1
    segment: int = 0
    warm_start: bool = True
    optimizer: str = "adam"
    lr: float = 0.05
    aid_solver: str = "neumann"
    aid_iterations: int = 10
    aid_step_size: float = 0.01
    aid_batch_size: int = 128


@dataclass
class HyperSection:
    """``[hyper.<name>]``: one continuous hyperparameter (see :mod:`lrnn.tuning.hyperparams`)."""

    tune: bool = False
    init: Any = None
    bounds: list = field(default_factory=list)
    per: str = "layer"
    fix_first: bool = True


HYPER_DEFAULTS = {
    "eigen_scale": HyperSection(init=2.0, bounds=[1.0, 2.0]),
    "step_gates": HyperSection(init=1.0, bounds=[0.0, 1.0]),
    "beta_bias": HyperSection(init=0.0, bounds=[-4.0, 4.0], per="head"),
    "lr": HyperSection(init=1e-3, bounds=[1e-5, 1e-1]),
    "weight_decay": HyperSection(init=0.0, bounds=[0.0, 1.0], per="global"),
}


@dataclass
class FinalSection:
    """``[final]``: what is trained and evaluated after tuning.

    ``retrain_steps > 0`` trains a fresh model with the tuned hyperparameters (fixed) for that
    many steps; ``baseline`` also trains one with the initial hyperparameters for as many steps
    as the tuned model saw, for comparison.
    """

    retrain_steps: int = 0
    baseline: bool = True


@dataclass
class SearchSection:
    """``[search]``: optuna study over the discrete choices in ``[search.space]``."""

    n_trials: int = 4
    storage: str = ""
    study_name: str = ""
    sampler: str = "grid"
    pruner: str = "median"
    prune_warmup: int = -1
    objective: str = "val_loss"
    exclusive: bool = True
    heartbeat: int = 60
    workers: int = 1
    space: dict = field(default_factory=lambda: {"num_householder": [1, 2]})


@dataclass
class Config:
    """A whole tuning job."""

    run: RunSection = field(default_factory=RunSection)
    task: TaskSection = field(default_factory=TaskSection)
    model: ModelSection = field(default_factory=ModelSection)
    inner: InnerSection = field(default_factory=InnerSection)
    outer: OuterSection = field(default_factory=OuterSection)
    hyper: dict = field(default_factory=lambda: {k: dataclasses.replace(v) for k, v in HYPER_DEFAULTS.items()})
    final: FinalSection = field(default_factory=FinalSection)
    search: SearchSection | None = None

    def hyper_space(self, num_layers: int | None = None, num_householder: int | None = None) -> HyperSpace:
        """The :class:`HyperSpace` of this config (optionally for other ``L`` / ``n_h``)."""
        m = self.model
        settings = {
            name: HyperSetting(h.init, tuple(h.bounds), h.tune, h.per, h.fix_first) for name, h in self.hyper.items()
        }
        try:
            return HyperSpace(settings, num_layers or m.num_layers, m.num_heads, num_householder or m.num_householder)
        except HyperparameterError as error:
            raise ConfigError(f"[hyper] {error}") from error

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (saved with results; :func:`from_dict` reads it back)."""
        out = dataclasses.asdict(self)
        if self.search is None:
            out.pop("search")
        return out


SECTIONS = {
    "run": RunSection, "task": TaskSection, "model": ModelSection, "inner": InnerSection,
    "outer": OuterSection, "final": FinalSection, "search": SearchSection,
}
CHOICES = {
    ("run", "dtype"): ("float32", "float64"),
    ("task", "name"): TASKS,
    ("model", "backend"): ("chunked", "recurrent", "triton", "auto"),
    ("model", "qk_activation"): ("silu", "identity"),
    ("inner", "optimizer"): ("adam", "sgd"),
    ("inner", "schedule"): ("constant", "cosine"),
    ("outer", "method"): ("itd", "truncated_itd", "checkpointed_itd", "aid"),
    ("outer", "optimizer"): ("adam", "sgd"),
    ("outer", "aid_solver"): ("neumann", "cg", "gmres", "dense"),
    ("search", "sampler"): ("grid", "tpe", "random"),
    ("search", "pruner"): ("median", "none"),
    ("search", "objective"): ("val_loss", "scaled_accuracy"),
}
POSITIVE = {
    ("run", "checkpoint_every"), ("task", "batch_size"), ("task", "val_batch_size"), ("task", "eval_batch_size"),
    ("model", "num_layers"), ("model", "d_model"), ("model", "num_heads"), ("model", "num_householder"),
    ("model", "chunk_size"), ("inner", "steps"), ("outer", "lr"), ("outer", "aid_iterations"),
    ("outer", "aid_step_size"), ("outer", "aid_batch_size"), ("search", "n_trials"), ("search", "heartbeat"),
    ("search", "workers"),
    ("outer", "truncate"), ("inner", "eps"),
}
SEARCHABLE = (
    "num_householder", "num_layers", "num_heads", "d_model", "mlp_ratio", "short_conv", "qk_activation", "forget_gate",
)


def _unknown(key: str, where: str, valid: list[str]) -> ConfigError:
    close = difflib.get_close_matches(key.split(".")[-1], valid, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigError(f"unknown config key {key!r}{hint}; valid keys of {where}: {', '.join(valid)}")


def _typed(path: str, value: Any, default: Any) -> Any:
    """Check ``value`` against the type of ``default``; ints are accepted for floats."""
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(default, str):
        ok = isinstance(value, str)
    elif isinstance(default, list):
        ok = isinstance(value, list)
    elif isinstance(default, dict):
        ok = isinstance(value, dict)
    else:
        ok = True
    if not ok:
        raise ConfigError(f"config key {path!r} must be of type {type(default).__name__}, got {value!r}")
    return value


def _section(cls: type, name: str, values: Any) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"[{name}] must be a table, got {values!r}")
    defaults = cls()
    valid = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in valid:
            raise _unknown(f"{name}.{key}", f"[{name}]", valid)
        kwargs[key] = _typed(f"{name}.{key}", value, getattr(defaults, key))
    return cls(**kwargs)


def _hyper(values: Any) -> dict[str, HyperSection]:
    if not isinstance(values, dict):
        raise ConfigError(f"[hyper] must be a table of tables, got {values!r}")
    out = {k: dataclasses.replace(v) for k, v in HYPER_DEFAULTS.items()}
    valid = [f.name for f in dataclasses.fields(HyperSection)]
    for name, table in values.items():
        if name not in HYPERPARAMETERS:
            raise _unknown(f"hyper.{name}", "[hyper]", list(HYPERPARAMETERS))
        if not isinstance(table, dict):
            raise ConfigError(f"[hyper.{name}] must be a table, got {table!r}")
        for key, value in table.items():
            if key not in valid:
                raise _unknown(f"hyper.{name}.{key}", f"[hyper.{name}]", valid)
            if key in ("tune", "fix_first"):
                _typed(f"hyper.{name}.{key}", value, True)
            elif key == "per":
                _typed(f"hyper.{name}.{key}", value, "")
            elif key == "bounds" and not (isinstance(value, list) and len(value) == 2):
                raise ConfigError(f"config key 'hyper.{name}.bounds' must be a list [lower, upper], got {value!r}")
            setattr(out[name], key, value)
    return out


def _check(config: Config) -> None:
    for (section, key), choices in CHOICES.items():
        obj = getattr(config, section)
        if obj is not None and getattr(obj, key) not in choices:
            raise ConfigError(f"config key '{section}.{key}' must be one of {list(choices)}, got {getattr(obj, key)!r}")
    for section, key in POSITIVE:
        obj = getattr(config, section)
        if obj is not None and not getattr(obj, key) > 0:
            raise ConfigError(f"config key '{section}.{key}' must be > 0, got {getattr(obj, key)!r}")
    for key in ("steps",):
        if config.outer.steps < 0:
            raise ConfigError(f"config key 'outer.{key}' must be >= 0, got {config.outer.steps}")
    for key in ("train_len", "val_len", "test_len"):
        value = getattr(config.task, key)
        if not (len(value) == 2 and all(isinstance(v, int) and v >= 1 for v in value) and value[0] <= value[1]):
            raise ConfigError(f"config key 'task.{key}' must be [min, max] with 1 <= min <= max, got {value!r}")
    if config.outer.method == "truncated_itd" and config.outer.truncate > config.inner.steps:
        raise ConfigError(
            f"config key 'outer.truncate' ({config.outer.truncate}) must be <= 'inner.steps' ({config.inner.steps})"
        )
    if config.outer.method == "aid" and config.hyper["lr"].tune:
        raise ConfigError(
            "hyper.lr.tune = true needs an ITD method: the fixed point used by outer.method = 'aid' does not "
            "depend on the learning rates (use 'itd', 'truncated_itd' or 'checkpointed_itd')"
        )
    if not (len(config.inner.betas) == 2 and all(0 <= b < 1 for b in config.inner.betas)):
        raise ConfigError(f"config key 'inner.betas' must be [beta1, beta2] in [0, 1), got {config.inner.betas!r}")
    if config.search is not None:
        for key, values in config.search.space.items():
            if key not in SEARCHABLE:
                raise _unknown(f"search.space.{key}", "[search.space]", list(SEARCHABLE))
            if not (isinstance(values, list) and values):
                raise ConfigError(f"config key 'search.space.{key}' must be a non-empty list, got {values!r}")
    config.hyper_space()  # bounds and init of every hyperparameter
    if config.search is not None:
        for n_h in config.search.space.get("num_householder", []):
            for L in config.search.space.get("num_layers", [config.model.num_layers]):
                config.hyper_space(num_layers=L, num_householder=n_h)


def from_dict(values: dict[str, Any]) -> Config:
    """Build and validate a :class:`Config` from nested dicts (a parsed TOML file).

    Raises:
        ConfigError: unknown keys (the message lists the valid ones), wrong types, bad values.
    """
    valid = list(SECTIONS) + ["hyper"]
    kwargs: dict[str, Any] = {}
    for name, table in values.items():
        if name == "hyper":
            kwargs["hyper"] = _hyper(table)
        elif name in SECTIONS:
            kwargs[name] = _section(SECTIONS[name], name, table)
        else:
            raise _unknown(name, "the config file (sections)", valid)
    config = Config(**kwargs)
    _check(config)
    return config


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> Config:
    """Read and validate a TOML config file, after the ``overrides`` (see :func:`apply_overrides`)."""
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            values = tomllib.load(handle)
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path}: not valid TOML: {error}") from error
    return from_dict(apply_overrides(values, overrides))


def apply_overrides(values: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """``values`` with each ``"section.key=value"`` set (nested tables created as needed).

    The value is read as a TOML value (``outer.steps=1600``, ``search.space.num_householder=[2, 4]``,
    ``run.device="cuda"``); one that is not valid TOML is taken as a string (``run.device=cuda``).
    Keys are checked afterwards, like the file's.
    """
    out = copy.deepcopy(values)
    for item in overrides:
        key, sep, text = item.partition("=")
        parts = key.strip().split(".")
        if not sep or not all(parts):
            raise ConfigError(f"override {item!r} must look like section.key=value")
        try:
            value = tomllib.loads(f"value = {text.strip()}")["value"]
        except tomllib.TOMLDecodeError:
            value = text.strip()
        table = out
        for i, part in enumerate(parts[:-1]):
            table = table.setdefault(part, {})
            if not isinstance(table, dict):
                raise ConfigError(f"override {item!r}: '{'.'.join(parts[:i + 1])}' is a value, not a table")
        table[parts[-1]] = value
    return out
