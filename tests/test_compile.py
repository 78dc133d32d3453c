"""A torch.compile'd UNet with DreamCache adapters (issues 13 and 15): the adapter scale is a runtime input, and
changing the subject, the scale or the prompt recompiles nothing.

Backend "aot_eager" (default mode): it runs dynamo's capture and AOTAutograd exactly as inductor does, so the
guards and the graph inputs (buffers lifted as inputs, hence the scale) are the ones inductor would see; inductor
only adds code generation, whose C++ compile of this UNet alone takes minutes on the 2 shared CPU cores of CI,
while the whole test here runs in about 45 s.
"""

import copy

import torch
import torch._dynamo
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters

from dreamcache.adapters import DreamCacheAdapters
from dreamcache.models import tiny_components


def random_cache(adapters, seed):
    gen = torch.Generator().manual_seed(seed)
    return {l.name: torch.randn(1, l.channels, *l.spatial(16, 16), generator=gen) for l in adapters.layers}


@torch.no_grad()
def test_compiled_unet_follows_scale_subject_and_prompt_without_recompiling():
    torch._dynamo.reset()
    counters.clear()
    stock = tiny_components(seed=3)["unet"].eval()
    unet = copy.deepcopy(stock)
    adapters = DreamCacheAdapters(unet)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 16, 16, generator=gen)
    prompt_a, prompt_b = torch.randn(3, 77, 32, generator=gen), torch.randn(3, 77, 32, generator=gen)
    subject_a, subject_b = random_cache(adapters, 1), random_cache(adapters, 2)
    # The row layout of compositional guidance: one bypassed (no-reference) row, two attending rows.
    rows = [None, 0, 0]
    t = torch.tensor(500)

    def both(cache, text):
        with adapters.reference([cache], rows):
            return compiled(x, t, encoder_hidden_states=text).sample, unet(x, t, encoder_hidden_states=text).sample

    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(unet, backend=counter)
    first, eager = both(subject_a, prompt_a)
    torch.testing.assert_close(first, eager, rtol=1e-5, atol=1e-6)
    assert counter.frame_count == 1 and not counters["graph_break"]  # one graph for the whole UNet

    with torch._dynamo.config.patch(error_on_recompile=True):  # any recompile below raises
        adapters.set_scale(0.5)
        half, eager = both(subject_a, prompt_a)
        torch.testing.assert_close(half, eager, rtol=1e-5, atol=1e-6)
        assert (half[1:] - first[1:]).abs().max() > 1e-3  # the compiled graph read the new scale
        assert torch.equal(half[0], first[0])  # the bypassed row does not depend on it

        adapters.set_scale({adapters.layers[0].name: 1.0, adapters.layers[-1].name: 0.25})
        other, eager = both(subject_b, prompt_b)  # another subject, per-layer scales, another prompt
        torch.testing.assert_close(other, eager, rtol=1e-5, atol=1e-6)

        adapters.set_scale(0.0)  # the bypass: exactly the stock UNet on every row
        off, _ = both(subject_b, prompt_b)
        torch.testing.assert_close(off, stock(x, t, encoder_hidden_states=prompt_b).sample, rtol=1e-5, atol=1e-6)

    assert counter.frame_count == 1
    assert counters["stats"]["unique_graphs"] == 1
