"""Intervals and estimators the evidence is built from (scipy where scipy has them). Plain numbers in and out."""

from __future__ import annotations

import math

import numpy as np

NAN = float("nan")


def wilson_interval(k: int, n: int, confidence: float) -> tuple[float, float]:
    """Wilson score interval of k successes in n trials; NaN without trials."""
    if n == 0:
        return (NAN, NAN)
    from scipy.stats import binomtest

    ci = binomtest(k, n).proportion_ci(confidence_level=confidence, method="wilson")
    return (float(ci.low), float(ci.high))


def newcombe_difference(k1: int, n1: int, k2: int, n2: int, confidence: float) -> tuple[float, float, float]:
    """p1 - p2 with Newcombe's hybrid score interval (method 10, Newcombe 1998)."""
    if n1 == 0 or n2 == 0:
        return (NAN, NAN, NAN)
    p1, p2 = k1 / n1, k2 / n2
    l1, u1 = wilson_interval(k1, n1, confidence)
    l2, u2 = wilson_interval(k2, n2, confidence)
    d = p1 - p2
    return (d, d - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2), d + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2))


def percentile_interval(replicates: np.ndarray, confidence: float) -> tuple[float, float]:
    """The two-sided percentile interval of bootstrap replicates, NaN replicates left out."""
    finite = replicates[~np.isnan(replicates)]
    if finite.size == 0:
        return (NAN, NAN)
    alpha = (1 - confidence) / 2
    return (float(np.quantile(finite, alpha)), float(np.quantile(finite, 1 - alpha)))


def widest_interval(replicates: np.ndarray, k: int, n: int, confidence: float) -> tuple[float, float, float, float]:
    """(low, high) never narrower than the Wilson interval of the pooled counts k/n, then the bootstrap's own."""
    boot_low, boot_high = percentile_interval(replicates, confidence)
    wilson_low, wilson_high = wilson_interval(k, n, confidence)
    low = boot_low if math.isnan(wilson_low) else wilson_low if math.isnan(boot_low) else min(boot_low, wilson_low)
    high = boot_high if math.isnan(wilson_high) else wilson_high if math.isnan(boot_high) else max(boot_high, wilson_high)
    return low, high, boot_low, boot_high


def nanmean(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else NAN


def misalign_at_k(misaligned: int, counted: int, k: int) -> float:
    """The unbiased estimate of P(at least one of k answers drawn without replacement from the `counted` ones is
    misaligned), as pass@k is estimated (Chen et al. 2021): 1 - C(n-c, k) / C(n, k). With fewer than k answers,
    every answer is drawn: 1 when any is misaligned."""
    if counted == 0:
        return NAN
    if counted - misaligned < k:
        return 1.0
    return 1.0 - math.prod((counted - misaligned - i) / (counted - i) for i in range(k))


def spearman_with_ci(x: list[float], y: list[float], confidence: float, seed: int) -> dict[str, float]:
    """Spearman's rho with a paired percentile bootstrap interval (1000 resamples); NaN for constant scores."""
    from scipy.stats import bootstrap, spearmanr

    if len(x) < 3 or len(set(x)) < 2 or len(set(y)) < 2:
        return {"rho": math.nan, "ci_low": math.nan, "ci_high": math.nan, "n": len(x)}
    rho = float(spearmanr(x, y).statistic)

    def statistic(a: np.ndarray, b: np.ndarray) -> float:
        return float(spearmanr(a, b).statistic)

    res = bootstrap((np.array(x), np.array(y)), statistic, paired=True, vectorized=False, n_resamples=1000,
                    confidence_level=confidence, method="percentile", rng=np.random.default_rng(seed))
    return {"rho": rho, "ci_low": float(res.confidence_interval.low), "ci_high": float(res.confidence_interval.high),
            "n": len(x)}
