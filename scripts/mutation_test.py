"""Mutation testing of klseg's core: does the suite notice a small planted bug?

    python scripts/mutation_test.py            # every mutant (about 5 minutes on 2 cores)
    python scripts/mutation_test.py -k fast,labels  # mutants named with "fast" or "labels"
    python scripts/mutation_test.py --list     # the mutants, without running them

Run before a release, not in CI. Each mutant below is one small edit (an operator swapped,
an off-by-one, a clamp removed, floor for ceil, a constant changed) to one core module:
``metrics.py``, ``stats.py``, the kernel ``_fast.py``, the label checks in ``readers.py``
and the kernel's driver in ``engine/image.py``. One at a time, the edit is made in a scratch
copy of the package and the tests that cover that module run there (``pytest -x``): a
failing test *kills* the mutant; if all pass, it *survives* — a bug the suite cannot see.

A mutant marked ``equivalent`` cannot change any result on valid input; the note says why.
It runs anyway (a killed "equivalent" mutant means the note is wrong) and is left out of
the score. A mutant whose text is no longer in the source (the code moved on) is reported
``STALE``: update its ``old`` text, or drop it. Needs no tool beyond the test dependencies.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# test files per module, quickest killers first (pytest -x stops at the first failure)
CORE = ["tests/core/test_edges.py", "tests/core/test_metrics.py", "tests/core/test_properties.py"]
METRICS = [*CORE, "tests/core/test_stats.py", "tests/cli/test_end_to_end.py",
           "tests/cli/test_conventions.py"]  # fmt: skip
STATS = ["tests/core/test_edges.py", "tests/core/test_properties.py", "tests/core/test_stats.py",
         "tests/cli/test_end_to_end.py", "tests/core/test_metrics.py",
         "tests/core/test_fast.py"]  # fmt: skip
KERNEL = ["tests/core/test_edges.py", "tests/core/test_fast.py", "tests/core/test_properties.py"]
LABELS = ["tests/cli/test_bad_inputs.py", "tests/io/test_readers.py",
          "tests/core/test_properties.py", "tests/core/test_fast.py",
          "tests/cli/test_end_to_end.py"]  # fmt: skip


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str  # relative to the repository root
    old: str  # must occur in the file; the ``nth`` occurrence (1-based) is replaced
    new: str
    tests: list[str]
    nth: int = 1
    equivalent: str = ""  # why no valid input can tell it from the original


M, S, F, R, E = (
    "klseg_cli/core/metrics.py",
    "klseg_cli/core/stats.py",
    "klseg_cli/core/_fast.py",
    "klseg_cli/core/labels.py",
    "klseg_cli/engine/image.py",
)

ODD_PLANE = (
    "        better = x {op} mx\n                lo = mx if better else x\n"
    "                S[i] += lo"
)
"""The kernel's loop over the last class plane of an even class count."""

