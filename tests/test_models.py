"""Base models: the tiny offline model, loading from a folder or s3://, the fingerprint."""

import torch

from dreamcache import storage
from dreamcache.models import load_base_model, model_fingerprint, offline_clip_tokenizer, tiny_components, write_tiny_model
from dreamcache.pipeline import DreamCachePipeline


def test_offline_tokenizer_round_trips(tmp_path):
    tok = offline_clip_tokenizer()
    ids = tok("a photo of the dog", padding="max_length", max_length=77).input_ids
    assert len(ids) == 77 and ids[0] == tok.bos_token_id
    tok.save_pretrained(tmp_path)
    assert type(tok).from_pretrained(tmp_path)("a photo of the dog", padding="max_length", max_length=77).input_ids == ids


def test_tiny_model_is_reproducible_and_does_not_touch_the_global_rng():
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    a = tiny_components(seed=0)
    assert torch.equal(torch.rand(1), expected_next)
    b = tiny_components(seed=0)
    assert model_fingerprint(a["unet"], a["vae"], a["text_encoder"]) == model_fingerprint(b["unet"], b["vae"], b["text_encoder"])
    c = tiny_components(seed=1)
    assert model_fingerprint(a["unet"]) != model_fingerprint(c["unet"])


def test_fingerprint_ignores_precision_and_adapters(tiny_model_dir):
    fp32 = load_base_model(str(tiny_model_dir))
    fp16 = load_base_model(str(tiny_model_dir), torch_dtype=torch.float16)
    assert fp32.fingerprint == fp16.fingerprint
    pipe = DreamCachePipeline(fp32.vae, fp32.text_encoder, fp32.tokenizer, fp32.unet, fp32.scheduler)
    assert pipe.base_model == fp32.fingerprint  # taken before the adapters were installed


def test_load_from_s3_downloads_once(tmp_path, s3_prefix, tiny_model_dir):
    uri = storage.join_uri(s3_prefix, "model")
    storage.upload_dir(tiny_model_dir, uri)
    pipe = DreamCachePipeline.from_pretrained(uri, adapter=storage.join_uri(uri, "adapter.safetensors"))
    local = storage.local_cache_dir_for(uri)
    weights = next(local.rglob("*.safetensors"))
    mtime = weights.stat().st_mtime_ns
    again = DreamCachePipeline.from_pretrained(uri)
    assert weights.stat().st_mtime_ns == mtime  # reused, not downloaded again
    assert pipe.base_model == again.base_model == load_base_model(str(tiny_model_dir)).fingerprint


def test_write_tiny_model_is_a_stock_diffusers_folder(tmp_path):
    from diffusers import StableDiffusionPipeline

    out = write_tiny_model(tmp_path / "m")
    sd = StableDiffusionPipeline.from_pretrained(out, safety_checker=None)
    assert sd.unet.config.cross_attention_dim == 32 and (out / "adapter.safetensors").is_file()
