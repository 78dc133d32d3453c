"""Training the conditioning adapters (spec section 3.1), with checkpoints that a restarted run resumes from.

Per step, for a batch of (target, reference, caption): the frozen VAE encodes the target (posterior sample), the
frozen text encoder the caption, and the frozen UNet builds each reference's feature cache on the fly at t=1
with the empty prompt (``cache.extract_features``, adapters off). Then t ~ U{0..999}, z_t = add_noise(z_0, eps, t),
and the UNet with the adapters attending to the caches predicts eps; the loss is the plain eps-MSE. Only the
adapters train (AdamW, lr 1e-5 by default, PyTorch's betas/eps, weight decay 0.01, no schedule, no EMA).

* Mixed precision on GPU: the frozen weights are stored in bf16 (or fp16), the adapters stay fp32 under autocast;
  fp16 uses a gradient scaler.
* Gradient checkpointing (``unet.enable_gradient_checkpointing``, non-reentrant) recomputes each transformer block
  in the backward pass. The adapters act through hooks that only fire while ``adapters.reference(...)`` is
  active, so the context is held open through ``backward()``: the recomputation then takes the adapted path,
  exactly as the forward did (tests check the gradients equal those without checkpointing).
* Gradient accumulation over ``grad_accum`` micro-batches; one optimizer step = ``batch_size * grad_accum *
  world_size`` samples.
* Data parallel: when ``torch.distributed`` is initialised (Ray Train's TorchTrainer does it) the trainable part is
  wrapped in DDP. The wrapped module registers the adapters only, so DDP neither broadcasts nor all-reduces the
  frozen weights; rank 0 writes checkpoints.
* Checkpoints under ``<out>/checkpoints/step-XXXXXXXX/``: the adapters (fp32 safetensors), the optimizer state,
  and ``state.json`` with the step and the data position; ``<out>/checkpoints/latest.json`` is written last and
  names the newest. A run started with ``resume="auto"`` continues from it. The final adapter file
  ``<out>/adapter.safetensors`` is what ``DreamCachePipeline.from_pretrained(..., adapter=)`` loads.
* Every random draw of a step comes from a generator seeded by (seed, step, rank, micro-batch), and the data stream
  is replayable from its position, so a resumed run computes what an uninterrupted one would have.

This module does not import Ray: ``pipelines/training.py`` runs the same loop on Ray Train workers.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import math
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Literal, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from . import storage
from .adapters import LinearCatInit, adapter_file_bytes, parse_adapter_file
from .cache import extract_features
from .errors import InvalidValue
from .images import ImageLimits
from .pipeline import DreamCachePipeline
from .triplets import (
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

MixedPrecision = Literal["auto", "no", "fp16", "bf16"]
ADAPTER_FILE = "adapter.safetensors"
LATEST = "latest.json"


@dataclass
class TrainingConfig:
    """Everything a training run needs; the job's flags map onto these fields one to one."""

    model: str  # diffusers SD folder or s3:// prefix
    data: str  # triplet Parquet file, folder or s3:// prefix
    out: str  # output folder or s3:// prefix: checkpoints/ and the final adapter.safetensors
    steps: int  # optimizer steps
    batch_size: int = 8  # per worker and micro-batch
    grad_accum: int = 1
    lr: float = 1e-5
    weight_decay: float = 0.01
    resolution: int | None = None  # default: the model's native resolution (512 for SD, 64 for the tiny model)
    mixed_precision: MixedPrecision = "auto"  # auto: bf16 on a GPU that has it, else fp16 on GPU, fp32 on CPU
    gradient_checkpointing: bool = False
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    resume: str = "auto"  # auto: from <out>/checkpoints/latest.json if present | never | a checkpoint URI
    seed: int = 0
    caption_dropout: float = 0.07
    augment: ReferenceAugment = field(default_factory=ReferenceAugment)
    init_adapter: str | None = None  # start from this adapter file instead of a fresh initialisation
    adapter_init: LinearCatInit = "default"  # fresh init: "default" (official) or "identity" (deviation A7)
    save_dtype: Literal["fp16", "fp32"] = "fp16"  # of the final adapter file; checkpoints are always fp32
    log_every: int = 10
    device: str = "auto"
    cache_prompt: str = ""  # text context of the on-the-fly caching pass ("" as the official training)
    data_workers: int = 2  # threads decoding and augmenting images (local data path)
    max_grad_norm: float | None = None  # the official run does not clip

    def validate(self) -> None:
        counts = ("steps", "batch_size", "grad_accum", "checkpoint_every", "keep_checkpoints", "log_every", "data_workers")
        for name in counts:
            if getattr(self, name) < 1:
                raise InvalidValue(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise InvalidValue(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.caption_dropout <= 1:
            raise InvalidValue(f"caption_dropout must be in [0, 1], got {self.caption_dropout}")
        if self.mixed_precision not in ("auto", "no", "fp16", "bf16"):
            raise InvalidValue(f"mixed_precision must be auto, no, fp16 or bf16, got {self.mixed_precision!r}")
        if self.save_dtype not in ("fp16", "fp32"):
            raise InvalidValue(f"save_dtype must be fp16 or fp32, got {self.save_dtype!r}")
        if self.resolution is not None and (self.resolution <= 0 or self.resolution % 8):
            raise InvalidValue(f"resolution must be a positive multiple of 8, got {self.resolution}")

    def summary(self) -> dict:
        data = asdict(self)
        data["augment"] = asdict(self.augment)
        return data


@dataclass(frozen=True)
class World:
    """This process's place in a data-parallel group (a single process when torch.distributed is not set up)."""

    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def current(cls) -> World:
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()


# -- data sources ------------------------------------------------------------------------------------------------
class BatchSource(Protocol):
    """Yields ``(batch, position after it)``; ``start`` is a position a previous run checkpointed (or None)."""

    def batches(self, start: Mapping | None) -> Iterator[tuple[TripletBatch, dict]]: ...


@dataclass
class ParquetTripletSource:
    """The local data path: a replayable Parquet stream, images prepared on a few threads, batches prefetched.

    With several ranks each takes every ``world.size``-th row of the same stream.
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
    skipped: int = 0

    def batches(self, start: Mapping | None) -> Iterator[tuple[TripletBatch, dict]]:
        return prefetch(self._batches(StreamPosition.from_dict(start)), depth=2)

    def _prepare(self, item):
        row, epoch = item
        try:
            return prepare_triplet(row, self.resolution, sample_rng(self.seed, epoch, row_key(row)), self.augment,
                                   self.caption_dropout, self.limits)
        except TripletError as exc:
            return exc

    def _batches(self, position: StreamPosition) -> Iterator[tuple[TripletBatch, dict]]:
        dataset = TripletStream(self.uri, seed=self.seed)
        stream = dataset.rows(position)
        index, bad_in_a_row = 0, 0
        with ThreadPoolExecutor(self.workers, thread_name_prefix="triplets") as pool:
            samples = []
            while True:
                wanted, chunk, after = self.batch_size - len(samples), [], position
                while len(chunk) < wanted:
                    row, epoch, after = next(stream)
                    if index % self.world.size == self.world.rank:
                        chunk.append((row, epoch))
                    index += 1
                for result in pool.map(self._prepare, chunk):
                    if isinstance(result, TripletError):
                        self.skipped += 1
                        bad_in_a_row += 1
                        logger.warning("skipping a triplet (%d so far): %s", self.skipped, result)
                    else:
                        samples.append(result)
                        bad_in_a_row = 0
                if bad_in_a_row >= max(1, len(dataset) // self.world.size):
                    raise TripletError(f"{self.uri}: no usable triplet in a whole pass over the data")
                position = after
                if len(samples) == self.batch_size:
                    yield collate(samples), position.to_dict()
                    samples = []


def prefetch(iterator: Iterator, depth: int = 2) -> Iterator:
    """Run ``iterator`` on a background thread, ``depth`` items ahead; its exceptions re-raise here."""
    items: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in iterator:
                while not stop.is_set():
                    try:
                        items.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            items.put(done)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            items.put(exc)

    thread = threading.Thread(target=produce, name="prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = items.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()


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


def resolve_device(name: str) -> torch.device:
    if name != "auto":
        return torch.device(name)
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def resolve_precision(mixed_precision: MixedPrecision, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for full fp32."""
    if device.type != "cuda" or mixed_precision == "no":
        if mixed_precision in ("fp16", "bf16") and device.type != "cuda":
            logger.info("mixed precision %s requested on %s: training in fp32", mixed_precision, device)
        return None
    if mixed_precision == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"fp16": torch.float16, "bf16": torch.bfloat16}[mixed_precision]


def load_pipeline(config: TrainingConfig) -> DreamCachePipeline:
    """The base model with adapters: loaded from ``init_adapter``, or freshly initialised from the seed."""
    with torch.random.fork_rng(devices=[]):  # the fresh adapters' init depends on the seed only
        torch.manual_seed(config.seed)
        # False, not None: None would load an adapter.safetensors lying beside the model (from_pretrained's rule),
        # and a run meant to start fresh would start from it.
        return DreamCachePipeline.from_pretrained(config.model, adapter=config.init_adapter or False,
                                                  adapter_init=config.adapter_init)


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
    """One model, its optimizer, and the training step; knows how to checkpoint and resume itself."""

    def __init__(self, config: TrainingConfig, device: torch.device | None = None, world: World | None = None,
                 pipe: DreamCachePipeline | None = None) -> None:
        """``pipe`` (optional) is a pipeline built in memory, e.g. a random-weight model for a benchmark; it is moved
        and cast like a loaded one. By default ``config.model`` is loaded."""
        config.validate()
        self.config = config
        self.world = world or World.current()
        self.device = device or resolve_device(config.device)
        self.autocast_dtype = resolve_precision(config.mixed_precision, self.device)
        self.pipe = prepare_pipeline_for_training(
            pipe or load_pipeline(config), self.device, self.autocast_dtype)
        self.resolution = config.resolution or self.pipe.default_resolution
        if config.gradient_checkpointing:
            self.pipe.unet.enable_gradient_checkpointing()
        elif self.pipe.unet.is_gradient_checkpointing:  # a pipeline handed in may have it on
            self.pipe.unet.disable_gradient_checkpointing()
        self.denoiser: nn.Module = AdapterDenoiser(self.pipe)
        if self.world.size > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.denoiser = nn.parallel.DistributedDataParallel(self.denoiser, device_ids=ids)
        self.params = [p for p in self.pipe.adapters.parameters()]
        self.optimizer = torch.optim.AdamW(self.params, lr=config.lr, weight_decay=config.weight_decay)
        self.scaler = torch.amp.GradScaler("cuda") if self.autocast_dtype == torch.float16 else None
        with torch.no_grad():
            self.cache_context = self.pipe.encode_prompt([config.cache_prompt])
        logger.info("training %d adapter parameters on %s (rank %d/%d, autocast %s, checkpointing %s)",
                    sum(p.numel() for p in self.params), self.device, self.world.rank, self.world.size,
                    self.autocast_dtype, config.gradient_checkpointing)

    # -- the step ------------------------------------------------------------------------------------------
    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    @torch.no_grad()
    def encode(self, batch: TripletBatch, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, list[dict]]:
        """Frozen parts of a step: target latents (posterior sample), caption embeddings, per-sample caches."""
        pipe, vae = self.pipe, self.pipe.vae
        posterior = vae.encode(batch.target.to(self.device, vae.dtype)).latent_dist
        sample = torch.randn(posterior.mean.shape, generator=generator).to(self.device, posterior.mean.dtype)
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        latents = ((posterior.mean + posterior.std * sample - shift) * vae.config.scaling_factor).float()
        text = pipe.encode_prompt(batch.captions)
        seeds = torch.randint(0, 2**62, (len(batch),), generator=generator).tolist()
        features = extract_features(pipe.unet, vae, pipe.layers, batch.reference, self.cache_context,
                                    pipe.scheduler.alphas_cumprod, seeds)
        caches = [{name: value[i : i + 1] for name, value in features.items()} for i in range(len(batch))]
        return latents, text, caches

    def loss_and_backward(self, batch: TripletBatch, generator: torch.Generator, scale: float = 1.0,
                          backward: bool = True) -> float:
        """eps-MSE of one micro-batch; with ``backward`` its gradient (times ``scale``) is accumulated.

        The reference context stays open through backward: a gradient-checkpointed block recomputed there must take
        the adapted path again.
        """
        latents, text, caches = self.encode(batch, generator)
        steps = self.pipe.scheduler.config.num_train_timesteps
        timesteps = torch.randint(0, steps, (len(batch),), generator=generator).to(self.device)
        noise = torch.randn(latents.shape, generator=generator).to(self.device)
        noisy = self.pipe.scheduler.add_noise(latents, noise, timesteps)
        unet_dtype = self.pipe.unet.dtype
        with contextlib.ExitStack() as stack:
            if not backward:
                stack.enter_context(torch.no_grad())
            with self._autocast():
                stack.enter_context(self.pipe.adapters.reference(caches, list(range(len(batch)))))
                prediction = self.denoiser(noisy.to(unet_dtype), timesteps, text.to(unet_dtype))
                loss = F.mse_loss(prediction.float(), noise)
            if backward:
                scaled = loss * scale
                (self.scaler.scale(scaled) if self.scaler else scaled).backward()
        return float(loss.detach())

    def train_step(self, micro_batches: list[TripletBatch], step: int) -> float:
        """One optimizer step over ``grad_accum`` micro-batches; returns their mean loss."""
        self.optimizer.zero_grad(set_to_none=True)
        losses = []
        for micro, batch in enumerate(micro_batches):
            last = micro == len(micro_batches) - 1
            sync = contextlib.nullcontext() if last or self.world.size == 1 else self.denoiser.no_sync()
            with sync:
                generator = step_generator(self.config.seed, step, self.world.rank, micro)
                losses.append(self.loss_and_backward(batch, generator, scale=1.0 / len(micro_batches)))
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        if self.config.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.params, self.config.max_grad_norm)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        return sum(losses) / len(losses)

    @torch.no_grad()
    def evaluate_loss(self, batches: list[TripletBatch], seed: int = 1234) -> float:
        """Mean eps-MSE over fixed batches with fixed draws: comparable across checkpoints."""
        losses = [self.loss_and_backward(batch, step_generator(seed, i, 0, 0), backward=False)
                  for i, batch in enumerate(batches)]
        return sum(losses) / len(losses)

    # -- checkpoints ---------------------------------------------------------------------------------------
    def checkpoint_uri(self, step: int) -> str:
        return storage.join_uri(self.config.out, "checkpoints", f"step-{step:08d}")

    def save_checkpoint(self, step: int, position: Mapping | None, samples_seen: int) -> str:
        """Write adapters, optimizer and state, then point latest.json at them (rank 0 only)."""
        uri = self.checkpoint_uri(step)
        storage.write_bytes(storage.join_uri(uri, ADAPTER_FILE), adapter_file_bytes(self.pipe.adapters, torch.float32))
        buffer = io.BytesIO()
        torch.save({"optimizer": self.optimizer.state_dict(),
                    "scaler": self.scaler.state_dict() if self.scaler else None}, buffer)
        storage.write_bytes(storage.join_uri(uri, "optimizer.pt"), buffer.getvalue())
        state = {"step": step, "data_position": dict(position or {}), "samples_seen": samples_seen,
                 "base_model": self.pipe.base_model, "world_size": self.world.size, "time": time.time(),
                 "config": self.config.summary()}
        storage.write_bytes(storage.join_uri(uri, "state.json"), json.dumps(state, indent=2).encode())
        storage.write_bytes(storage.join_uri(self.config.out, "checkpoints", LATEST),
                            json.dumps({"step": step, "checkpoint": uri}).encode())
        self._prune_checkpoints(step)
        logger.info("checkpoint at step %d: %s", step, uri)
        return uri

    def _prune_checkpoints(self, newest: int) -> None:
        root = storage.join_uri(self.config.out, "checkpoints")
        steps = sorted({int(part[5:]) for uri in storage.list_files(root)
                        for part in uri[len(root):].split("/") if part.startswith("step-") and part[5:].isdigit()})
        for old in [s for s in steps if s != newest][: max(0, len(steps) - self.config.keep_checkpoints)]:
            folder = self.checkpoint_uri(old)
            for uri in storage.list_files(folder):
                storage.delete(uri)
            location = storage.parse_uri(folder)
            if location.scheme == "file":  # object stores have no empty folders to leave behind
                with contextlib.suppress(OSError):
                    os.rmdir(location.path)

    def find_checkpoint(self) -> str | None:
        resume = self.config.resume
        if resume == "never":
            return None
        if resume != "auto":
            return resume
        latest = storage.join_uri(self.config.out, "checkpoints", LATEST)
        if not storage.exists(latest):
            return None
        return json.loads(storage.read_bytes(latest))["checkpoint"]

    def load_checkpoint(self, uri: str) -> dict:
        """Restore adapters and optimizer from a checkpoint folder; returns its state.json."""
        try:
            state = json.loads(storage.read_bytes(storage.join_uri(uri, "state.json")))
        except storage.ObjectNotFound:
            raise FileNotFoundError(f"{uri} is not a training checkpoint (no state.json)") from None
        if state["base_model"] != self.pipe.base_model:
            raise InvalidValue(f"checkpoint {uri} was trained on base model {state['base_model']}, this run's model is "
                               f"{self.pipe.base_model}; use another --out or --resume never", kind="incompatible")
        weights, _ = parse_adapter_file(storage.read_bytes(storage.join_uri(uri, ADAPTER_FILE)), uri)
        self.pipe.adapters.load_state_dict({k: v.to(self.device, torch.float32) for k, v in weights.items()})
        saved = torch.load(io.BytesIO(storage.read_bytes(storage.join_uri(uri, "optimizer.pt"))),
                           map_location=self.device, weights_only=True)
        self.optimizer.load_state_dict(saved["optimizer"])
        if self.scaler and saved.get("scaler"):
            self.scaler.load_state_dict(saved["scaler"])
        if state.get("world_size") != self.world.size:
            logger.warning("resuming a %s-worker run on %d workers: the data order changes from here",
                           state.get("world_size"), self.world.size)
        logger.info("resumed from %s at step %d", uri, state["step"])
        return state

    def save_final(self) -> str:
        uri = storage.join_uri(self.config.out, ADAPTER_FILE)
        dtype = torch.float16 if self.config.save_dtype == "fp16" else torch.float32
        storage.write_bytes(uri, adapter_file_bytes(self.pipe.adapters, dtype))
        return uri


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


