"""GPU (or the CPU under ``TRITON_INTERPRET=1``, whose inputs differ: CUDA's generator is not the CPU's): one fuzz
case of ``kernels_check.py`` again, under each of several ``Tuning`` specs, beside the token-by-token recurrence in
the input dtype on the same inputs and cotangents.

For each spec (``DELTA_PRODUCT_TUNING`` format, added to the case's own chunk groups; ``""``: the defaults) the
relative errors ``‖x − ref‖ / ‖ref‖`` of the outputs and gradients against float64 (with ``--second`` also those of the
double backward and ``jvp``), and the recurrence's: a kernel error well above the recurrence's is the kernels'
rounding, one near it the case's conditioning. Writes ``--json`` into ``--out``.

    python benchmarks/kernels_fuzz_case.py --seed 5 --case 25 [--specs "" trunc_split= "prec_f32=ieee,prec_inverse=ieee"]
        [--second] [--json kernels_fuzz_case.json] [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kernels_check import case_inputs, case_tuning, first_order, fuzz_case, second_order
from kernels_common import run_and_save

from kernels.delta_product.utils import TUNING


def nth_case(seed: int, case: int) -> dict:
    """Case ``case`` of the fuzz run with ``--fuzz-seeds seed`` (its draws do not depend on ``--fuzz``)."""
    rng = random.Random(seed)
    for _ in range(case):
        fuzz_case(rng)
    return fuzz_case(rng)


def replay(seed: int, case: int, specs: list[str], second: bool) -> list[dict]:
    c = nth_case(seed, case)
    x = case_inputs(c, "cuda" if torch.cuda.is_available() else "cpu")
    shown = {k: str(v)[6:] if isinstance(v, torch.dtype) else v for k, v in c.items()}
    rows = []
    for spec in specs:
        TUNING.load(case_tuning(c, spec))
        err, naive = first_order(x, c["scale"], c["use_final"], naive=True, seed=c["seed"])
        if second:
            err2, naive2 = second_order(x, c["scale"], naive=True, seed=c["seed"])
            err.update(err2)
            naive.update(naive2)
        rows.append(dict(shown, case=case, fuzz_seed=seed, spec=spec or "defaults", err=err, naive=naive))
        print(json.dumps({"spec": rows[-1]["spec"], **{k: f"{v:.2e} / {naive[k]:.2e}" for k, v in err.items()}}),
              flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, required=True, help="the fuzz seed (kernels_check.py --fuzz-seeds)")
    ap.add_argument("--case", type=int, required=True, help="the case number in that run")
    ap.add_argument("--specs", nargs="+", default=[""], help="Tuning specs to run the case under ('': the defaults)")
    ap.add_argument("--second", action="store_true", help="also the double backward and jvp")
    ap.add_argument("--json", default="kernels_fuzz_case.json", help="file name under --out")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    run_and_save(lambda: replay(args.seed, args.case, args.specs, args.second), args.out, args.json)


if __name__ == "__main__":
    main()