# fmt: off
MUTANTS = [
    # --- metrics.py: ECE bins, clamps, clipping, smoothing, argmax, checks -----------------
    Mutant("metrics-ece-floor", M,
           "np.ceil(confidence.astype(np.float64) * bins).astype(np.intp) - 1",
           "np.floor(confidence.astype(np.float64) * bins).astype(np.intp)", METRICS),
    Mutant("metrics-ece-float32", M,
           "np.ceil(confidence.astype(np.float64) * bins)", "np.ceil(confidence * bins)",
           METRICS),
    Mutant("metrics-ece-no-clip", M, "np.clip(idx, 0, bins - 1, out=idx)", "pass", METRICS),
    Mutant("metrics-kl-clamp-hard", M, "    np.maximum(kl, 0.0, out=kl)\n    np.maximum(js",
           "    np.maximum(js", METRICS),
    Mutant("metrics-ce-clamp-hard", M, "np.maximum(ce, 0.0, out=ce)", "pass", METRICS),
    Mutant("metrics-kl-clamp-soft", M, "    np.maximum(kl, 0.0, out=kl)\n    # KL(p‖q)",
           "    # KL(p‖q)", METRICS),
    Mutant("metrics-klrev-clamp-smoothing", M, "np.maximum(kl_reverse, 0.0, out=kl_reverse)",
           "pass", METRICS),
    Mutant("metrics-klrev-clamp-soft", M, "np.maximum(kl_reverse, 0.0, out=kl_reverse)",
           "pass", METRICS, nth=2),
    Mutant("metrics-js-clamp-hard", M, "    np.maximum(js, 0.0, out=js)\n    return", "    return",
           METRICS,
           equivalent="against a one-hot target JS is ½[rest·log 2 + f(p_y)] with "
           "f(p) = p·log(2p/(1+p)) − log((1+p)/2), whose minimum is f(1) = 0 (f′(p) = "
           "log(2p/(1+p))): every term is ≥ 0 up to a rounding of ~1e-8 of p_y's size, which "
           "no sum tolerance can tell; the clamp only guards that rounding"),
    Mutant("metrics-js-clamp-soft", M, "np.maximum(js, 0.0, out=js)", "pass", METRICS, nth=2),
    Mutant("metrics-eps-clip-hard", M, "Lt_y = np.maximum(L_y, log_eps)", "Lt_y = L_y", METRICS),
    Mutant("metrics-eps-clip-smoothing", M, "Lt = np.maximum(L, log_eps)", "Lt = L", METRICS),
    Mutant("metrics-eps-clip-soft", M, "Lt = np.maximum(L, log_eps)", "Lt = L", METRICS, nth=2),
    Mutant("metrics-n-clipped-le", M, "below = p < p.dtype.type(settings.eps)",
           "below = p <= p.dtype.type(settings.eps)", METRICS),
    Mutant("metrics-n-clipped-soft-all", M, "where=Q > 0)", "where=None)", METRICS),
    Mutant("metrics-q-lo-off-by-one", M, "return self.smoothing / self.num_classes",
           "return self.smoothing / (self.num_classes - 1)", METRICS),
    Mutant("metrics-ce-smoothing-sign", M, "* Lt_y - q_lo * class_sum(Lt)",
           "* Lt_y + q_lo * class_sum(Lt)", METRICS),
    Mutant("metrics-brier-label-term", M, "work.reshape(-1)[at_label] = d_y * d_y", "pass",
           METRICS),
    Mutant("metrics-brier-hard-keeps-label", M,
           "np.multiply(p, p, out=work)\n        work.reshape(-1)[at_label] = 0.0",
           "np.multiply(p, p, out=work)", METRICS),
    Mutant("metrics-js-rest-keeps-label", M,
           "np.copyto(work, p)\n        work.reshape(-1)[at_label] = 0.0",
           "np.copyto(work, p)", METRICS),
    Mutant("metrics-klrev-smoothing-label-q", M, "(L_y - dtype.type(lq_hi))",
           "(L_y - dtype.type(lq_lo))", METRICS),
    Mutant("metrics-neg-hq", M, "neg_hq = q_hi * lq_hi + (C - 1) * q_lo * lq_lo",
           "neg_hq = q_hi * lq_hi + C * q_lo * lq_lo", METRICS),
    Mutant("metrics-ties-pairs", M, "np.flatnonzero(n_max != 1)", "np.flatnonzero(n_max > 2)",
           METRICS),
    Mutant("metrics-q-hi", M, "return 1.0 - self.smoothing + self.smoothing / self.num_classes",
           "return 1.0 - self.smoothing", METRICS),
    Mutant("metrics-ties-to-highest", M, "pred[ties] = np.argmax(P[:, ties], axis=0)",
           "pred[ties] = C - 1 - np.argmax(P[::-1, ties], axis=0)", METRICS),
    Mutant("metrics-soft-label-from-pred", M, "_, y = argmax_classes(Q)", "y = pred", METRICS),
    Mutant("metrics-log-softmax-sign", M, "shifted -= np.log(total)", "shifted += np.log(total)",
           METRICS),
    Mutant("metrics-plausible-lenient", M, "float(np.abs(sums - 1.0).max()) <= tolerance",
           "float(np.abs(sums - 1.0).max()) <= 10 * tolerance",
           [*METRICS, "tests/cli/test_bad_inputs.py"]),
    Mutant("metrics-plausible-strict", M, "float(confidence.max()) <= 1.0 + tolerance",
           "float(confidence.max()) <= 1.0", METRICS,
           equivalent="_plausible is only a fast pre-check: a chunk it refuses goes to "
           "check_probabilities, which accepts it again (stricter costs time, not results)"),
    Mutant("metrics-check-range", M, "hi > 1.0 + tolerance or worst", "hi > 1.0 or worst",
           METRICS),
    Mutant("metrics-tolerance-f16", "klseg_cli/io/readers.py",
           "return 1e-2 if np.dtype(dtype) == np.float16 else 1e-3", "return 1e-3", METRICS),
    # --- stats.py: sums, merges and the final formulas --------------------------------------
    Mutant("stats-ece-correct", S, "b + bins * (y == pred)", "b + bins * (y != pred)", STATS),
    Mutant("stats-class-kl-weights", S, "np.bincount(y, weights=terms.kl, minlength=C)",
           "np.bincount(y, weights=terms.ce, minlength=C)", STATS),
    Mutant("stats-confusion-transposed", S, "np.bincount(y * C + pred", "np.bincount(pred * C + y",
           STATS),
    Mutant("stats-merge-drops-other", S,
           "_plus(getattr(self, f.name), getattr(other, f.name))", "getattr(self, f.name)",
           STATS),
    Mutant("stats-macc-is-precision", S, "out[\"macc\"] = nanmean([c[\"recall\"] for c in means])",
           "out[\"macc\"] = nanmean([c[\"precision\"] for c in means])", STATS),
    Mutant("stats-mean-classes-ignored", S, "means = [classes[c] for c in settings.mean_classes]",
           "means = classes", [*STATS, "tests/cli/test_conventions.py"]),
    Mutant("stats-fp-fn-swapped", S, "fp = n_pred - tp", "fp = n_target - tp", STATS),
    Mutant("stats-iou-no-fn", S, "iou = safe_divide(tp, tp + fp + fn)",
           "iou = safe_divide(tp, tp + fp)", STATS),
    Mutant("stats-dice-factor", S, "dice = safe_divide(2 * tp, 2 * tp + fp + fn)",
           "dice = safe_divide(tp, 2 * tp + fp + fn)", STATS),
    Mutant("stats-safe-divide-zero", S, "np.where(den > 0, num", "np.where(den >= 0, num", STATS),
    Mutant("stats-nanmean-keeps-nan", S, "arr = arr[~np.isnan(arr)]", "arr = arr", STATS),
    Mutant("stats-ece-no-abs", S, "gap = np.abs(stats.ece_correct - stats.ece_conf)",
           "gap = stats.ece_correct - stats.ece_conf", STATS),
    Mutant("stats-ece-empty-bins", S, "gap[count > 0].sum()", "gap.sum()", STATS,
           equivalent="an empty bin has Σcorrect = Σconf = 0, so its gap is 0 either way"),
    Mutant("stats-image-mean-is-pooled", S,
           'out[f"{name}_image_mean"] = nanmean([row[name] for row in image_rows])',
           'out[f"{name}_image_mean"] = pooled[name]', STATS),
    Mutant("stats-empty-klrev-nan", S, "sums[1] = 0.0  # nothing to be undefined about", "pass",
           STATS),
    Mutant("stats-brier-scaled", S, 'if name != "brier":', "if True:", STATS),
    Mutant("stats-empty-mean", S, "value = total / n if n else math.nan",
           "value = total / max(n, 1)", STATS),
    Mutant("stats-accuracy", S, "np.trace(stats.confusion) / n",
           "np.trace(stats.confusion) / (n + 1)", STATS),
    # --- _fast.py: the compiled kernel ------------------------------------------------------
    Mutant("fast-ece-floor", F, "b = _i32(np.ceil(np.float64(M[i]) * bins)) - _i32(1)",
           "b = _i32(np.floor(np.float64(M[i]) * bins))", KERNEL),
    Mutant("fast-ece-no-clip-high", F, "b = b if b < _i32(bins - 1) else _i32(bins - 1)",
           "b = b", KERNEL),
    Mutant("fast-kl-clamp", F, "KL[i] = kl if kl > zero else zero", "KL[i] = kl", KERNEL),
    Mutant("fast-eps-clip", F, "kl = -(ly if ly > log_eps else log_eps)", "kl = -ly", KERNEL),
    Mutant("fast-js-clamp", F, "JS[i] = js if js > zero else zero", "JS[i] = js",
           KERNEL,
           equivalent="the kernel's per-pixel JS only enters sums, and is negative by rounding "
           "alone (~1e-15, near one-hot rows): a sum moves far less than the 2e-7 within which "
           "the kernel matches the NumPy path, and no per-pixel JS leaves the kernel"),
    Mutant("fast-ties-high", F, "better = x > mx", "better = x >= mx", KERNEL),
    Mutant("fast-ties-high-last", F, ODD_PLANE.format(op=">"), ODD_PLANE.format(op=">="), KERNEL),
    Mutant("fast-rest-keeps-max", F, "lo2 = mx if better else x2", "lo2 = x2",
           [*KERNEL, "tests/cli/test_conventions.py"]),
    Mutant("fast-rest-label-not-top", F, "S[i] = S[i] if top else S[i] + (mx - p)",
           "S[i] = S[i]", [*KERNEL, "tests/cli/test_conventions.py"]),
    Mutant("fast-n-clipped-le", F, "(_i32(1) if p < eps else _i32(0))",
           "(_i32(1) if p <= eps else _i32(0))", KERNEL),
    Mutant("fast-label-off-by-one", F, "v = (lab >= 0) & (lab < C)", "v = (lab >= 0) & (lab <= C)",
           KERNEL),
    Mutant("fast-no-sign-check", F, "& (B[i] >= 0)", "", KERNEL),
    Mutant("fast-sum-tolerance", F, "abs(S[i] + p - _f32(1.0)) <= tol",
           "abs(S[i] + p - _f32(1.0)) <= 10 * tol", [*KERNEL, "tests/cli/test_bad_inputs.py"]),
    Mutant("fast-ce-sum", F, "sums[3] += acc[0]", "sums[3] += acc[1]", KERNEL),
    Mutant("fast-ece-correct", F, "ece_ok += counts[C * C + 1 :: 2]",
           "ece_ok += counts[C * C :: 2]", KERNEL),
    Mutant("fast-plane-pairs", F, "for c in range(1, C - 1, 2):", "for c in range(1, C - 2, 2):",
           KERNEL),
    Mutant("fast-odd-plane", F, "if C % 2 == 0:", "if C % 2 == 1:", KERNEL),
    Mutant("fast-log-coefficient", F, "    0.3333394307094386,", "    0.3334,", KERNEL),
    Mutant("fast-ece-conf-sum", F, "fsums[c1 + (e >> one)] += M[i]",
           "fsums[c1 + (e >> one)] += KL[i]", KERNEL),
    Mutant("fast-n-clipped-dropped", F, "total.n_clipped += int(clipped)", "pass", KERNEL),
    Mutant("fast-tile-tail", F, "m = min(w, n - t0)", "m = w", KERNEL),
    Mutant("fast-supported-smoothing", F, "and settings.smoothing == 0.0\n", "", KERNEL),
    Mutant("fast-planes-start", E, "add_chunk(total, planes, y, settings, tolerance, start=start)",
           "add_chunk(total, planes, y, settings, tolerance, start=0)", KERNEL),
    Mutant("fast-fallback-dropped", E,
           "        _, P, y = _valid_pixels(P, settings.labels.codes(raw))\n        total = total",
           "        continue\n        total = total", KERNEL),
    Mutant("kernel-never-used", E, "    return _fast.supported(settings, pred.compute_dtype)",
           "    return False", KERNEL),
    Mutant("kernel-refuses-every-chunk", F, "    return bool(ok)", "    return False", KERNEL),
    Mutant("fast-klrev-undefined", E, "total.sums[1] = np.nan if total.n_valid else 0.0",
           "total.sums[1] = 0.0", KERNEL),
    # --- readers.py: which labels are valid, which are refused ------------------------------
    Mutant("labels-valid-off-by-one", R, "out = np.where((v >= 0) & (v < C), v, BAD)",
           "out = np.where((v >= 0) & (v <= C), v, BAD)", LABELS),
    Mutant("labels-signed-zero", R, "out = np.where((v >= 0) & (v < C), v, BAD)",
           "out = np.where((v > 0) & (v < C), v, BAD)", LABELS),
    Mutant("labels-plain-check-off-by-one", R, "out = y >= self.num_classes",
           "out = y > self.num_classes", LABELS),
    Mutant("labels-ignore-not-excepted", R,
           "out[np.isin(v, np.asarray(self.ignore_index, dtype=np.int64))] = IGNORED", "pass",
           LABELS),
    Mutant("labels-bad-count", R, "bad_counts[v] = bad_counts.get(v, 0) + c",
           "bad_counts[v] = c", LABELS),
    Mutant("labels-ignore-in-range-kept", R,
           "and not any(0 <= v < self.num_classes for v in self.ignore_index)",
           "and True", [*LABELS, "tests/cli/test_conventions.py"]),
    Mutant("labels-reduce-zero-shift", R, "m = v - 1", "m = v",
           [*LABELS, "tests/cli/test_conventions.py"]),
    Mutant("labels-map-unlisted-kept", R, "out = np.where(keys[idx] == v, vals[idx], IGNORED)",
           "out = vals[idx]", [*LABELS, "tests/cli/test_conventions.py"]),
]
# fmt: on