def _mean_across_ranks(value: float, world: World, device: torch.device) -> float:
    if world.size == 1:
        return value
    tensor = torch.tensor([value], device=device, dtype=torch.float64)
    torch.distributed.all_reduce(tensor)
    return float(tensor.item()) / world.size


@dataclass
class _Progress:
    """Loss and throughput every ``log_every`` steps: logged on rank 0, reported on every rank."""

    config: TrainingConfig
    world: World
    device: torch.device
    report: Reporter | None
    samples_per_step: int
    window_start: float = field(default_factory=time.perf_counter)
    window_steps: int = 0
    samples_per_s: float | None = None

    def update(self, step: int, loss: float, samples_seen: int, position: Mapping | None) -> None:
        self.window_steps += 1
        if step % self.config.log_every and step != self.config.steps:
            return
        self.samples_per_s = self.window_steps * self.samples_per_step / (time.perf_counter() - self.window_start)
        loss = _mean_across_ranks(loss, self.world, self.device)  # every rank logs at the same steps
        if self.world.is_main:
            eta = (self.config.steps - step) * self.samples_per_step / self.samples_per_s
            logger.info("step %d/%d  loss %.4f  %.2f samples/s  eta %.0fs",
                        step, self.config.steps, loss, self.samples_per_s, eta)
        if self.report:
            self.report({"step": step, "loss": loss, "samples_per_s": self.samples_per_s, "samples_seen": samples_seen,
                         "lr": self.config.lr, "epoch": (position or {}).get("epoch")})
        self.window_start, self.window_steps = time.perf_counter(), 0


