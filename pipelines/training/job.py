"""Adapter training on Ray Train: DDP over the workers (GPUs) of a Ray cluster, data prepared by Ray Data.

Ray Data reads the triplet Parquet files (local or s3://) and builds each training sample (decode, the reference
construction of spec 3.2, caption dropout) in CPU tasks, off the training workers; ``TorchTrainer`` starts one
worker per GPU (or CPU worker), sets up the process group, and each worker runs ``dreamcache.training.train`` on
its shard of the stream. ``train``'s Accelerator wraps the adapters in DDP, so gradients are averaged over all
workers; rank 0 writes the final adapter file to ``--out``, which must be storage every worker can reach (s3:// on
a multi-node cluster).

Checkpoints are Ray Train's: every worker reports its part with ``ray.train.report`` and Ray keeps the newest
``keep_checkpoints`` (``CheckpointConfig``) in the run folder, ``<ray storage>/dreamcache-adapters`` (by default
``--out``). A failed worker group is restarted up to ``max_failures`` times and resumes from the last one
(``ray.train.get_checkpoint``); a resubmitted job with the same run folder does the same (``--resume never`` starts
a new run folder, ``--resume URI`` starts from that checkpoint). Ray Data's streaming split is not replayable, so a
resumed Ray run continues at the checkpointed step on a freshly shuffled pass of the data (the in-process path,
``run_local``, resumes at the exact sample).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import tempfile
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np

from dreamcache import storage
from dreamcache.images import ImageLimits
from dreamcache.training_config import ReferenceAugment, TrainingConfig
from dreamcache.triplets import TripletBatch, TripletError, parquet_files, pixels_to_tensor, prepare_triplet
from dreamcache.errors import DreamCacheError

if TYPE_CHECKING:  # the training loop pulls in diffusers: Ray Data's preparation tasks must not pay for that import
    from dreamcache.training import AdapterTrainer, TrainingResult

RUN_NAME = "dreamcache-adapters"  # fixed: a resubmitted job finds its run folder, and resumes

from ..kernel.model_info import native_resolution
from ..kernel.ray_runtime import init_ray
from .args import training_from_args
from .config import ScaleConfig

logger = logging.getLogger(__name__)


def run_local(config: TrainingConfig) -> TrainingResult:
    """Train in this process (one GPU or the CPU), reading the data with the replayable local stream."""
    from dreamcache.training import train

    return train(config)


# -- Ray Data: rows -> prepared samples ---------------------------------------------------------------------------
def prepare_batch(batch: dict[str, np.ndarray], resolution: int, augment: ReferenceAugment, caption_dropout: float,
                  limits: ImageLimits = ImageLimits()) -> dict[str, np.ndarray]:
    """A Ray Data batch of triplet rows -> ``target``/``reference`` uint8 ``[n, H, W, 3]`` and ``caption``.

    Bad rows are dropped with a warning (the run goes on). The augmentation draws fresh randomness on every pass,
    so each epoch sees new references.
    """
    columns = list(batch)
    count = len(batch[columns[0]]) if columns else 0
    rng = np.random.default_rng()
    targets, references, captions = [], [], []
    for i in range(count):
        row = {name: batch[name][i] for name in columns}
        try:
            sample = prepare_triplet(row, resolution, rng, augment, caption_dropout, limits)
        except TripletError as exc:
            logger.warning("skipping a triplet: %s", exc)
            continue
        targets.append(sample.target)
        references.append(sample.reference)
        captions.append(sample.caption)
    empty = np.zeros((0, resolution, resolution, 3), dtype=np.uint8)
    return {
        "target": np.stack(targets) if targets else empty,
        "reference": np.stack(references) if references else empty,
        "caption": np.array(captions, dtype=object),
    }


def triplet_dataset(config: TrainingConfig, resolution: int, data_cpus: float = 0.5):
    """The prepared-sample dataset of ``config.data`` (a lazy Ray Dataset)."""
    import ray.data

    files = parquet_files(config.data)
    filesystem, _ = storage.pyarrow_filesystem(files[0])
    paths = [storage.pyarrow_filesystem(f)[1] for f in files]
    dataset = ray.data.read_parquet(paths, filesystem=filesystem)
    return dataset.map_batches(
        prepare_batch, batch_format="numpy", batch_size=32, num_cpus=data_cpus,
        fn_kwargs={"resolution": resolution, "augment": config.augment, "caption_dropout": config.caption_dropout},
    )


@dataclass
class RayShardSource:
    """``BatchSource`` over a Ray Train dataset shard: pass after pass, fixed-size batches."""

    shard: object  # ray.data.DataIterator
    batch_size: int
    shuffle_buffer: int = 256

    def batches(self, start: Mapping | None) -> Iterator[tuple[TripletBatch, dict]]:
        # A resumed run starts a new pass: the shard's order cannot be replayed.
        epoch = int(start["epoch"]) + 1 if start and "epoch" in start else 0
        while True:
            count = 0
            for batch in self.shard.iter_batches(batch_size=self.batch_size, batch_format="numpy", drop_last=True,
                                                 local_shuffle_buffer_size=self.shuffle_buffer):
                count += 1
                yield (TripletBatch(pixels_to_tensor(batch["target"]), pixels_to_tensor(batch["reference"]),
                                    [str(c) for c in batch["caption"]]),
                       {"epoch": epoch, "batches": count})
            if count == 0:
                raise RuntimeError(f"the data shard holds fewer than {self.batch_size} usable triplets")
            epoch += 1


class RayCheckpoints:
    """``dreamcache.training.Checkpoints`` through Ray Train: each worker reports its part of a checkpoint folder
    (Ray merges them), and a restarted or resumed run gets the newest back from ``ray.train.get_checkpoint()``."""

    def restore(self, trainer: AdapterTrainer) -> dict | None:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return None
        with checkpoint.as_directory() as local:
            return trainer.load_state(local, checkpoint.path)

    def save(self, trainer: AdapterTrainer, step: int, position: Mapping | None, samples_seen: int) -> None:
        import ray.train

        with tempfile.TemporaryDirectory(prefix="dreamcache-checkpoint-") as local:
            trainer.save_state(local, step, position, samples_seen)
            ray.train.report({"step": step, "samples_seen": samples_seen},
                             checkpoint=ray.train.Checkpoint.from_directory(local))


def _worker_loop(loop_config: dict) -> None:
    """Runs on every Ray Train worker."""
    import ray.train
    import ray.train.torch

    from dreamcache.training import AdapterTrainer, train

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config: TrainingConfig = replace(loop_config["config"], device=str(ray.train.torch.get_device()))
    source = RayShardSource(ray.train.get_dataset_shard("train"), config.batch_size)
    trainer = AdapterTrainer(config)
    result = train(config, source=source, report=ray.train.report, trainer=trainer, checkpoints=RayCheckpoints())
    check_replicas_agree(trainer)
    if ray.train.get_context().get_world_rank() == 0:
        logger.info("training finished: %s", result)


def check_replicas_agree(trainer: AdapterTrainer) -> None:
    """Every worker must end with the same adapters (DDP kept them in step), else rank 0's file is not *the* result."""
    import torch.distributed as dist

    if trainer.world.size == 1:
        return
    digest = hashlib.sha256()
    for key, value in sorted(trainer.pipe.adapters.state_dict().items()):
        digest.update(key.encode())
        digest.update(value.detach().float().cpu().numpy().tobytes())
    digests: list = [None] * trainer.world.size
    dist.all_gather_object(digests, digest.hexdigest())
    if len(set(digests)) != 1:
        raise RuntimeError(f"the {trainer.world.size} training replicas ended with different adapters: {digests}")
    logger.info("all %d replicas hold identical adapters (%s)", trainer.world.size, digests[0][:12])


