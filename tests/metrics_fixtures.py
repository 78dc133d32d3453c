"""Tiny random DINO (ViT) and CLIP backbones, saved as transformers folders, for the metric and evaluation tests.

Imported by the test modules (tests/ is on sys.path); no fixtures are registered here.
"""

from __future__ import annotations

from pathlib import Path

import torch


def write_tiny_dino(folder: str | Path, seed: int = 0) -> Path:
    from transformers import ViTConfig, ViTModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ViTModel(ViTConfig(image_size=224, patch_size=16, hidden_size=32, num_hidden_layers=2,
                                   num_attention_heads=2, intermediate_size=37), add_pooling_layer=False)
    model.save_pretrained(folder)
    return Path(folder)


def write_tiny_clip(folder: str | Path, seed: int = 0) -> Path:
    from transformers import CLIPConfig, CLIPModel

    from dreamcache.models import offline_clip_tokenizer

    tokenizer = offline_clip_tokenizer()
    text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    vision = dict(image_size=224, patch_size=32, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                  num_attention_heads=2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return Path(folder)