def train(config: TrainingConfig, source: BatchSource | None = None, report: Reporter | None = None,
          trainer: AdapterTrainer | None = None) -> TrainingResult:
    """Train (or finish training) the adapters of ``config``; resumes from the last checkpoint under ``config.out``.

    ``source`` defaults to the local Parquet stream of ``config.data``; ``report`` receives the metrics logged
    every ``log_every`` steps (Ray Train passes ``ray.train.report``).
    """
    started = time.perf_counter()
    trainer = trainer or AdapterTrainer(config)
    world = trainer.world
    start_step, position, samples_seen = 0, None, 0
    checkpoint = trainer.find_checkpoint()
    if checkpoint:
        state = trainer.load_checkpoint(checkpoint)
        start_step, position, samples_seen = state["step"], state["data_position"], state.get("samples_seen", 0)
    per_step = config.batch_size * config.grad_accum * world.size
    progress = _Progress(config, world, trainer.device, report, per_step)
    step, last_loss = start_step, None
    if start_step < config.steps:
        source = source or ParquetTripletSource(config.data, config.batch_size, trainer.resolution, config.seed,
                                                config.augment, config.caption_dropout, config.data_workers, world)
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
                if world.is_main and (step % config.checkpoint_every == 0 or step == config.steps):
                    trainer.save_checkpoint(step, position, samples_seen)
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
