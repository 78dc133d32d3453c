"""The adapter training app: Ray Train DDP around ``dreamcache.training`` (``job``), its command line (``args``)."""

from .._lazy import lazy_exports

__getattr__, __dir__ = lazy_exports(__name__, {
    "config": ["ScaleConfig"],
    "job": ["run_local", "run_training", "run_from_args", "triplet_dataset",
            "check_replicas_agree", "prepare_batch"],
    "args": ["add_training_arguments", "training_from_args"],
})
