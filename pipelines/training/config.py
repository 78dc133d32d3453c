"""How a training run scales on Ray Train (``ScaleConfig``): light on purpose (no Ray or torch), since the
training command line is derived from these fields and ``TrainingConfig``'s (``dreamcache.cli_args``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from dreamcache.cli_args import NOT_A_FLAG, option
from dreamcache.errors import InvalidValue


@dataclass(frozen=True)
class ScaleConfig:
    """How many training workers, with what resources, and how often a failed group is restarted."""

    num_workers: int = option(1, "Ray Train workers (one per GPU with --gpu)", aliases=("--workers",))
    use_gpu: bool = option(False, "one GPU per worker", aliases=("--gpu",))
    cpus_per_worker: float = option(1.0)
    max_failures: int = option(0, "restarts of a failed worker group (each resumes)")
    data_cpus: float = option(0.5, "CPUs per Ray Data preparation task")
    storage_path: str | None = option(None, "where Ray Train keeps the run folder and its checkpoints, a local path "
                                            "or s3:// (default: --out)", aliases=("--ray-storage",))
    ray_address: str | None = field(default=None, metadata=NOT_A_FLAG)  # --ray-address (kernel.ray_runtime)

    def validate(self) -> None:
        if self.num_workers < 1:
            raise InvalidValue(f"num_workers must be >= 1, got {self.num_workers}")
        if self.cpus_per_worker <= 0 or self.data_cpus <= 0:
            raise InvalidValue("cpus_per_worker and data_cpus must be > 0")
        if self.max_failures < 0:
            raise InvalidValue(f"max_failures must be >= 0, got {self.max_failures}")
