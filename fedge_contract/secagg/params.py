"""The neighbourhood degree and threshold we recommend for a cohort (DESIGN.md has the figures behind them).

k = 2 * ceil(2 * log2 n) neighbours (about 4 log2 n: 18 at n = 20, 28 at n = 100, 40 at n = 1000; the
graph is complete when the cohort is k + 1 or fewer) and t = ceil(0.4 k). Measured on the Harary
graph with 30% of the cohort lost after the shares went out, a session fails (some secret can no
longer be rebuilt) in under 0.5% of trials up to n = 1000; at 20% never in 2,000. A majority
threshold (t > k/2, DevicePolicy.require_majority) fails 19% of such sessions at n = 100 with the same
k: it needs k near 60 there, so it is the hardened deployment's choice, not the default.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fedge_contract.secagg.errors import ParameterError

THRESHOLD_FRACTION = 0.4


@dataclass(frozen=True)
class Recommended:
    degree: int
    threshold: int
    min_survivors: int


def recommended(cohort: int) -> Recommended:
    """Degree, threshold and the smallest sum worth revealing for a cohort of ``cohort`` devices."""
    if cohort < 3:
        raise ParameterError(f"secure aggregation needs a cohort of 3 or more (a sum of two tells each the other's input), got {cohort}")
    degree = 2 * math.ceil(2 * math.log2(cohort))
    threshold = max(2, math.ceil(THRESHOLD_FRACTION * min(degree, cohort - 1)))
    return Recommended(degree, threshold, max(3, threshold))