def scratch_copy() -> Path:
    """The package, its tests and sample data, in a temporary folder (no bytecode)."""
    tmp = Path(tempfile.mkdtemp(prefix="klseg-mutants-"))
    skip = shutil.ignore_patterns("__pycache__", "*.pyc", ".hypothesis")
    for name in ("klseg_cli", "tests", "sample_data"):
        shutil.copytree(ROOT / name, tmp / name, ignore=skip)
    shutil.copy2(ROOT / "pyproject.toml", tmp / "pyproject.toml")
    return tmp


def run_tests(
    scratch: Path, tests: list[str], numba_cache: Path, timeout: float
) -> tuple[str, str]:
    """('pass' | 'fail' | 'timeout', the last line pytest printed)."""
    env = dict(os.environ, PYTHONPATH=str(scratch), NUMBA_CACHE_DIR=str(numba_cache),
               PYTHONDONTWRITEBYTECODE="1")  # fmt: skip
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    try:
        done = subprocess.run(cmd, cwd=scratch, env=env, capture_output=True, text=True,
                              timeout=timeout)  # fmt: skip
    except subprocess.TimeoutExpired:
        return "timeout", ""
    lines = [ln for ln in done.stdout.splitlines() if ln.strip()]
    failed = [ln for ln in lines if ln.startswith(("FAILED", "ERROR"))]
    last = (failed or lines or [""])[0 if failed else -1]
    return ("pass" if done.returncode == 0 else "fail"), last


