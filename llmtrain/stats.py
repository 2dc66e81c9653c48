"""The statistics of the sweep report, without scipy (not a dependency): Student's t quantiles, the paired
difference of two variants over shared seeds with its t confidence interval, and `mean ± error` formatting."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from statistics import mean, stdev

LEVEL = 0.95  # the confidence level of every interval and verdict


def _incomplete_beta_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction of the regularized incomplete beta function (modified Lentz; Numerical Recipes
    §6.4, betacf), converging for x < (a + 1) / (a + b + 2)."""
    tiny, c, d = 1e-300, 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1 / (d if abs(d) > tiny else tiny)
    result = d
    for m in range(1, 500):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1 + numerator * d
            d = 1 / (d if abs(d) > tiny else tiny)
            c = 1 + numerator / c
            c = c if abs(c) > tiny else tiny
            result *= c * d
        if abs(c * d - 1) < 1e-15:
            break
    return result


def incomplete_beta(a: float, b: float, x: float) -> float:
    """I_x(a, b), the regularized incomplete beta function, for a, b > 0 and 0 <= x <= 1."""
    if x <= 0 or x >= 1:
        return 0.0 if x <= 0 else 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1) / (a + b + 2):
        return math.exp(log_front) * _incomplete_beta_fraction(a, b, x) / a
    # The symmetry I_x(a, b) = 1 - I_{1-x}(b, a) where the fraction converges slowly.
    return 1 - math.exp(log_front) * _incomplete_beta_fraction(b, a, 1 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with `df` degrees of freedom: 1 - I_{df/(df+t²)}(df/2, 1/2) / 2 for t >= 0."""
    tail = 0.5 * incomplete_beta(df / 2, 0.5, df / (df + t * t))
    return 1 - tail if t >= 0 else tail


@lru_cache(maxsize=None)
def t_quantile(p: float, df: float) -> float:
    """The p-quantile of Student's t with `df` > 0 degrees of freedom (t_quantile(0.975, 4) = 2.776); `df` = inf
    gives the normal quantile. Bisection on t_cdf to 1e-12 relative: exact for any df, not a table."""
    if not 0 < p < 1 or not df > 0:
        raise ValueError(f"t_quantile: need 0 < p < 1 and df > 0, got p={p}, df={df}")
    if p < 0.5:
        return -t_quantile(1 - p, df)
    if p == 0.5:
        return 0.0

    def cdf(t: float) -> float:
        return 0.5 * math.erfc(-t / math.sqrt(2)) if math.isinf(df) else t_cdf(t, df)  # inf: the normal limit

    low, high = 0.0, 1.0
    while cdf(high) < p:
        low, high = high, 2 * high
    while high - low > 1e-12 * high:
        middle = (low + high) / 2
        low, high = (middle, high) if cdf(middle) < p else (low, middle)
    return (low + high) / 2


@dataclass(frozen=True)
class Difference:
    """A difference (variant - baseline) with its standard error and a two-sided LEVEL confidence interval.

    From paired seeds: the mean of the per-seed differences, se = sample std / sqrt(n), interval mean ± t(n-1)·se.
    From one pair read against a measured seed noise σ (n_noise seeds of one config): se = σ·sqrt(2) (two
    independent runs; paired seeds correlate, which only lowers it), interval ± t(n_noise - 1)·se, since σ is
    itself estimated. n = 1 without a noise σ: no interval (se NaN).
    """

    mean: float
    se: float
    n: int  # pairs of seeds
    df: float  # degrees of freedom of the interval (NaN: none)
    basis: str  # "paired" | "seed noise"

    @classmethod
    def paired(cls, differences: list[float]) -> "Difference":
        n = len(differences)
        if n == 0:
            return cls(math.nan, math.nan, 0, math.nan, "paired")
        if n == 1:
            return cls(differences[0], math.nan, 1, math.nan, "paired")
        return cls(mean(differences), stdev(differences) / math.sqrt(n), n, n - 1, "paired")

    @classmethod
    def against_noise(cls, difference: float, noise_std: float, noise_n: int) -> "Difference":
        return cls(difference, noise_std * math.sqrt(2), 1, noise_n - 1, "seed noise")

    @property
    def half_width(self) -> float:
        if not (self.df > 0 and math.isfinite(self.se)):
            return math.nan
        return t_quantile(0.5 + LEVEL / 2, self.df) * self.se

    @property
    def interval(self) -> tuple[float, float]:
        return self.mean - self.half_width, self.mean + self.half_width

    @property
    def verdict(self) -> str:
        """lower / higher when the whole interval is on one side of 0, else "no difference"; "-" without one.
        A difference of exactly 0 with se 0 (identical runs) is no difference."""
        low, high = self.interval
        if math.isnan(low):
            return "-"
        if high < 0:
            return "lower"
        if low > 0:
            return "higher"
        return "no difference"


def decimals_for(error: float, least: int = 3, most: int = 6) -> int:
    """Decimal places that show `error` to 2 significant digits, at least `least` (nats read to 0.001)."""
    if not (math.isfinite(error) and error > 0):
        return least
    rounded = float(f"{error:.1e}")  # 0.0099999 shows as 0.010, not 0.0100
    return max(least, min(most, 1 - math.floor(math.log10(rounded))))


def plus_minus(value: float, error: float, least: int = 3) -> str:
    """`4.072 ± 0.011`: both to the decimals that show the error to 2 significant digits; the value alone when
    the error is NaN; "-" when the value is."""
    if not math.isfinite(value):
        return "-" if math.isnan(value) else str(value)
    places = decimals_for(error, least)
    if not math.isfinite(error):
        return f"{value:.{places}f}"
    return f"{value:.{places}f} ± {error:.{places}f}"