def run_training(config: TrainingConfig, scale: ScaleConfig = ScaleConfig()) -> dict:
    """Train on Ray Train (a cluster via RAY_ADDRESS / ``scale.ray_address``, else a local Ray); returns a summary."""
    import ray.train
    from ray.train.torch import TorchTrainer

    config.validate()
    scale.validate()
    _start_ray(scale)
    resolution = config.resolution or native_resolution(config.model)
    config = replace(config, resolution=resolution)
    storage_path = scale.storage_path or config.out
    filesystem, path = storage.pyarrow_filesystem(storage_path)
    # resume auto continues the run folder's newest checkpoint; never and a checkpoint URI start a run folder of
    # their own, the URI's checkpoint loaded first.
    name = RUN_NAME if config.resume == "auto" else f"{RUN_NAME}-{uuid.uuid4().hex[:8]}"
    start = None
    if config.resume not in ("auto", "never"):
        start_filesystem, start_path = storage.pyarrow_filesystem(config.resume)
        start = ray.train.Checkpoint(start_path, filesystem=start_filesystem)
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config={"config": config},
        scaling_config=ray.train.ScalingConfig(num_workers=scale.num_workers, use_gpu=scale.use_gpu,
                                               resources_per_worker={"CPU": scale.cpus_per_worker}),
        run_config=ray.train.RunConfig(name=name, storage_path=path, storage_filesystem=filesystem,
                                       failure_config=ray.train.FailureConfig(max_failures=scale.max_failures),
                                       checkpoint_config=ray.train.CheckpointConfig(num_to_keep=config.keep_checkpoints)),
        datasets={"train": triplet_dataset(config, resolution, scale.data_cpus)},
        resume_from_checkpoint=start,
    )
    logger.info("training on %d Ray Train worker(s) (gpu=%s); output %s", scale.num_workers, scale.use_gpu, config.out)
    try:
        result = trainer.fit()
    except ray.train.WorkerGroupError as exc:
        # A worker's bad input (a checkpoint of another base model or worker count) ends the command in its one
        # line, not in Ray's report of every worker's traceback.
        bad = next((e for e in exc.worker_failures.values() if isinstance(e, DreamCacheError)), None)
        if bad is None:
            raise
        raise bad from None
    adapter_uri = storage.join_uri(config.out, "adapter.safetensors")
    if not storage.exists(adapter_uri) or result.checkpoint is None:
        raise RuntimeError(f"training ended without writing {adapter_uri}: {result.error}")
    checkpoint = f"s3://{result.checkpoint.path}" if storage.is_s3(storage_path) else result.checkpoint.path
    state = json.loads(storage.read_bytes(storage.join_uri(checkpoint, "state.json")))
    return {**dict(result.metrics or {}), "adapter_uri": adapter_uri, "workers": scale.num_workers,
            "step": state["step"], "checkpoint": checkpoint}


