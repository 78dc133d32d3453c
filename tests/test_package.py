"""The package's public face: lazy (import dreamcache loads no torch), and the runtime's model spec and loader."""

import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def python(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_import_dreamcache_loads_no_torch_and_names_load_on_use():
    out = python(
        "import sys, dreamcache\n"
        "from dreamcache import CacheInfo, ModelSpec, pick_device\n"  # torch-free names stay torch-free
        "print(sorted(m for m in ('torch', 'diffusers', 'transformers', 'ray') if m in sys.modules))\n"
        "from dreamcache import DreamCachePipeline, FeatureCache\n"
        "import dreamcache.pipeline, dreamcache.cache\n"
        "assert DreamCachePipeline is dreamcache.pipeline.DreamCachePipeline\n"
        "assert FeatureCache is dreamcache.cache.FeatureCache and dreamcache.FeatureCache is FeatureCache\n"
        "print('torch' in sys.modules, 'ray' in sys.modules)\n"
    )
    assert out.splitlines() == ["[]", "True False"]


def test_every_public_name_resolves_and_unknown_names_raise():
    import dreamcache

    for name in dreamcache.__all__:
        assert getattr(dreamcache, name) is not None
        assert name in dir(dreamcache)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        dreamcache.nope  # noqa: B018


def test_the_device_and_dtype_pickers():
    from dreamcache import runtime

    assert runtime.pick_dtype("auto", torch.device("cpu")) == torch.float32
    assert runtime.pick_dtype("auto", torch.device("cuda")) == torch.float16
    assert runtime.pick_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    assert runtime.pick_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="dtype must be one of"):
        runtime.pick_dtype("fp8", torch.device("cpu"))


def test_one_spec_one_loader(tiny_model_dir, tiny_pipe):
    from dreamcache.runtime import ModelSpec, load_pipeline

    spec = ModelSpec(model=str(tiny_model_dir), device="cpu", dtype="fp32", torch_threads=1)
    assert pickle.loads(pickle.dumps(spec)) == spec  # travels into Ray tasks and actors
    threads = torch.get_num_threads()
    try:
        pipe = load_pipeline(spec)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    assert pipe.device.type == "cpu" and pipe.unet.dtype == torch.float32 and pipe.base_model == tiny_pipe.base_model
    for key, value in tiny_pipe.adapters.state_dict().items():  # the folder's adapter.safetensors, found by itself
        assert torch.equal(pipe.adapters.state_dict()[key], value)
    half = load_pipeline(ModelSpec(model=str(tiny_model_dir), device="cpu", dtype="fp16", adapter=False))
    assert half.unet.dtype == torch.float16
    key = next(k for k in tiny_pipe.adapters.state_dict() if k.endswith("linear_cat.weight"))
    assert not torch.equal(half.adapters.state_dict()[key].float(), tiny_pipe.adapters.state_dict()[key])
