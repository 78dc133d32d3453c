"""The toy world's model: a tiny text-to-image SD trained from scratch on the world, then DreamCache adapters.

``build(out_dir, seed)`` (the ``dreamcache toy-world build DIR`` command) runs the whole recipe on a CPU:

1. data: ``BuildSettings.triplets`` world triplets (caption, target, mask) as Parquet (``toy_world.write_triplets``);
2. VAE: a small ``AutoencoderKL`` (32 px -> 4 x 8 x 8 latents), reconstruction MSE with a tiny KL term; its
   ``scaling_factor`` is then set to 1 / the latents' std, as SD's 0.18215 was chosen;
3. base model: a ``UNet2DConditionModel`` with cross-attention in every stage (so DreamCache's layer rule finds a
   mid-block and two decoder transformers, ``dreamcache.layers``) and a 2-layer CLIP text encoder over a word-level
   vocabulary, trained jointly with the plain eps-MSE on (caption, target) pairs, captions dropped with p 0.1 so
   classifier-free guidance works;
4. adapters: the project's own training loop (``dreamcache.training.train``, in-process) on the same triplets,
   caches built on the fly by the frozen UNet, as in the paper;
5. evaluation (:func:`evaluate`): every subject x every prompt, scored by ``toy_world.score``, with trained
   adapters, without a cache, and with untrained (freshly initialised) adapters, in both guidance modes.

Everything is seeded; with the same thread count a rebuild gives the same weights.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, UNet2DConditionModel
from PIL import Image, ImageDraw
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from . import storage, toy_world
from .images import to_tensor
from .models import _byte_symbols, ddim_scheduler

logger = logging.getLogger(__name__)

ASSET_DIR = Path(__file__).parent / "assets" / "toy_world"
MODEL_DIR = ASSET_DIR / "model"  # the committed, trained base model (diffusers folder)
ADAPTER_PATH = MODEL_DIR / "adapter.safetensors"  # its trained DreamCache adapters
ADAPTER_FILE = "adapter.safetensors"
TEXT_LENGTH = 16  # tokens: the longest prompt has 9 words

# Sampling defaults of the toy model (the evaluation and the demo): fewer steps than SD's 50 suffice at 8 x 8.
# The text scale is lower than SD's 7.5: on the committed adapters, joint guidance at 3.0 scored identity 0.500,
# colour 0.824, context 1.000 against 0.454, 0.731, 0.981 at 7.5 (docs/toy_world.md, sweep of 2026-12-06).
STEPS = 15
GUIDANCE_SCALE = 3.0
IMAGE_GUIDANCE_SCALE = 0.4


# -- tokenizer ---------------------------------------------------------------------------------------------------
def learn_word_merges(words: Sequence[str]) -> list[tuple[str, str]]:
    """Byte-pair merges that turn every word of ``words`` into one token (BPE training until none is left split).

    CLIP's BPE applies merges in rank order, which replays this training exactly, so each world word is one
    token and any other text still tokenizes (into bytes)."""
    pieces = {w: [*w[:-1], w[-1] + "</w>"] for w in sorted(set(words))}
    merges: list[tuple[str, str]] = []
    while any(len(p) > 1 for p in pieces.values()):
        counts = Counter(pair for p in pieces.values() for pair in zip(p, p[1:]))
        best = max(sorted(counts), key=lambda pair: counts[pair])  # sorted first: ties break the same way always
        merges.append(best)
        for word, p in pieces.items():
            merged, i = [], 0
            while i < len(p):
                if i + 1 < len(p) and (p[i], p[i + 1]) == best:
                    merged.append(p[i] + p[i + 1])
                    i += 2
                else:
                    merged.append(p[i])
                    i += 1
            pieces[word] = merged
    return merges


def word_tokenizer(words: Sequence[str] = toy_world.VOCABULARY, max_length: int = TEXT_LENGTH) -> CLIPTokenizer:
    """A CLIP tokenizer built offline whose vocabulary holds every world word as one token."""
    symbols = _byte_symbols()
    vocab = {s: i for i, s in enumerate(symbols)}
    vocab.update({s + "</w>": i + len(symbols) for i, s in enumerate(symbols)})
    merges = learn_word_merges(words)
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)
    for word in words:
        ids = tokenizer(word, add_special_tokens=False).input_ids
        if len(ids) != 1:
            raise RuntimeError(f"the toy tokenizer splits {word!r} into {len(ids)} tokens")
    return tokenizer


# -- architecture ----------------------------------------------------------------------------------------------------
@dataclass
class ArchitectureSettings:
    unet_channels: tuple[int, ...] = (32, 64)
    text_width: int = 64
    text_layers: int = 2
    vae_channels: tuple[int, ...] = (16, 32, 32)  # three stages: downsample by 4
    latent_channels: int = 4

    @property
    def latent_size(self) -> int:
        """Latent side: each VAE stage after the first halves the image."""
        return toy_world.SIZE // 2 ** (len(self.vae_channels) - 1)


def components(arch: ArchitectureSettings, seed: int) -> dict:
    """Freshly initialised toy components (seeded), in the layout ``StableDiffusionPipeline`` saves and loads."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tokenizer = word_tokenizer()
        stages = len(arch.unet_channels)
        unet = UNet2DConditionModel(
            sample_size=arch.latent_size, in_channels=arch.latent_channels, out_channels=arch.latent_channels,
            block_out_channels=arch.unet_channels, layers_per_block=1,
            # Cross-attention in every stage: DreamCache's rule then caches the mid block and every other decoder
            # transformer (here mid_block.attentions.0, up_blocks.0.attentions.1, up_blocks.1.attentions.1).
            down_block_types=("CrossAttnDownBlock2D",) * stages, up_block_types=("CrossAttnUpBlock2D",) * stages,
            cross_attention_dim=arch.text_width, attention_head_dim=4, norm_num_groups=8,
        )
        vae = AutoencoderKL(
            block_out_channels=arch.vae_channels, down_block_types=("DownEncoderBlock2D",) * len(arch.vae_channels),
            up_block_types=("UpDecoderBlock2D",) * len(arch.vae_channels), latent_channels=arch.latent_channels,
            norm_num_groups=8, layers_per_block=1, sample_size=toy_world.SIZE,
        )
        text_encoder = CLIPTextModel(CLIPTextConfig(
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id, hidden_size=arch.text_width, intermediate_size=2 * arch.text_width,
            num_attention_heads=4, num_hidden_layers=arch.text_layers, vocab_size=len(tokenizer),
            max_position_embeddings=TEXT_LENGTH, projection_dim=arch.text_width,
        ))
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer, "scheduler": ddim_scheduler()}


