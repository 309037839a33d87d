#!/usr/bin/env python
"""Type-I error of DeLong's and Obuchowski's AUC tests when a patient's nodules are not independent.

Null by construction: two scores of equal skill, score = label + patient offset + nodule noise,
each score with its own patient offset; offset and noise have variances rho and 1 - rho (rho,
``--rho``, is the share of a score's noise that a patient's nodules share; 0 = independent
nodules), every patient's nodules of one class. Prints the share of simulations where each test
rejects at 5 %, with the binomial standard error of that share.

    python benchmarks/clustered_auc_type1.py                      # rho 0, 0.5, 0.9
    python benchmarks/clustered_auc_type1.py --patients 60 --per-patient 2 --sims 1000
"""

from __future__ import annotations

import argparse
import math

import numpy as np


def rejection_rates(n_patients: int, per_patient: int, rho: float, sims: int, seed: int) -> dict:
    from nodulekit.stats import delong_test, obuchowski_test

    rng = np.random.default_rng(seed)
    groups = np.repeat(np.arange(n_patients), per_patient)
    rejected = {"delong": 0, "clustered": 0}
    for _ in range(sims):
        y = np.repeat(rng.permutation(np.arange(n_patients) % 2), per_patient)
        a, b = (
            y
            + np.repeat(rng.normal(0, math.sqrt(rho), n_patients), per_patient)
            + rng.normal(0, math.sqrt(1 - rho), len(y))
            for _ in range(2)
        )
        rejected["delong"] += delong_test(y, a, b)["p_value"] < 0.05
        rejected["clustered"] += obuchowski_test(y, a, b, groups)["p_value"] < 0.05
    return {k: v / sims for k, v in rejected.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--patients", type=int, default=30)
    parser.add_argument("--per-patient", type=int, default=4)
    parser.add_argument("--rho", type=float, nargs="+", default=[0.0, 0.5, 0.9])
    parser.add_argument("--sims", type=int, default=300)
    parser.add_argument("--seed", type=int, default=2026)
    args = parser.parse_args(argv)
    se = math.sqrt(0.05 * 0.95 / args.sims)
    print(f"{args.patients} patients x {args.per_patient} nodules, {args.sims} simulations, seed {args.seed}; "
          f"binomial SE of a 5 % rate: {100 * se:.1f} points")  # fmt: skip
    print("| rho | DeLong rejects | clustered (Obuchowski) rejects |\n|---|---|---|")
    for rho in args.rho:
        r = rejection_rates(args.patients, args.per_patient, rho, args.sims, args.seed)
        print(f"| {rho:g} | {100 * r['delong']:.1f} % | {100 * r['clustered']:.1f} % |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