def _start_ray(scale: ScaleConfig) -> None:
    """Connect to a cluster, or start a local Ray with room for the workers AND the data tasks.

    Ray Data gets only what the training workers leave: on a 2-core laptop two 1-CPU workers would leave the
    preparation tasks nothing, and the run would wait forever. A local Ray therefore gets enough logical CPUs;
    a cluster that is too small is named in a warning (an autoscaler may still add nodes).
    """
    import ray

    needed = scale.num_workers * scale.cpus_per_worker + scale.data_cpus
    local = not (scale.ray_address or os.environ.get("RAY_ADDRESS")) and not ray.is_initialized()
    init_ray(scale.ray_address, num_cpus=max(os.cpu_count() or 1, math.ceil(needed + scale.data_cpus)) if local else None)
    resources = ray.cluster_resources()
    if resources.get("CPU", 0) < needed:
        logger.warning("the Ray cluster has %s CPUs; %d worker(s) x %s CPU + %s for data need %s: the run waits "
                       "until the cluster grows", resources.get("CPU", 0), scale.num_workers, scale.cpus_per_worker,
                       scale.data_cpus, needed)
    if scale.use_gpu and resources.get("GPU", 0) < scale.num_workers:
        logger.warning("the Ray cluster has %s GPUs for %d GPU worker(s)", resources.get("GPU", 0), scale.num_workers)


# -- command line (the parser: pipelines.training.args) ----------------------------------------------------------
def run_from_args(args: argparse.Namespace) -> dict:
    """Train as the command line asks: on Ray Train, or in this process with ``--no-ray``; returns a summary."""
    config, scale = training_from_args(args)
    if args.no_ray:
        result = run_local(config)
        return {"adapter_uri": result.adapter_uri, "step": result.steps, "loss": result.final_loss,
                "samples_per_s": result.samples_per_s}
    return run_training(config, scale)