# -- settings ---------------------------------------------------------------------------------------------------------
@dataclass
class BuildSettings:
    """The recipe. Defaults: the committed model (about 10-15 minutes on 2 CPU cores)."""

    seed: int = 0
    triplets: int = 3000
    # The VAE must keep colour: at 300 steps x 16 it turned purple toys pink (MSE 0.062), and no adapter can
    # bring back what the latents lost. 1500 x 32 reconstructs every toy's identity (MSE 0.004).
    vae_steps: int = 1500
    vae_batch: int = 32
    vae_lr: float = 4e-3
    vae_white_views: int = 1500  # references on white, next to the scenes: the VAE must encode both
    base_steps: int = 1000  # on the VAE above: every scene right without a cache (800 x 16 at 1e-3: 0.64)
    base_batch: int = 32
    base_lr: float = 2e-3
    caption_dropout: float = 0.1  # base model: empty caption w.p. 0.1 trains the unconditional branch of CFG
    # On the base above, uniform timesteps: joint identity 0.37 at 600 steps (0.30 after 1400). Identity is carried
    # in the noisy half of the schedule (trained on t < 500 only: 0.15, colour lost); on t >= 500 only: 0.40 at
    # 600 steps, 0.45 at 1200 (docs/toy_world.md, 2026-12-03).
    adapter_steps: int = 1200
    adapter_timesteps: tuple[int, int] | None = (500, 1000)
    adapter_batch: int = 16
    adapter_lr: float = 3e-3
    adapter_init: str = "identity"  # deviation A7: starts exactly at the base model, so context is kept from step 0
    eval_seeds: int = 1  # images per (subject, prompt)
    eval_steps: int = STEPS
    threads: int = 1  # on a shared 2-core machine one thread ran faster than two (no spinning workers)
    arch: ArchitectureSettings = field(default_factory=ArchitectureSettings)

    @classmethod
    def quick(cls, seed: int = 0) -> BuildSettings:
        """A few steps of each stage: checks the recipe still trains (tests), not a usable model."""
        return cls(seed=seed, triplets=64, vae_steps=40, vae_batch=8, base_steps=40, base_batch=8,
                   vae_white_views=32, adapter_steps=4, adapter_batch=4, eval_seeds=0)


