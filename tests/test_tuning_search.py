"""optuna search over n_h: a study stopped and restarted on the same SQLite storage continues its
trial count without duplicates, re-runs an interrupted trial from its checkpoint, and survives
diverging trials."""
import json

import pytest

from lrnn.tuning.config import from_dict

optuna = pytest.importorskip("optuna")

from lrnn.tuning.search import run_search

BASE = {
    "run": {"name": "study", "threads": 1, "eval_every": 1, "progress": False},
    "task": {"train_len": [2, 5], "val_len": [6, 8], "test_len": [6, 8], "batch_size": 4, "val_batch_size": 4,
             "eval_batch_size": 8},
    "model": {"d_model": 4, "num_heads": 1, "mlp_ratio": 0},
    "inner": {"steps": 2},
    "outer": {"steps": 2, "truncate": 1},
    "hyper": {"eigen_scale": {"tune": True, "init": 1.0}, "step_gates": {"tune": True, "init": 0.5}},
    "final": {"baseline": False},
    "search": {"sampler": "grid", "pruner": "none", "space": {"num_householder": [1, 2, 3], "num_layers": [1, 2]}},
}


def _config(n_trials, **outer):
    values = {**BASE, "search": {**BASE["search"], "n_trials": n_trials}, "outer": {**BASE["outer"], **outer}}
    return from_dict(values)


def _storage_url(out):
    return f"sqlite:///{(out / 'study.db').resolve()}"


def _study(out):
    return optuna.load_study(study_name="study", storage=_storage_url(out))


def test_restarted_study_continues_its_trial_count_without_duplicates(tmp_path):
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    run_search(_config(2), out_dir=tmp_path)
    assert len(_study(tmp_path).trials) == 2
    run_search(_config(2), out_dir=tmp_path)  # the target is reached: nothing new
    assert len(_study(tmp_path).trials) == 2

    # a worker killed in the middle of a trial leaves it RUNNING; its checkpoint has one outer step
    from lrnn.tuning.search import _sampler

    study = optuna.load_study(study_name="study", storage=_storage_url(tmp_path), sampler=_sampler(optuna, _config(4)))
    stale = study.ask({"num_householder": optuna.distributions.CategoricalDistribution([1, 2, 3]),
                       "num_layers": optuna.distributions.CategoricalDistribution([1, 2])})
    from lrnn.tuning.job import run_job, with_model

    choice = with_model(_config(4), num_householder=stale.params["num_householder"], num_layers=stale.params["num_layers"])
    trial_dir = tmp_path / f"trial_{stale.number}"
    run_job(choice, out_dir=trial_dir, progress=False, hooks=[lambda report: True])  # stops after 1 outer step
    before = (trial_dir / "log.jsonl").read_text().splitlines()
    assert len(before) == 1

    table = run_search(_config(4), out_dir=tmp_path)
    trials = _study(tmp_path).trials
    numbers = [t.number for t in trials]
    assert numbers == list(range(len(numbers)))
    assert trials[stale.number].state == optuna.trial.TrialState.FAIL
    assert trials[stale.number].user_attrs["fail_reason"] == "interrupted"
    finished = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(finished) == 4  # n_trials counts across sessions; the interrupted one does not count
    params = [tuple(sorted(t.params.items())) for t in finished]
    assert len(set(params)) == len(params)  # no grid point twice
    retry = [r for r in table["trials"] if r["retry_of"] == stale.number]
    assert len(retry) == 1 and retry[0]["state"] == "COMPLETE"
    assert retry[0]["params"] == stale.params
    # the retry continued the interrupted trial's checkpoint: step 0 (wall time included) is the old one
    log = (trial_dir / "log.jsonl").read_text().splitlines()
    assert len(log) == 2 and json.loads(log[0]) == json.loads(before[0])


def test_diverging_trials_fail_with_their_reason_and_the_study_goes_on(tmp_path):
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    values = {**BASE, "search": {**BASE["search"], "n_trials": 2},
              "inner": {"steps": 2, "optimizer": "sgd", "grad_clip": 0.0},
              "hyper": {**BASE["hyper"], "lr": {"init": 1e6, "bounds": [1e-3, 1e7]}}}
    table = run_search(from_dict(values), out_dir=tmp_path)
    assert [r["state"] for r in table["trials"]] == ["FAIL", "FAIL"]
    assert all("diverged" in r["fail_reason"] for r in table["trials"])


def test_local_workers_share_the_study_without_running_a_grid_point_twice(tmp_path):
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    values = {**BASE, "search": {**BASE["search"], "n_trials": 3, "workers": 2, "space": {"num_householder": [1, 2, 3]}}}
    table = run_search(from_dict(values), out_dir=tmp_path)
    trials = _study(tmp_path).trials
    assert len(trials) == 3 and all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    assert sorted(t.params["num_householder"] for t in trials) == [1, 2, 3]
    assert sorted(r["number"] for r in table["trials"]) == [0, 1, 2]
    for t in trials:  # every trial wrote its own folder, with the n_h it was given
        summary = json.loads((tmp_path / f"trial_{t.number}" / "summary.json").read_text())
        assert summary["config"]["model"]["num_householder"] == t.params["num_householder"]
