"""The job kernel every Ray Data job uses: plan dataset -> stages -> manifest commit, plus Ray start-up.

Modules: ``ray_runtime`` (connect or start Ray, the entrypoint runner), ``manifest`` (versioned manifests,
published atomically), ``listing`` (prefixes listed in parallel), ``run`` (the run driver: counts, progress,
the one-row-per-input check), ``model_info`` (facts from a model's configs, no weights).
"""

import time as _time
import uuid as _uuid


def new_run_id() -> str:
    """A run's id: sortable by start time, unique across concurrent runs; safe as a path component."""
    return _time.strftime("%Y%m%dT%H%M%SZ", _time.gmtime()) + "-" + _uuid.uuid4().hex[:6]
