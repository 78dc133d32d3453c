"""Share the UNet's down path between guidance branches that only differ after it.

Compositional guidance evaluates three branches per step: (negative text, no cache), (negative text, cache) and
(text, cache). The first two see the same latent, timestep and text, and the first adapter sits in the mid
block, so everything before the mid block (the whole encoder path) is identical for them. Running the UNet on
two branches and widening the batch to three at the mid block computes the same result with about a third less
encoder work. The widening is done by forward pre-hooks on the stock mid and up blocks: every tensor argument
whose batch is the narrow one is gathered with ``index`` (hidden states, time embedding, text context and the
encoder's skip connections); tensors already widened pass through.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from diffusers import UNet2DConditionModel


def _widen(value, index: torch.Tensor, narrow: int):
    if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == narrow:
        return value.index_select(0, index)
    if isinstance(value, tuple):
        return tuple(_widen(v, index, narrow) for v in value)
    return value


@contextlib.contextmanager
def widen_batch_after_encoder(unet: UNet2DConditionModel, index: torch.Tensor) -> Iterator[None]:
    """Inside the block, a UNet call with batch ``n`` returns batch ``len(index)``: row i of the decoder is
    row ``index[i]`` of the encoder. ``len(index)`` must differ from ``n``."""
    narrow = int(index.max()) + 1
    if len(index) == narrow:
        raise ValueError("the widened batch must be larger than the narrow one")

    def hook(module, args, kwargs):
        return _widen(args, index, narrow), {k: _widen(v, index, narrow) for k, v in kwargs.items()}

    if unet.mid_block is None:
        raise ValueError("this UNet has no mid block to widen the batch at")
    handles = [unet.mid_block.register_forward_pre_hook(hook, with_kwargs=True)]
    handles += [block.register_forward_pre_hook(hook, with_kwargs=True) for block in unet.up_blocks]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
