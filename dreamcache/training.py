"""Training the conditioning adapters (spec section 3.1), with checkpoints that a restarted run resumes from.

Per step, for a batch of (target, reference, caption): the frozen VAE encodes the target (posterior sample), the
frozen text encoder the caption, and the frozen UNet builds each reference's feature cache on the fly at t=1
with the empty prompt (``cache.extract_features``, adapters off). Then t ~ U{0..999}, z_t = add_noise(z_0, eps, t),
and the UNet with the adapters attending to the caches predicts eps; the loss is the plain eps-MSE (or, with
``loss_weighting="x0"``, the error on the clean latents, an option of this project). Only the
adapters train (AdamW, lr 1e-5 by default, PyTorch's betas/eps, weight decay 0.01, no schedule, no EMA).

* ``accelerate.Accelerator`` runs the step, as in diffusers' training examples: mixed precision on GPU (the frozen
  weights are stored in bf16 or fp16, the adapters stay fp32 under its autocast; fp16 with its gradient scaler),
  gradient accumulation, clipping, the DDP wrap and the optimizer's state in checkpoints.
* Gradient checkpointing (``unet.enable_gradient_checkpointing``, non-reentrant) recomputes each transformer block
  in the backward pass. The adapters act through hooks that only fire while ``adapters.reference(...)`` is
  active, so the context is held open through ``backward()``: the recomputation then takes the adapted path,
  exactly as the forward did (tests check the gradients equal those without checkpointing).
* Gradient accumulation over ``grad_accum`` micro-batches; one optimizer step = ``batch_size * grad_accum *
  world_size`` samples.
* Data parallel: when ``torch.distributed`` is initialised (Ray Train's TorchTrainer does it) the trainable part is
  wrapped in DDP. The wrapped module registers the adapters only, so DDP neither broadcasts nor all-reduces the
  frozen weights.
* A checkpoint is a folder: Accelerate's state, the adapters as the pipeline loads them (fp32) and ``state.json``
  with the step and the data position. In process they go to ``<out>/checkpoints/step-XXXXXXXX/`` and a run started
  with ``resume="auto"`` continues from the newest; on Ray Train, Ray keeps them. The final adapter file
  ``<out>/adapter.safetensors`` is what ``DreamCachePipeline.from_pretrained(..., adapter=)`` loads.
* The local data path prepares images in DataLoader worker processes, rows back in stream order.
* Every random draw of a step comes from a generator seeded by (seed, step, rank, micro-batch), and the data stream
  is replayable from its position, so a resumed run computes what an uninterrupted one would have.

This module does not import Ray: ``pipelines/training/job.py`` runs the same loop on Ray Train workers.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn

from . import storage
from .adapters import adapter_file_bytes
from .cache import extract_features
from .errors import InvalidValue
from .images import ImageLimits
from .pipeline import DreamCachePipeline
from .runtime import ModelSpec, load_pipeline, pick_device
from .training_config import MixedPrecision, TrainingConfig  # noqa: F401 - re-exported: callers import it from here
from .triplets import (
    PreparedTriplet,
    ReferenceAugment,
    StreamPosition,
    TripletBatch,
    TripletError,
    TripletStream,
    collate,
    prepare_triplet,
    row_key,
    sample_rng,
)

logger = logging.getLogger(__name__)

ADAPTER_FILE = "adapter.safetensors"
STATE_FILE = "state.json"  # a checkpoint's step and data position, written last


@dataclass(frozen=True)
class World:
    """This process's place in a data-parallel group (a single process when torch.distributed is not set up)."""

    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


# -- data sources ------------------------------------------------------------------------------------------------
class BatchSource(Protocol):
    """Yields ``(batch, position after it)``; ``start`` is a position a previous run checkpointed (or None)."""

    def batches(self, start: Mapping | None) -> Iterator[tuple[TripletBatch, dict]]: ...


