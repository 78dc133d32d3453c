"""The catalog caching app: reference images -> one feature cache per subject + a versioned manifest.

``config`` (settings, light), ``plan`` (the plan dataset), ``stages`` (read, compute actor, write), ``job`` (the
driver), ``args`` (the command line: ``jobs/cache_catalog.py`` and ``dreamcache cache-catalog``).
"""

from .._lazy import lazy_exports

__getattr__, __dir__ = lazy_exports(__name__, {
    "config": ["CachingJobConfig", "JobInputError", "KIND"],
    "plan": ["MANIFEST_SCHEMA", "WORK_SCHEMA"],
    "stages": ["CacheActor", "read_stage", "write_stage"],
    "job": ["JobSummary", "run_caching", "manifest_log", "model_version"],
    "args": ["add_caching_arguments", "config_from_args"],
})
