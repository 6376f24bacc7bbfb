"""The ``hypergrad`` command: run a tuning job or an optuna search from a TOML config.

    hypergrad run config.toml [--resume] [--out-dir DIR] [--quiet] [--set section.key=value ...]
    hypergrad check config.toml [--set section.key=value ...]
    python -m lrnn.tuning.cli run config.toml          # the same without the entry point

``run`` tunes the continuous hyperparameters by hypergradients (:func:`lrnn.tuning.job.run_job`),
or, when the config has a ``[search]`` section, runs an optuna study over its discrete choices
in which every trial does so (:func:`lrnn.tuning.search.run_search`).  ``--resume`` continues a
killed run from its last checkpoint (the study from its storage).  ``check`` validates the config
only.  ``--set`` changes a config value without editing the file (``--set outer.steps=1600
--set run.device=cuda``; values are read as TOML).  Exit codes: 0 success, 2 invalid config or output folder, 3 diverging inner training.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from lrnn.tuning.config import ConfigError, load_config
from lrnn.tuning.hypergradient import InnerDivergenceError
from lrnn.tuning.job import JobError, run_job


def parser() -> argparse.ArgumentParser:
    """The argument parser of ``hypergrad``."""
    p = argparse.ArgumentParser(prog="hypergrad", description=__doc__.split("\n\n")[0])
    commands = p.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run (or resume) a tuning job or search from a TOML config")
    run.add_argument("config", help="TOML config file")
    run.add_argument("--resume", action="store_true", help="continue from the checkpoint in the output folder")
    run.add_argument("--out-dir", help="override run.out_dir")
    run.add_argument("--quiet", action="store_true", help="no progress bars")
    check = commands.add_parser("check", help="validate a config file and print it")
    check.add_argument("config", help="TOML config file")
    for command in (run, check):
        add_set_option(command)
    return p


def add_set_option(p: argparse.ArgumentParser) -> None:
    """``--set SECTION.KEY=VALUE`` (repeatable), for :func:`lrnn.tuning.config.load_config`."""
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value (repeatable; the value is read as TOML)")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``hypergrad`` (console script ``lrnn.tuning.cli:main``)."""
    args = parser().parse_args(argv)
    try:
        config = load_config(args.config, args.set)
        if args.command == "check":
            import json

            print(json.dumps(config.to_dict(), indent=2))
            return 0
        progress = False if args.quiet else None
        if config.search is not None:
            from lrnn.tuning.search import run_search

            run_search(config, out_dir=args.out_dir, progress=progress)
        else:
            run_job(config, resume=args.resume, out_dir=args.out_dir, progress=progress)
    except (ConfigError, JobError) as error:
        print(f"hypergrad: error: {error}", file=sys.stderr)
        return 2
    except InnerDivergenceError as error:
        print(f"hypergrad: inner training diverged: {error}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