def replace_nth(text: str, old: str, new: str, nth: int) -> str | None:
    at = -1
    for _ in range(nth):
        at = text.find(old, at + 1)
        if at < 0:
            return None
    return text[:at] + new + text[at + len(old) :]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "-k", default="", help="only mutants whose name contains one of these (comma-separated)"
    )
    parser.add_argument("--list", action="store_true", help="list the mutants and stop")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per mutant")
    args = parser.parse_args()
    mutants = [m for m in MUTANTS if any(k in m.name for k in args.k.split(","))]
    if args.list:
        for m in mutants:
            print(f"{m.name:32} {m.path}  {'(equivalent) ' if m.equivalent else ''}")
        return 0

    t0 = time.monotonic()
    scratch = scratch_copy()
    base_cache = scratch / ".numba-cache"
    try:
        needed = sorted({t for m in mutants for t in m.tests})
        state, last = run_tests(scratch, needed, base_cache, args.timeout * 3)
        if state != "pass":
            print(f"the unmutated suite does not pass here: {last}")
            return 2
        print(f"baseline passes ({time.monotonic() - t0:.0f} s); {len(mutants)} mutants\n")
        results = []
        for i, m in enumerate(mutants):
            path = scratch / m.path
            original = path.read_text()
            stat = path.stat()
            mutated = replace_nth(original, m.old, m.new, m.nth)
            if mutated is None:
                results.append((m, "STALE", "text not found", 0.0))
                print(f"{'STALE':9} {m.name}")
                continue
            t1 = time.monotonic()
            path.write_text(mutated)
            # a fresh mtime (bytecode and numba caches key on it) and, for the kernel, a
            # cache of its own, so the unmutated kernel's compiled code stays valid
            os.utime(path, (stat.st_atime, stat.st_mtime + 1000 + i))
            cache = scratch / f".numba-mutant-{i}" if m.path == F else base_cache
            try:
                state, last = run_tests(scratch, m.tests, cache, args.timeout)
            finally:
                path.write_text(original)
                os.utime(path, (stat.st_atime, stat.st_mtime))
                if cache != base_cache:
                    shutil.rmtree(cache, ignore_errors=True)
            verdict = {"pass": "SURVIVED", "fail": "killed", "timeout": "killed"}[state]
            if m.equivalent:
                verdict = "equiv-ok" if state == "pass" else "equiv-KILLED"
            results.append((m, verdict, last, time.monotonic() - t1))
            print(f"{verdict:12} {m.name:32} {time.monotonic() - t1:5.1f} s  {last[:70]}")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    counted = [r for r in results if not r[0].equivalent and r[1] != "STALE"]
    killed = sum(r[1] == "killed" for r in counted)
    survived = [r[0].name for r in counted if r[1] == "SURVIVED"]
    stale = [r[0].name for r in results if r[1] == "STALE"]
    wrong_equiv = [r[0].name for r in results if r[1] == "equiv-KILLED"]
    n_equiv = sum(1 for r in results if r[0].equivalent and r[1] != "STALE")
    score = 100.0 * killed / len(counted) if counted else 0.0
    print(f"\nscore {killed}/{len(counted)} killed ({score:.0f}%), {n_equiv} equivalent "
          f"(not counted), in {time.monotonic() - t0:.0f} s")  # fmt: skip
    for label, names in (("survived", survived), ("stale", stale),
                         ("killed although marked equivalent", wrong_equiv)):  # fmt: skip
        if names:
            print(f"{label}: {', '.join(names)}")
    return 1 if survived or wrong_equiv else 0


if __name__ == "__main__":
    sys.exit(main())
