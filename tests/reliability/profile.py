"""The CI profile and the long one (``MLX_BRIDGE_LONG=1``).

Without the variable every property test runs a fixed, small number of
derandomized examples, with no example database and no shrinking, and the
sweep uses the core hostile values; the whole suite then runs in well under
a minute on two cores. With it: many more random examples, shrinking, and
every hostile value in every field.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, Phase, settings

LONG = os.environ.get("MLX_BRIDGE_LONG") == "1"


def profile(ci_examples: int, long_examples: int) -> settings:
    """Hypothesis settings: ``ci_examples`` derandomized examples, or the long run's."""
    return settings(
        max_examples=long_examples if LONG else ci_examples,
        deadline=None,
        derandomize=not LONG,
        database=None,
        phases=(Phase.explicit, Phase.generate, Phase.shrink)
        if LONG
        else (Phase.explicit, Phase.generate),
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.filter_too_much,
        ],
        print_blob=False,
    )
