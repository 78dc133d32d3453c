"""DreamBench metrics (spec section 5.1): DINO, CLIP-I and CLIP-T.

* DINO: ViT-S/16 (``facebook/dino-vits16`` as a transformers ``ViTModel``), the final-norm CLS token as the global
  embedding; preprocessing Resize 256 (bicubic, shorter side) -> CenterCrop 224 -> ImageNet normalisation.
* CLIP-I: OpenAI CLIP ViT-B/32 (``openai/clip-vit-base-patch32`` as a transformers ``CLIPModel``), projected
  image embeddings; preprocessing Resize 224 (bicubic) -> CenterCrop 224 -> CLIP normalisation.
* CLIP-T: the same CLIP, projected text embedding of the eval caption against each generated image.

DINO and CLIP-I of a generated image are its mean cosine similarity to every source image of the subject (the
official ``(src @ gen.T).mean()``, averaged per image); CLIP-T is one cosine per image, unscaled (no x2.5, no
x100). The transforms reproduce torchvision's ``Resize(int)``/``CenterCrop`` on PIL images with PIL and numpy
(same size rounding, same crop offsets, PIL's antialiased bicubic), so no torchvision is needed.

Backbones load from a local folder or an s3:// prefix (mirrored once by ``storage.ensure_local``); nothing is
downloaded from a hub.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from . import storage

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def resize_shorter_side(image: Image.Image, size: int) -> Image.Image:
    """torchvision ``Resize(size)`` on a PIL image: shorter side to ``size``, longer side ``int(size*long/short)``."""
    width, height = image.size
    short, long = (width, height) if width <= height else (height, width)
    if short == size:
        return image
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if width <= height else (new_long, new_short)
    return image.resize((new_w, new_h), Image.Resampling.BICUBIC)


def center_crop(image: Image.Image, size: int) -> Image.Image:
    """torchvision ``CenterCrop(size)``: offsets ``round((side - size) / 2)``; images smaller than ``size`` are
    zero-padded first, as torchvision does."""
    width, height = image.size
    if width < size or height < size:
        padded = Image.new(image.mode, (max(width, size), max(height, size)), 0)
        padded.paste(image, ((max(width, size) - width) // 2, (max(height, size) - height) // 2))
        image, (width, height) = padded, padded.size
    top = int(round((height - size) / 2.0))
    left = int(round((width - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


@dataclass(frozen=True)
class Preprocess:
    """Resize (shorter side, bicubic) -> CenterCrop -> [0, 1] -> normalise: a batch ``[N, 3, crop, crop]``."""

    resize: int
    crop: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __call__(self, images: Sequence[Image.Image]) -> torch.Tensor:
        arrays = [np.asarray(center_crop(resize_shorter_side(im.convert("RGB"), self.resize), self.crop),
                             dtype=np.float32) / 255.0 for im in images]
        batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
        mean = torch.tensor(self.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.std).view(1, 3, 1, 1)
        return (batch - mean) / std


DINO_PREPROCESS = Preprocess(256, 224, IMAGENET_MEAN, IMAGENET_STD)
CLIP_PREPROCESS = Preprocess(224, 224, CLIP_MEAN, CLIP_STD)


def _local_folder(uri: str) -> str:
    return str(storage.ensure_local(uri))


class DinoEmbedder:
    """DINO ViT-S/16 global embeddings (L2-normalised CLS token after the final norm)."""

    def __init__(self, model, device: str | torch.device = "cpu", batch_size: int = 32) -> None:
        self.model = model.to(device).eval()
        self.device = torch.device(device)
        self.batch_size = batch_size

    @classmethod
    def from_pretrained(cls, uri: str, device: str | torch.device = "cpu", batch_size: int = 32) -> DinoEmbedder:
        from transformers import ViTModel

        model = ViTModel.from_pretrained(_local_folder(uri), add_pooling_layer=False, local_files_only=True)
        return cls(model, device, batch_size)

    @torch.no_grad()
    def embed(self, images: Sequence[Image.Image]) -> torch.Tensor:
        out = []
        for start in range(0, len(images), self.batch_size):
            pixels = DINO_PREPROCESS(images[start : start + self.batch_size]).to(self.device, self.model.dtype)
            cls_token = self.model(pixel_values=pixels).last_hidden_state[:, 0]
            out.append(F.normalize(cls_token.float(), dim=-1).cpu())
        return torch.cat(out) if out else torch.empty(0)


class ClipEmbedder:
    """CLIP projected image and text embeddings (L2-normalised), as OpenAI CLIP's encode_image/encode_text."""

    def __init__(self, model, tokenizer, device: str | torch.device = "cpu", batch_size: int = 32) -> None:
        self.model = model.to(device).eval()
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.batch_size = batch_size

    @classmethod
    def from_pretrained(cls, uri: str, device: str | torch.device = "cpu", batch_size: int = 32) -> ClipEmbedder:
        from transformers import AutoTokenizer, CLIPModel

        folder = _local_folder(uri)
        model = CLIPModel.from_pretrained(folder, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        return cls(model, tokenizer, device, batch_size)

    @torch.no_grad()
    def embed_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        out = []
        for start in range(0, len(images), self.batch_size):
            pixels = CLIP_PREPROCESS(images[start : start + self.batch_size]).to(self.device, self.model.dtype)
            pooled = self.model.vision_model(pixel_values=pixels).pooler_output
            out.append(F.normalize(self.model.visual_projection(pooled).float(), dim=-1).cpu())
        return torch.cat(out) if out else torch.empty(0)

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        # OpenAI CLIP's tokenize(truncate=True): 77 tokens, the end token kept by truncation.
        tokens = self.tokenizer(list(texts), padding="max_length", truncation=True,
                                max_length=self.model.config.text_config.max_position_embeddings, return_tensors="pt")
        pooled = self.model.text_model(input_ids=tokens.input_ids.to(self.device),
                                       attention_mask=tokens.attention_mask.to(self.device)).pooler_output
        return F.normalize(self.model.text_projection(pooled).float(), dim=-1).cpu()


def mean_cosine_to_sources(generated: torch.Tensor, sources: torch.Tensor) -> torch.Tensor:
    """Per generated embedding, the mean cosine to all source embeddings (inputs L2-normalised): ``[N_gen]``."""
    if sources.numel() == 0:
        raise ValueError("no source embeddings to compare against")
    return (generated @ sources.T).mean(dim=1)


@dataclass(frozen=True)
class MetricBackbones:
    """Where the two evaluation backbones live (local folders or s3:// prefixes of transformers checkpoints)."""

    dino: str
    clip: str


class DreamBenchScorer:
    """Scores generated images against a subject's source images and the eval caption."""

    def __init__(self, dino: DinoEmbedder, clip: ClipEmbedder) -> None:
        self.dino = dino
        self.clip = clip

    @classmethod
    def from_pretrained(cls, backbones: MetricBackbones, device: str | torch.device = "cpu",
                        batch_size: int = 32) -> DreamBenchScorer:
        return cls(DinoEmbedder.from_pretrained(backbones.dino, device, batch_size),
                   ClipEmbedder.from_pretrained(backbones.clip, device, batch_size))

    def embed_sources(self, images: Sequence[Image.Image]) -> dict[str, torch.Tensor]:
        return {"dino": self.dino.embed(images), "clip": self.clip.embed_images(images)}

    def score(self, generated: Sequence[Image.Image], captions: Sequence[str],
              source_sets: dict[str, dict[str, torch.Tensor]]) -> dict[str, list[float]]:
        """Per generated image: ``clip_t`` and, for every named source set (e.g. "all", "ref"), ``dino_<set>`` and
        ``clip_i_<set>``. ``source_sets`` maps a name to the output of :meth:`embed_sources`."""
        if len(generated) != len(captions):
            raise ValueError("one caption per generated image is required")
        dino = self.dino.embed(generated)
        clip = self.clip.embed_images(generated)
        text = self.clip.embed_texts(captions)
        scores = {"clip_t": (clip * text).sum(dim=1).tolist()}
        for name, sources in source_sets.items():
            scores[f"dino_{name}"] = mean_cosine_to_sources(dino, sources["dino"]).tolist()
            scores[f"clip_i_{name}"] = mean_cosine_to_sources(clip, sources["clip"]).tolist()
        return scores
