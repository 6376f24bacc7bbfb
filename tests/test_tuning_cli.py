"""The ``hypergrad`` command: a run killed with SIGKILL and resumed ends where an uninterrupted run ends."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from lrnn.tuning.cli import main

ROOT = Path(__file__).parents[1]

TINY = """
[run]
name = "tiny"
seed = {seed}
threads = 1
checkpoint_every = 3
eval_every = 4
[task]
train_len = [2, 6]
val_len = [8, 12]
test_len = [8, 12]
batch_size = 8
val_batch_size = 8
eval_batch_size = 16
[model]
d_model = 8
num_heads = 1
num_householder = 2
mlp_ratio = 0
[inner]
steps = 3
optimizer = "{optimizer}"
[outer]
steps = {steps}
truncate = 2
lr = 0.1
[hyper.eigen_scale]
tune = true
init = 1.0
[hyper.step_gates]
tune = true
init = 0.5
[hyper.lr]
tune = true
init = {lr}
[final]
baseline = false
"""


def _config(tmp_path: Path, name: str, seed=0, steps=16, optimizer="adam", lr=1e-2) -> Path:
    path = tmp_path / f"{name}.toml"
    path.write_text(TINY.format(seed=seed, steps=steps, optimizer=optimizer, lr=lr))
    return path


def _command(config: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "lrnn.tuning.cli", "run", str(config), "--out-dir", str(out), "--quiet", *extra]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def test_sigkill_then_resume_ends_with_the_hyperparameters_of_an_uninterrupted_run(tmp_path):
    config = _config(tmp_path, "tiny")
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    subprocess.run(_command(config, whole), env=_env(), check=True, capture_output=True, timeout=300)

    process = subprocess.Popen(_command(config, killed), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    log = killed / "log.jsonl"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None:
        if log.exists() and len(log.read_text().splitlines()) >= 5:  # past the first checkpoint (every 3 steps)
            break
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (killed / "summary.json").exists()

    refused = subprocess.run(
        _command(config, killed), env=_env(), capture_output=True, text=True, timeout=300, check=False
    )
    assert refused.returncode == 2 and "--resume" in refused.stderr
    subprocess.run(_command(config, killed, "--resume"), env=_env(), check=True, capture_output=True, timeout=300)

    a = json.loads((whole / "summary.json").read_text())
    b = json.loads((killed / "summary.json").read_text())
    assert a["final_lambda"] == b["final_lambda"]  # bit for bit (JSON keeps every digit of a float)
    assert a["final_lambda"]["eigen_scale"] != [1.0]  # the run did move the hyperparameters
    rows_a, rows_b = _log(whole), _log(killed)
    assert [r["step"] for r in rows_b] == list(range(16))
    for ra, rb in zip(rows_a, rows_b):
        assert {k: v for k, v in ra.items() if k != "wall_time"} == {k: v for k, v in rb.items() if k != "wall_time"}
    clock = [r["wall_time"] for r in rows_b]  # the resumed run continues the killed run's tuning clock
    assert all(x < y for x, y in zip(clock, clock[1:])) and b["tuning_time_s"] == clock[-1]


def test_cli_errors_name_the_problem(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text("[outer]\nstepz = 3\n")
    assert main(["run", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "'outer.stepz'" in err and "steps" in err
    assert main(["check", str(_config(tmp_path, "ok"))]) == 0


def test_diverging_inner_training_exits_with_its_reason(tmp_path, capsys):
    config = _config(tmp_path, "diverge", steps=2, optimizer="sgd", lr=0.1)
    text = config.read_text().replace("[inner]\n", "[inner]\ngrad_clip = 0.0\n")
    text = text.replace("[hyper.lr]\ntune = true\ninit = 0.1", "[hyper.lr]\ntune = true\ninit = 1e6\nbounds = [1e-3, 1e7]")
    config.write_text(text)
    assert main(["run", str(config), "--out-dir", str(tmp_path / "out"), "--quiet"]) == 3
    assert "diverged" in capsys.readouterr().err


def test_check_prints_the_validated_config(tmp_path, capsys):
    assert main(["check", str(_config(tmp_path, "c", steps=7))]) == 0
    assert json.loads(capsys.readouterr().out)["outer"]["steps"] == 7


def test_set_overrides_config_values_and_names_bad_keys(tmp_path, capsys):
    config = str(_config(tmp_path, "c", steps=7))
    overrides = ["--set", "outer.steps=11", "--set", "run.device=cpu", "--set", "search.space.num_householder=[2, 4]",
                 "--set", "hyper.eigen_scale.init=1.5", "--set", "model.short_conv=false"]
    assert main(["check", config, *overrides]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["outer"]["steps"] == 11 and out["run"]["device"] == "cpu"  # a bare word is a string
    assert out["search"]["space"] == {"num_householder": [2, 4]}
    assert out["hyper"]["eigen_scale"]["init"] == 1.5 and out["model"]["short_conv"] is False
    assert main(["check", config, "--set", "outer.stepz=3"]) == 2
    err = capsys.readouterr().err
    assert "'outer.stepz'" in err and "steps" in err
    assert main(["check", config, "--set", "outer.steps"]) == 2
    assert "section.key=value" in capsys.readouterr().err
    assert main(["check", config, "--set", "outer.steps.x=1"]) == 2
    assert "'outer.steps' is a value" in capsys.readouterr().err
