"""Hypothesis profiles for the fuzz tests.

`ci` (default): 200 examples per property, no deadline (the machine is shared and loaded), the whole folder in
about a minute. `long`: 5000 examples per property, for a local run in the background:

    HYPOTHESIS_PROFILE=long OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/fuzz -q --hypothesis-show-statistics

Explicit `@example`s run first in every profile, so a property marked `xfail(strict=True)` for a known bug fails
deterministically, not only when the search happens to find the bug.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

_COMMON = {"deadline": None, "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large]}
settings.register_profile("ci", max_examples=200, **_COMMON)
settings.register_profile("long", max_examples=5000, **_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
