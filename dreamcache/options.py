"""The options of the method's two calls, caching and generation, declared once for every command and job that
exposes them (``dreamcache cache``/``generate``, the caching, generation and evaluation jobs): each helper is
a config field that is also its command-line option (``dreamcache.cli_args``). Light: no torch."""

from __future__ import annotations

from typing import Any, Literal

from .cli_args import option

# The guidance modes of DreamCachePipeline.__call__ (spec 4.2).
Guidance = Literal["compositional", "joint"]


# -- generation ------------------------------------------------------------------------------------------------
def steps_field() -> Any:
    return option(50, "denoising steps")


def guidance_field() -> Any:
    # One vocabulary across commands: --guidance is the mode, --guidance-scale the text scale.
    return option("compositional", "guidance mode (--guidance-mode: its older name)", aliases=("--guidance-mode",))


def guidance_scale_field() -> Any:
    return option(7.5, "text guidance scale s_T")


def image_guidance_scale_field() -> Any:
    return option(0.4, "image guidance scale s_I: 0.4 reproduces the DreamBench setting; 3-5 preserves identity "
                       "more strongly")


def side_field(side: Literal["height", "width"]) -> Any:
    return option(None, f"image {side} (default: the model's resolution)")


# -- caching ---------------------------------------------------------------------------------------------------
def resolution_field() -> Any:
    return option(None, "reference size in pixels (default: the model's)")


def preprocess_field() -> Any:
    return option("resize", "resize: the official plain resize; pad: keep the aspect ratio on white")


def cache_prompt_field() -> Any:
    return option("", 'text context of the caching pass ("" as the paper; the official sampler used its '
                      "negative prompt)")