class _PreparedRows(torch.utils.data.IterableDataset):
    """This rank's rows of the stream from ``start``, each prepared (or the reason it cannot be) with the stream
    position after it.

    DataLoader worker ``k`` of ``n`` prepares this rank's rows ``k, k + n, ...``; the loader takes one item from
    each worker in turn, so the rows come back in stream order, whatever the number of workers.
    """

    def __init__(self, source: ParquetTripletSource, stream: TripletStream, start: StreamPosition) -> None:
        self.source, self.stream, self.start = source, stream, start

    def __iter__(self) -> Iterator[tuple[PreparedTriplet | str, dict]]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        world, source = self.source.world, self.source
        for index, (row, epoch, after) in enumerate(self.stream.rows(self.start)):
            if index % world.size != world.rank or (index // world.size) % workers != worker:
                continue
            try:
                yield prepare_triplet(row, source.resolution, sample_rng(source.seed, epoch, row_key(row)),
                                      source.augment, source.caption_dropout, source.limits), after.to_dict()
            except TripletError as exc:  # as text: the error crosses a process boundary
                yield str(exc), after.to_dict()


@dataclass
class ParquetTripletSource:
    """The local data path: a replayable Parquet stream, images prepared in ``workers`` DataLoader processes.

    With several ranks each takes every ``world.size``-th row of the same stream. ``pin_memory``: batches in
    page-locked memory, so their copy to a GPU is asynchronous.
    """

    uri: str
    batch_size: int
    resolution: int
    seed: int = 0
    augment: ReferenceAugment = field(default_factory=ReferenceAugment)
    caption_dropout: float = 0.07
    workers: int = 2
    world: World = field(default_factory=World)
    limits: ImageLimits = field(default_factory=ImageLimits)
    pin_memory: bool = False
    skipped: int = 0

    def batches(self, start: Mapping | None) -> Iterator[tuple[TripletBatch, dict]]:
        stream = TripletStream(self.uri, seed=self.seed)
        rows = _PreparedRows(self, stream, StreamPosition.from_dict(start))
        # Per-row items, about two batches in flight in all; prepared rows past the checkpointed position are
        # simply prepared again by a resumed run.
        ahead = {"prefetch_factor": math.ceil(2 * self.batch_size / self.workers)} if self.workers else {}
        loader = torch.utils.data.DataLoader(rows, batch_size=None, num_workers=self.workers, **ahead)
        samples, bad_in_a_row = [], 0
        for sample, position in loader:
            if isinstance(sample, str):
                self.skipped += 1
                bad_in_a_row += 1
                logger.warning("skipping a triplet (%d so far): %s", self.skipped, sample)
                if bad_in_a_row >= max(1, len(stream) // self.world.size):
                    raise TripletError(f"{self.uri}: no usable triplet in a whole pass over the data")
                continue
            samples.append(sample)
            bad_in_a_row = 0
            if len(samples) == self.batch_size:
                batch = collate(samples)
                yield (batch.pin_memory() if self.pin_memory else batch), position
                samples = []


# -- the model -------------------------------------------------------------------------------------------------
class AdapterDenoiser(nn.Module):
    """The trainable part as one module: the adapters are registered submodules, the frozen UNet is not.

    Wrapped in DDP this synchronises exactly the adapter weights and gradients. The adapters act through hooks
    on the UNet's blocks, so calling the UNet here runs them.
    """

    def __init__(self, pipe: DreamCachePipeline) -> None:
        super().__init__()
        self.adapter_modules = nn.ModuleList([module for _, module in pipe.adapters.modules()])
        self.__dict__["unet"] = pipe.unet  # a plain attribute: not part of this module's parameters

    def forward(self, latents: torch.Tensor, timesteps: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        return self.unet(latents, timesteps, encoder_hidden_states=text).sample


def resolve_precision(mixed_precision: MixedPrecision, device: torch.device) -> Literal["no", "fp16", "bf16"]:
    """Accelerate's mixed precision for ``mixed_precision`` on ``device``: full fp32 ("no") on a CPU."""
    if device.type != "cuda" or mixed_precision == "no":
        if mixed_precision in ("fp16", "bf16") and device.type != "cuda":
            logger.info("mixed precision %s requested on %s: training in fp32", mixed_precision, device)
        return "no"
    if mixed_precision == "auto":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return mixed_precision


def training_model(config: TrainingConfig) -> ModelSpec:
    """What a run trains from, for runtime's one loader: fp32 on the CPU (prepare_pipeline_for_training places
    and casts it), the adapters loaded from ``init_adapter`` or fresh."""
    # False, not None: None would load an adapter.safetensors lying beside the model (from_pretrained's rule),
    # and a run meant to start fresh would start from it.
    return ModelSpec(model=config.model, adapter=config.init_adapter or False, device="cpu", dtype="fp32",
                     adapter_init=config.adapter_init)


def load_training_pipeline(config: TrainingConfig) -> DreamCachePipeline:
    """runtime.load_pipeline of training_model, with the fresh adapters' init drawn from the run's seed alone."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        return load_pipeline(training_model(config))


def prepare_pipeline_for_training(pipe: DreamCachePipeline, device: torch.device,
                                  half: torch.dtype | None) -> DreamCachePipeline:
    """The frozen model (in ``half`` on GPU when mixed precision is on) with fp32 trainable adapters."""
    pipe.set_progress_bar_config(disable=True)
    pipe.to(device=device, dtype=half) if half is not None else pipe.to(device)
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        module.requires_grad_(False).eval()
    for _, module in pipe.adapters.modules():
        module.float().requires_grad_(True)
    return pipe


def step_generator(seed: int, step: int, rank: int, micro: int) -> torch.Generator:
    """Every random draw of one micro-batch (latent sample, cache noise, t, eps): replayable on resume."""
    digest = hashlib.sha256(f"{seed}:{step}:{rank}:{micro}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


class AdapterTrainer:
    """One model, its optimizer, and the training step, run by an ``accelerate.Accelerator``; writes and reads
    its own checkpoint folders."""

    def __init__(self, config: TrainingConfig, device: torch.device | None = None,
                 pipe: DreamCachePipeline | None = None) -> None:
        """``pipe`` (optional) is a pipeline built in memory, e.g. a random-weight model for a benchmark; it is moved
        and cast like a loaded one. By default ``config.model`` is loaded."""
        config.validate()
        self.config = config
        self.device = device or pick_device(config.device)
        precision = resolve_precision(config.mixed_precision, self.device)
        # Accelerate joins a process group already set up (Ray Train's TorchTrainer, torchrun) and wraps the model
        # in DDP only then. Its state is one per process: the first Accelerator fixes CPU-or-not and the precision.
        # device_placement off: the frozen pipeline, which it does not see, is placed here with the adapters.
        self.accelerator = Accelerator(mixed_precision=precision, cpu=self.device.type == "cpu",
                                       gradient_accumulation_steps=config.grad_accum, device_placement=False)
        self.world = World(self.accelerator.process_index, self.accelerator.num_processes)
        self.autocast_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)
        self.pipe = prepare_pipeline_for_training(
            pipe or load_training_pipeline(config), self.device, self.autocast_dtype)
        self.resolution = config.resolution or self.pipe.default_resolution
        steps = self.pipe.scheduler.config.num_train_timesteps
        if config.timestep_range is not None and config.timestep_range[1] > steps:
            raise InvalidValue(f"timestep_range {config.timestep_range} goes past the scheduler's {steps} timesteps")
        if config.gradient_checkpointing:
            self.pipe.unet.enable_gradient_checkpointing()
        elif self.pipe.unet.is_gradient_checkpointing:  # a pipeline handed in may have it on
            self.pipe.unet.disable_gradient_checkpointing()
        self.params = [p for p in self.pipe.adapters.parameters()]
        optimizer = torch.optim.AdamW(self.params, lr=config.lr, weight_decay=config.weight_decay)
        self.denoiser, self.optimizer = self.accelerator.prepare(AdapterDenoiser(self.pipe), optimizer)
        with torch.no_grad():
            self.cache_context = self.pipe.encode_prompt([config.cache_prompt])
        logger.info("training %d adapter parameters on %s (rank %d/%d, mixed precision %s, checkpointing %s)",
                    sum(p.numel() for p in self.params), self.device, self.world.rank, self.world.size,
                    precision, config.gradient_checkpointing)

    # -- the step ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, batch: TripletBatch, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, list[dict]]:
        """Frozen parts of a step: target latents (posterior sample), caption embeddings, per-sample caches."""
        pipe, vae = self.pipe, self.pipe.vae
        posterior = vae.encode(batch.target.to(self.device, vae.dtype, non_blocking=True)).latent_dist
        sample = torch.randn(posterior.mean.shape, generator=generator).to(self.device, posterior.mean.dtype)
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        latents = ((posterior.mean + posterior.std * sample - shift) * vae.config.scaling_factor).float()
        text = pipe.encode_prompt(batch.captions)
        seeds = torch.randint(0, 2**62, (len(batch),), generator=generator).tolist()
        features = extract_features(pipe.unet, vae, pipe.layers, batch.reference, self.cache_context,
                                    pipe.scheduler.alphas_cumprod, seeds)
        caches = [{name: value[i : i + 1] for name, value in features.items()} for i in range(len(batch))]
        return latents, text, caches

    def loss_and_backward(self, batch: TripletBatch, generator: torch.Generator, backward: bool = True) -> float:
        """Loss of one micro-batch (eps-MSE unless ``loss_weighting`` says otherwise); with ``backward`` its gradient (over ``grad_accum``) is accumulated.

        The reference context stays open through backward: a gradient-checkpointed block recomputed there must take
        the adapted path again.
        """
        latents, text, caches = self.encode(batch, generator)
        low, high = self.config.timestep_range or (0, self.pipe.scheduler.config.num_train_timesteps)
        timesteps = torch.randint(low, high, (len(batch),), generator=generator).to(self.device)
        noise = torch.randn(latents.shape, generator=generator).to(self.device)
        noisy = self.pipe.scheduler.add_noise(latents, noise, timesteps)
        unet_dtype = self.pipe.unet.dtype
        with contextlib.ExitStack() as stack:
            if not backward:
                stack.enter_context(torch.no_grad())
            with self.accelerator.autocast():
                stack.enter_context(self.pipe.adapters.reference(caches, list(range(len(batch)))))
                prediction = self.denoiser(noisy.to(unet_dtype), timesteps, text.to(unet_dtype))
                loss = self.weighted_mse(prediction.float(), noise, timesteps)
            if backward:
                self.accelerator.backward(loss)
        return float(loss.detach())

    def weighted_mse(self, prediction: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The batch's loss under ``config.loss_weighting`` (eps: exactly ``F.mse_loss``, as the official run)."""
        if self.config.loss_weighting == "eps":
            return F.mse_loss(prediction, noise)
        abar = self.pipe.scheduler.alphas_cumprod.to(self.device)[timesteps].float()
        weight = ((1 - abar) / abar).clamp(max=self.config.max_loss_weight)
        per_sample = (prediction - noise).pow(2).flatten(1).mean(1)
        return (weight * per_sample).mean()

    def train_step(self, micro_batches: list[TripletBatch], step: int) -> float:
        """One optimizer step over ``grad_accum`` micro-batches; returns their mean loss."""
        losses = []
        for micro, batch in enumerate(micro_batches):
            # Accelerate skips DDP's all-reduce, the clipping and the optimizer step but on the last micro-batch.
            with self.accelerator.accumulate(self.denoiser):
                generator = step_generator(self.config.seed, step, self.world.rank, micro)
                losses.append(self.loss_and_backward(batch, generator))
                if self.accelerator.sync_gradients and self.config.max_grad_norm:
                    self.accelerator.clip_grad_norm_(self.params, self.config.max_grad_norm)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
        return sum(losses) / len(losses)

    @torch.no_grad()
    def evaluate_loss(self, batches: list[TripletBatch], seed: int = 1234) -> float:
        """Mean eps-MSE over fixed batches with fixed draws: comparable across checkpoints."""
        losses = [self.loss_and_backward(batch, step_generator(seed, i, 0, 0), backward=False)
                  for i, batch in enumerate(batches)]
        return sum(losses) / len(losses)

    def mean_across_ranks(self, value: float) -> float:
        tensor = torch.tensor([value], device=self.device, dtype=torch.float64)
        return float(self.accelerator.reduce(tensor, reduction="mean").item())

    # -- checkpoint folders --------------------------------------------------------------------------------
    def save_state(self, directory: str, step: int, position: Mapping | None, samples_seen: int) -> None:
        """This rank's part of a checkpoint, into the local folder ``directory``: Accelerate's state (adapters,
        optimizer, gradient scaler, random generators), and from rank 0 the adapter file the pipeline loads and
        ``state.json`` with the step and the data position."""
        self.accelerator.save_state(directory)
        if self.world.is_main:
            Path(directory, ADAPTER_FILE).write_bytes(adapter_file_bytes(self.pipe.adapters, torch.float32))
            state = {"step": step, "data_position": dict(position or {}), "samples_seen": samples_seen,
                     "base_model": self.pipe.base_model, "world_size": self.world.size, "time": time.time(),
                     "config": self.config.summary()}
            Path(directory, STATE_FILE).write_text(json.dumps(state, indent=2))

    def load_state(self, directory: str, name: str) -> dict:
        """Restore what ``save_state`` wrote into ``directory`` (the checkpoint ``name``); returns its state.json."""
        state = json.loads(Path(directory, STATE_FILE).read_text())
        if state["base_model"] != self.pipe.base_model:
            raise InvalidValue(f"checkpoint {name} was trained on base model {state['base_model']}, this run's model is "
                               f"{self.pipe.base_model}; use another --out or --resume never", kind="incompatible")
        saved_world = state.get("world_size", 1)
        if (saved_world == 1) != (self.world.size == 1):  # a DDP-wrapped model's state names its tensors module.*
            raise InvalidValue(f"checkpoint {name} is of a {saved_world}-worker run; resume it on "
                               f"{'one worker' if saved_world == 1 else 'several workers'}", kind="incompatible")
        self.accelerator.load_state(directory)
        if saved_world != self.world.size:
            logger.warning("resuming a %d-worker run on %d workers: the data order changes from here",
                           saved_world, self.world.size)
        logger.info("resumed from %s at step %d", name, state["step"])
        return state

    def save_final(self) -> str:
        uri = storage.join_uri(self.config.out, ADAPTER_FILE)
        dtype = torch.float16 if self.config.save_dtype == "fp16" else torch.float32
        storage.write_bytes(uri, adapter_file_bytes(self.pipe.adapters, dtype))
        return uri


# -- where checkpoints go ----------------------------------------------------------------------------------------
class Checkpoints(Protocol):
    """Keeps a run's checkpoints (folders of ``AdapterTrainer.save_state``) and gives a resumed run its last one."""

    def restore(self, trainer: AdapterTrainer) -> dict | None:
        """Load the checkpoint to resume from into ``trainer``; its state.json, or None for a fresh start."""
        ...

    def save(self, trainer: AdapterTrainer, step: int, position: Mapping | None, samples_seen: int) -> None: ...


@dataclass
class FolderCheckpoints:
    """The in-process run's checkpoints: ``<out>/checkpoints/step-XXXXXXXX/`` (local or s3://), the newest
    ``keep_checkpoints`` kept. A folder is complete once it holds ``state.json``, uploaded last; ``resume="auto"``
    continues from the newest complete one. (On Ray Train, ``pipelines.training`` uses Ray's checkpoints.)"""

    config: TrainingConfig

    @property
    def root(self) -> str:
        return storage.join_uri(self.config.out, "checkpoints")

    def folder(self, step: int) -> str:
        return storage.join_uri(self.root, f"step-{step:08d}")

    def _folders(self) -> dict[int, bool]:
        """Step -> whether the folder is complete."""
        folders: dict[int, bool] = {}
        for uri in storage.list_files(self.root):
            name, _, rest = uri[len(self.root):].strip("/").partition("/")
            if name.startswith("step-") and name[5:].isdigit():
                folders[int(name[5:])] = folders.get(int(name[5:]), False) or rest == STATE_FILE
        return folders

    def restore(self, trainer: AdapterTrainer) -> dict | None:
        uri = self.config.resume
        if uri == "never":
            return None
        if uri == "auto":
            complete = [step for step, done in self._folders().items() if done]
            if not complete:
                return None
            uri = self.folder(max(complete))
        if not storage.exists(storage.join_uri(uri, STATE_FILE)):
            raise FileNotFoundError(f"{uri} is not a training checkpoint (no {STATE_FILE})")
        with tempfile.TemporaryDirectory(prefix="dreamcache-checkpoint-") as local:
            return trainer.load_state(str(storage.download_prefix(uri, local)), uri)

    def save(self, trainer: AdapterTrainer, step: int, position: Mapping | None, samples_seen: int) -> None:
        if not trainer.world.is_main:
            return
        uri = self.folder(step)
        with tempfile.TemporaryDirectory(prefix="dreamcache-checkpoint-") as local:
            trainer.save_state(local, step, position, samples_seen)
            state = Path(local, STATE_FILE)
            marker = state.read_bytes()
            state.unlink()
            storage.upload_dir(local, uri)
            storage.write_bytes(storage.join_uri(uri, STATE_FILE), marker)
        folders = self._folders()
        keep = sorted(s for s, done in folders.items() if done)[-self.config.keep_checkpoints:]
        for old in set(folders) - set(keep):
            self._delete(self.folder(old))
        logger.info("checkpoint at step %d: %s", step, uri)

    @staticmethod
    def _delete(folder: str) -> None:
        for uri in storage.list_files(folder):
            storage.delete(uri)
        location = storage.parse_uri(folder)
        if location.scheme == "file":  # object stores have no empty folders to leave behind
            with contextlib.suppress(OSError):
                os.rmdir(location.path)


# -- the loop ----------------------------------------------------------------------------------------------------
@dataclass
class TrainingResult:
    steps: int
    resumed_from_step: int
    final_loss: float | None
    adapter_uri: str
    samples_per_s: float | None
    elapsed_s: float


Reporter = Callable[[dict], None]


@dataclass
class _Progress:
    """Loss and throughput every ``log_every`` steps: logged on rank 0, reported on every rank."""

    trainer: AdapterTrainer
    report: Reporter | None
    samples_per_step: int
    window_start: float = field(default_factory=time.perf_counter)
    window_steps: int = 0
    samples_per_s: float | None = None

    def update(self, step: int, loss: float, samples_seen: int, position: Mapping | None) -> None:
        config = self.trainer.config
        self.window_steps += 1
        if step % config.log_every and step != config.steps:
            return
        self.samples_per_s = self.window_steps * self.samples_per_step / (time.perf_counter() - self.window_start)
        loss = self.trainer.mean_across_ranks(loss)  # every rank logs at the same steps
        if self.trainer.world.is_main:
            eta = (config.steps - step) * self.samples_per_step / self.samples_per_s
            logger.info("step %d/%d  loss %.4f  %.2f samples/s  eta %.0fs",
                        step, config.steps, loss, self.samples_per_s, eta)
        if self.report:
            self.report({"step": step, "loss": loss, "samples_per_s": self.samples_per_s, "samples_seen": samples_seen,
                         "lr": config.lr, "epoch": (position or {}).get("epoch")})
        self.window_start, self.window_steps = time.perf_counter(), 0


def train(config: TrainingConfig, source: BatchSource | None = None, report: Reporter | None = None,
          trainer: AdapterTrainer | None = None, checkpoints: Checkpoints | None = None) -> TrainingResult:
    """Train (or finish training) the adapters of ``config``; resumes from its last checkpoint.

    ``source`` defaults to the local Parquet stream of ``config.data``; ``report`` receives the metrics logged
    every ``log_every`` steps; ``checkpoints`` defaults to folders under ``config.out`` (Ray Train passes its own).
    """
    started = time.perf_counter()
    trainer = trainer or AdapterTrainer(config)
    checkpoints = checkpoints or FolderCheckpoints(config)
    world = trainer.world
    state = checkpoints.restore(trainer) or {}
    start_step, position, samples_seen = state.get("step", 0), state.get("data_position"), state.get("samples_seen", 0)
    per_step = config.batch_size * config.grad_accum * world.size
    progress = _Progress(trainer, report, per_step)
    step, last_loss = start_step, None
    if start_step < config.steps:
        source = source or ParquetTripletSource(config.data, config.batch_size, trainer.resolution, config.seed,
                                                config.augment, config.caption_dropout, config.data_workers, world,
                                                pin_memory=trainer.device.type == "cuda")
        logger.info("training steps %d..%d, %d samples per step", start_step + 1, config.steps, per_step)
        batches = source.batches(position)
        try:
            for step in range(start_step + 1, config.steps + 1):
                micro = []
                for _ in range(config.grad_accum):
                    batch, position = next(batches)
                    micro.append(batch)
                last_loss = trainer.train_step(micro, step)
                if not math.isfinite(last_loss):
                    raise FloatingPointError(f"loss is {last_loss} at step {step}; lower the learning rate")
                samples_seen += per_step
                progress.update(step, last_loss, samples_seen, position)
                if step % config.checkpoint_every == 0 or step == config.steps:
                    checkpoints.save(trainer, step, position, samples_seen)
        finally:
            close = getattr(batches, "close", None)
            if close:
                close()
    adapter_uri = storage.join_uri(config.out, ADAPTER_FILE)
    if world.is_main:
        adapter_uri = trainer.save_final()
        logger.info("adapters written to %s", adapter_uri)
    return TrainingResult(steps=step, resumed_from_step=start_step, final_loss=last_loss, adapter_uri=adapter_uri,
                          samples_per_s=progress.samples_per_s, elapsed_s=time.perf_counter() - started)