def _warmup_cosine(step: int, total: int, warmup: int) -> float:
    """LR factor: linear warm-up, then cosine down to 10 %: short runs converge better than at a flat rate."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def _generator(seed: int, stage: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1000 + stage)


# -- stage 2: the VAE -------------------------------------------------------------------------------------------------
def train_vae(vae: AutoencoderKL, images: torch.Tensor, settings: BuildSettings,
              log: Callable[[int, float], None]) -> None:
    """Reconstruction MSE from posterior samples (so the decoder tolerates the training loop's sampled latents)
    plus a 1e-6 KL term that keeps the posterior a distribution."""
    vae.train().requires_grad_(True)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=settings.vae_lr, weight_decay=0.0)
    gen = _generator(settings.seed, 2)
    for step in range(settings.vae_steps):
        for group in optimizer.param_groups:
            group["lr"] = settings.vae_lr * _warmup_cosine(step, settings.vae_steps, 20)
        batch = images[torch.randint(0, len(images), (settings.vae_batch,), generator=gen)]
        posterior = vae.encode(batch).latent_dist
        latents = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen)
        recon = vae.decode(latents).sample
        loss = F.mse_loss(recon, batch) + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        log(step + 1, float(loss.detach()))
    vae.eval().requires_grad_(False)


@torch.no_grad()
def calibrate_vae(vae: AutoencoderKL, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Set ``scaling_factor`` so latents have unit spread; returns the posterior (mean, std) of ``images``."""
    means, stds = [], []
    for chunk in images.split(256):
        posterior = vae.encode(chunk).latent_dist
        means.append(posterior.mean)
        stds.append(posterior.std)
    mean, std = torch.cat(means), torch.cat(stds)
    vae.register_to_config(scaling_factor=float(1.0 / mean.std()))
    return mean, std


# -- stage 3: the base text-to-image model ---------------------------------------------------------------------------
def train_base(parts: dict, latent_mean: torch.Tensor, latent_std: torch.Tensor, captions: Sequence[str],
               settings: BuildSettings, log: Callable[[int, float], None]) -> None:
    """UNet and text encoder from scratch: eps-MSE at t ~ U{0..999} on (caption, target latent) pairs."""
    unet, text_encoder, tokenizer, scheduler = parts["unet"], parts["text_encoder"], parts["tokenizer"], parts["scheduler"]
    scale = parts["vae"].config.scaling_factor
    unique = sorted(set(captions) | {""})
    ids = tokenizer(unique, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    caption_index = torch.tensor([unique.index(c) for c in captions])
    empty = unique.index("")
    modules = torch.nn.ModuleList([unet, text_encoder]).train().requires_grad_(True)
    optimizer = torch.optim.AdamW(modules.parameters(), lr=settings.base_lr, weight_decay=0.01)
    gen = _generator(settings.seed, 3)
    steps = scheduler.config.num_train_timesteps
    for step in range(settings.base_steps):
        for group in optimizer.param_groups:
            group["lr"] = settings.base_lr * _warmup_cosine(step, settings.base_steps, 50)
        rows = torch.randint(0, len(captions), (settings.base_batch,), generator=gen)
        latents = (latent_mean[rows] + latent_std[rows] * torch.randn(latent_mean[rows].shape, generator=gen)) * scale
        which = caption_index[rows].clone()
        which[torch.rand(len(rows), generator=gen) < settings.caption_dropout] = empty
        timesteps = torch.randint(0, steps, (len(rows),), generator=gen)
        noise = torch.randn(latents.shape, generator=gen)
        text = text_encoder(ids[which])[0]
        prediction = unet(scheduler.add_noise(latents, noise, timesteps), timesteps, encoder_hidden_states=text).sample
        loss = F.mse_loss(prediction, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        log(step + 1, float(loss.detach()))
    modules.eval().requires_grad_(False)


def save_base_model(parts: dict, out: Path) -> Path:
    """A diffusers Stable Diffusion folder (fp32: the whole model is ~6 MB; fp16 would need casts on CPU)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(out, safe_serialization=True)
    return out


# -- stage 4: the adapters -------------------------------------------------------------------------------------------
def train_adapters(model_dir: Path, data: Path, run_dir: Path, settings: BuildSettings,
                   log: Callable[[int, float], None]):
    """The project's training loop (``dreamcache.training.train``) in-process on the world's triplets."""
    from .training import TrainingConfig, train

    config = TrainingConfig(
        model=str(model_dir), data=str(data), out=str(run_dir), steps=settings.adapter_steps,
        batch_size=settings.adapter_batch, lr=settings.adapter_lr, resolution=toy_world.SIZE, seed=settings.seed,
        checkpoint_every=max(1, settings.adapter_steps), keep_checkpoints=1, log_every=1, data_workers=1,
        adapter_init=settings.adapter_init, device="cpu", resume="never", timestep_range=settings.adapter_timesteps,
    )
    return train(config, report=lambda metrics: log(int(metrics["step"]), float(metrics["loss"])))


# -- stage 5: evaluation ---------------------------------------------------------------------------------------------
@dataclass
class EvalRow:
    adapters: str  # trained | none (no cache) | untrained
    guidance: str  # compositional | joint | cfg (no cache: both modes are plain CFG)
    identity: float
    colour: float
    context: float
    position: float
    images: int


def generate(pipe, subject_ids: Sequence[str], prompts: Sequence[str], caches: dict | None, guidance: str,
             seeds: int = 1, steps: int = STEPS, guidance_scale: float = GUIDANCE_SCALE,
             image_guidance_scale: float = IMAGE_GUIDANCE_SCALE, batch: int = 64) -> tuple[list[Image.Image], list, list]:
    """Every subject x prompt x seed; ``caches`` None renders without personalization (plain CFG)."""
    jobs = [(s, p, k) for s in subject_ids for p in prompts for k in range(seeds)]
    images = []
    for start in range(0, len(jobs), batch):
        chunk = jobs[start : start + batch]
        generators = [torch.Generator().manual_seed(1000 * k + i) for i, (_, _, k) in enumerate(chunk, start)]
        result = pipe([p for _, p, _ in chunk], [caches[s] if caches else None for s, _, _ in chunk],
                      num_inference_steps=steps, guidance_scale=guidance_scale,
                      image_guidance_scale=image_guidance_scale, guidance=guidance, generator=generators)
        images += result.images
    return images, [s for s, _, _ in jobs], [p for _, p, _ in jobs]


def evaluate(model_dir: str | Path, adapter: str | Path, seeds: int = 1, steps: int = STEPS,
             guidance_scale: float = GUIDANCE_SCALE, image_guidance_scale: float = IMAGE_GUIDANCE_SCALE,
             prompts: Sequence[str] = toy_world.PROMPTS, subject_ids: Sequence[str] = toy_world.SUBJECT_IDS,
             sheet: str | Path | None = None, seed: int = 0) -> list[EvalRow]:
    """Accuracies of trained adapters, no cache, and untrained adapters (fresh official init), both guidance modes."""
    from .pipeline import DreamCachePipeline

    rows: list[EvalRow] = []
    sheets: dict[str, list[Image.Image]] = {}
    references = [toy_world.reference_image(toy_world.subject(s)) for s in subject_ids]
    for name in ("trained", "none", "untrained"):
        with torch.random.fork_rng(devices=[]):  # the untrained adapters' init depends on the seed only
            torch.manual_seed(seed)
            # False, not None: None finds the trained adapter.safetensors beside the model (from_pretrained's rule)
            pipe = DreamCachePipeline.from_pretrained(str(model_dir), adapter=str(adapter) if name == "trained" else False)
        pipe.set_progress_bar_config(disable=True)
        caches = None
        if name != "none":
            caches = dict(zip(subject_ids, pipe.build_caches(references, seed=seed)))
        for guidance in ("compositional", "joint") if name != "none" else ("compositional",):
            images, ids, asked = generate(pipe, subject_ids, prompts, caches, guidance, seeds, steps,
                                          guidance_scale, image_guidance_scale)
            scores = toy_world.score(images, ids, asked)
            rows.append(EvalRow(name, guidance if name != "none" else "cfg", scores.identity_accuracy,
                                scores.colour_accuracy, scores.context_accuracy, scores.position_accuracy, len(images)))
            sheets[f"{name}-{rows[-1].guidance}"] = images
            logger.info("%s", rows[-1])
    if sheet is not None:
        contact_sheet(references, sheets, len(prompts) * seeds).save(sheet)
    return rows


def contact_sheet(references: Sequence[Image.Image], sheets: dict[str, list[Image.Image]], per_subject: int,
                  zoom: int = 2) -> Image.Image:
    """One block per condition: a row per subject, its reference first, then its generations."""
    size = toy_world.SIZE
    blocks = list(sheets.items())
    label = 12
    width = (per_subject + 1) * size
    height = len(blocks) * (label + len(references) * size)
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    y = 0
    for name, images in blocks:
        draw.text((2, y), name, fill=(0, 0, 0))
        y += label
        for i, ref in enumerate(references):
            canvas.paste(ref, (0, y))
            for j in range(per_subject):
                canvas.paste(images[i * per_subject + j], ((j + 1) * size, y))
            y += size
    return canvas.resize((width * zoom, height * zoom), Image.Resampling.NEAREST)


def results_table(rows: Sequence[EvalRow]) -> str:
    lines = ["| adapters | guidance | identity acc | colour acc | context acc | position acc | images |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r.adapters} | {r.guidance} | {r.identity:.3f} | {r.colour:.3f} | {r.context:.3f} | {r.position:.3f} "
              f"| {r.images} |" for r in rows]
    return "\n".join(lines)


# -- loss curves --------------------------------------------------------------------------------------------------
def plot_losses(curves: dict[str, list[tuple[int, float]]], path: str | Path, smooth: int = 20) -> None:
    """One panel per stage, log-scale loss against step (a moving average of ``smooth`` steps), drawn with PIL."""
    panel_w, panel_h, pad = 320, 200, 30
    canvas = Image.new("RGB", (panel_w * len(curves), panel_h + 2 * pad), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for k, (name, points) in enumerate(curves.items()):
        x0 = k * panel_w + pad
        w, h = panel_w - 2 * pad, panel_h
        draw.rectangle((x0, pad, x0 + w, pad + h), outline=(0, 0, 0))
        if not points:
            continue
        steps = np.array([p[0] for p in points], dtype=float)
        losses = np.log10(np.maximum(np.array([p[1] for p in points]), 1e-8))
        window = max(1, min(smooth, len(losses) // 5 or 1))
        smoothed = np.convolve(losses, np.ones(window) / window, mode="valid")
        steps = steps[window - 1 :]
        lo, hi = float(smoothed.min()), float(smoothed.max()) + 1e-9
        xs = x0 + (steps - steps.min()) / max(1.0, steps.max() - steps.min()) * w
        ys = pad + h - (smoothed - lo) / (hi - lo) * h
        draw.line(list(zip(xs.tolist(), ys.tolist())), fill=(200, 40, 40), width=2)
        draw.text((x0, 5), f"{name}: loss {10 ** smoothed[0]:.3f} -> {10 ** smoothed[-1]:.3f}", fill=(0, 0, 0))
        draw.text((x0, pad + h + 5), f"step {int(steps.min())}..{int(steps.max())}, log scale", fill=(0, 0, 0))
    canvas.save(path)


# -- the recipe ----------------------------------------------------------------------------------------------------
@dataclass
class BuildResult:
    model_dir: Path
    adapter: Path
    losses: dict[str, list[tuple[int, float]]]
    seconds: dict[str, float]
    evaluation: list[EvalRow]

    def summary(self) -> dict:
        first_last = {k: (v[0][1], v[-1][1]) if v else None for k, v in self.losses.items()}
        return {"model": str(self.model_dir), "adapter": str(self.adapter), "seconds": self.seconds,
                "first_last_loss": first_last, "evaluation": [asdict(r) for r in self.evaluation]}


def build(out_dir: str | Path, seed: int = 0, settings: BuildSettings | None = None,
          export: str | Path | None = None) -> BuildResult:
    """Build the world's data, train VAE, base model and adapters, evaluate; everything under ``out_dir``.

    Layout: ``data/train.parquet``, ``model/`` (diffusers folder with ``adapter.safetensors``), ``adapter-run/``
    (the training job's output), ``losses.json``, ``loss_curves.png``, ``evaluation.md``, ``samples.png``,
    ``build.json``. ``export`` copies ``model/`` there (the committed asset folder)."""
    settings = settings or BuildSettings(seed=seed)
    settings.seed = seed
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(settings.threads)  # process-wide in torch: restored after the build
    try:
        return _build(out_dir, settings, export)
    finally:
        torch.set_num_threads(previous_threads)


def _build(out_dir: str | Path, settings: BuildSettings, export: str | Path | None) -> BuildResult:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    losses: dict[str, list[tuple[int, float]]] = {"vae": [], "base": [], "adapters": []}

    def logger_for(stage: str, every: int = 50) -> Callable[[int, float], None]:
        def log(step: int, loss: float) -> None:
            losses[stage].append((step, loss))
            if step % every == 0:
                logger.info("%s step %d loss %.4f", stage, step, loss)
        return log

    started = time.perf_counter()
    rows = toy_world.triplet_rows(settings.triplets, settings.seed)
    (out / "data").mkdir(exist_ok=True)
    from .triplets import write_triplets

    write_triplets(rows, str(out / "data" / "train.parquet"))
    targets = to_tensor([r["target"] for r in rows])
    captions = [r["caption"] for r in rows]
    seconds["data"] = time.perf_counter() - started

    parts = components(settings.arch, settings.seed)
    mark = time.perf_counter()
    views = to_tensor(toy_world.white_background_views(settings.vae_white_views, settings.seed))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        train_vae(parts["vae"], torch.cat([targets, views]), settings, logger_for("vae"))
    mean, std = calibrate_vae(parts["vae"], targets)
    seconds["vae"] = time.perf_counter() - mark

    mark = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        train_base(parts, mean, std, captions, settings, logger_for("base"))
    model_dir = save_base_model(parts, out / "model")
    seconds["base"] = time.perf_counter() - mark

    mark = time.perf_counter()
    run = train_adapters(model_dir, out / "data" / "train.parquet", out / "adapter-run", settings,
                         logger_for("adapters", 20))
    adapter = model_dir / ADAPTER_FILE
    adapter.write_bytes(storage.read_bytes(run.adapter_uri))
    seconds["adapters"] = time.perf_counter() - mark

    evaluation: list[EvalRow] = []
    if settings.eval_seeds > 0:
        mark = time.perf_counter()
        evaluation = evaluate(model_dir, adapter, seeds=settings.eval_seeds, steps=settings.eval_steps,
                              sheet=out / "samples.png", seed=settings.seed)
        seconds["evaluation"] = time.perf_counter() - mark
        (out / "evaluation.md").write_text(results_table(evaluation) + "\n")
    seconds["total"] = time.perf_counter() - started
    (out / "losses.json").write_text(json.dumps(losses))
    plot_losses(losses, out / "loss_curves.png")
    result = BuildResult(model_dir, adapter, losses, seconds, evaluation)
    (out / "build.json").write_text(json.dumps({**result.summary(), "settings": asdict(settings)}, indent=2, default=str))
    if export is not None:
        target = Path(export) / "model"
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(model_dir, target)
        for name in ("evaluation.md", "build.json"):
            if (out / name).exists():
                shutil.copyfile(out / name, Path(export) / name)
    return result
