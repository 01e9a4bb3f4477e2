"""Fit the polynomial of klseg's compiled log (``klseg_cli/core/_fast.py``, ``_P``).

    python scripts/fit_log.py [--degree 6]

log x = e·ln 2 + log m with m in [√½, √2); with f = m − 1, log(1 + f) = f − f²/2 + f³·P(f).
P is fitted to the relative error of log(1 + f) on Chebyshev nodes by least squares,
reweighted a few times towards the largest errors (a cheap stand-in for minimax). Prints
the coefficients and the worst error in float32 ulps of the result, for e = 0 (where the
relative error of log(1 + f) is all that counts) and e = −10.
"""

from __future__ import annotations

import argparse

import numpy as np

LN2_HI = np.float32(0.693145751953125)
LN2_LO = np.float32(1.428606765330187e-06)


def fit(degree: int, nodes: int = 6000, rounds: int = 6) -> np.ndarray:
    lo, hi = np.sqrt(0.5) - 1, np.sqrt(2) - 1
    k = np.arange(nodes)
    f = (lo + hi) / 2 + (hi - lo) / 2 * np.cos(np.pi * (k + 0.5) / nodes)
    f = f[np.abs(f) > 1e-6]
    g = (np.log1p(f) - f + f * f / 2) / f**3  # what P must be
    w = np.abs(f**3 / np.log1p(f))  # error in g → relative error of log(1 + f)
    V = np.vander(f, degree + 1, increasing=True)
    extra = np.ones_like(f)
    coef = None
    for _ in range(rounds):
        if coef is not None:
            r = np.abs(V @ coef - g) * w
            extra *= 1 + r / r.max()
        coef, *_ = np.linalg.lstsq(V * (w * extra)[:, None], g * w * extra, rcond=None)
    return coef


def ulps(coef: np.ndarray, e: int) -> float:
    lo, hi = np.sqrt(0.5) - 1, np.sqrt(2) - 1
    f = np.linspace(lo, hi, 400001).astype(np.float32)
    c = coef.astype(np.float32)
    p = np.full_like(f, c[-1])
    for ci in c[-2::-1]:
        p = p * f + ci
    z = f * f
    r = f + (z * f * p - np.float32(0.5) * z)
    ef = np.float32(e)
    got = ef * LN2_HI + (r + ef * LN2_LO)
    exact = e * np.log(2.0) + np.log1p(f.astype(np.float64))
    keep = np.abs(exact) > 1e-6
    err = np.abs(got - exact) / np.spacing(np.abs(exact).astype(np.float32))
    return float(err[keep].max())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--degree", type=int, default=6)
    args = ap.parse_args()
    coef = fit(args.degree)
    print("coefficients:", ", ".join(repr(float(c)) for c in coef))
    print(f"worst error: {ulps(coef, 0):.2f} ulp (e = 0), {ulps(coef, -10):.2f} ulp (e = -10)")


if __name__ == "__main__":
    main()
