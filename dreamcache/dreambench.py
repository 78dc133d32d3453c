"""The DreamBench protocol of the paper (spec section 5.1): subjects, class nouns, prompts, reference choice.

30 DreamBooth subjects (21 objects, 9 live) x 25 prompts x 4 images. Generation prompts are the official
DreamCache prompt files (``scripts/prompt_objects_dreambooth.txt`` / ``prompts_living_dreambooth.txt``, with
``class`` replaced by the subject's noun); CLIP-T is scored against the DreamBooth-style eval caption of the same
prompt ("a <noun> in the jungle", without "a photo of"). The two class-noun maps differ in two subjects, as in
the official scripts (generation: ``colorful_sneaker -> sneakers``, ``robot_toy -> toy robot``; evaluation:
``sneaker`` and ``robot toy``). The reference is one image per subject, the Kosmos-G keep-list of
``scripts/remove_dreambench.sh`` (ambiguity A9).

The lists are data, copied from the DreamBooth dataset's ``prompts_and_classes.txt`` and the DreamCache
scripts; ``dreambench_prompts`` turns them into the rows of a run.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from .errors import InvalidValue

SubjectKind = Literal["object", "live"]
# The official sampler's negative prompt (spec 4.1): the evaluation's default; pass it explicitly to
# DreamCachePipeline to reproduce the official scripts.
OFFICIAL_NEGATIVE_PROMPT = "Open mouth, tongue out, teeth visible, bad photo, low quality, blurred, deformed"

# DreamBooth subject -> DreamBooth class (dataset/prompts_and_classes.txt).
DREAMBOOTH_CLASSES: dict[str, str] = {
    "backpack": "backpack", "backpack_dog": "backpack", "bear_plushie": "stuffed animal", "berry_bowl": "bowl",
    "can": "can", "candle": "candle", "cat": "cat", "cat2": "cat", "clock": "clock", "colorful_sneaker": "sneaker",
    "dog": "dog", "dog2": "dog", "dog3": "dog", "dog5": "dog", "dog6": "dog", "dog7": "dog", "dog8": "dog",
    "duck_toy": "toy", "fancy_boot": "boot", "grey_sloth_plushie": "stuffed animal", "monster_toy": "toy",
    "pink_sunglasses": "glasses", "poop_emoji": "toy", "rc_car": "toy", "red_cartoon": "cartoon", "robot_toy": "toy",
    "shiny_sneaker": "sneaker", "teapot": "teapot", "vase": "vase", "wolf_plushie": "stuffed animal",
}
SUBJECTS: tuple[str, ...] = tuple(DREAMBOOTH_CLASSES)
LIVE_SUBJECTS: frozenset[str] = frozenset({"cat", "cat2", "dog", "dog2", "dog3", "dog5", "dog6", "dog7", "dog8"})

# DreamCache's nouns (scripts/memory_text2img_multi_ref.py `class_attributes`), used in generation prompts.
GENERATION_NOUNS: dict[str, str] = {
    "backpack": "backpack", "backpack_dog": "backpack", "bear_plushie": "bear plushie", "berry_bowl": "bowl",
    "can": "can", "candle": "candle", "cat": "cat", "cat2": "cat", "clock": "clock", "colorful_sneaker": "sneakers",
    "dog": "dog", "dog2": "dog", "dog3": "dog", "dog5": "dog", "dog6": "dog", "dog7": "dog", "dog8": "dog",
    "duck_toy": "duck toy", "fancy_boot": "boot", "grey_sloth_plushie": "sloth plushie", "monster_toy": "toy",
    "pink_sunglasses": "sunglasses", "poop_emoji": "emoji toy", "rc_car": "toy car", "red_cartoon": "cartoon",
    "robot_toy": "toy robot", "shiny_sneaker": "sneaker", "teapot": "teapot", "vase": "vase",
    "wolf_plushie": "wolf plushie",
}
# The evaluation script's nouns (scripts/evaluate_objects_dreambooth.py): two differ from the generation map.
EVAL_NOUNS: dict[str, str] = {**GENERATION_NOUNS, "colorful_sneaker": "sneaker", "robot_toy": "robot toy"}

# The single reference per subject (scripts/remove_dreambench.sh `files_to_keep`, the Kosmos-G choice).
REFERENCE_IMAGES: dict[str, str] = {
    "backpack": "02.jpg", "backpack_dog": "02.jpg", "bear_plushie": "03.jpg", "berry_bowl": "02.jpg",
    "can": "01.jpg", "candle": "02.jpg", "cat": "04.jpg", "cat2": "02.jpg", "clock": "03.jpg",
    "colorful_sneaker": "01.jpg", "dog": "02.jpg", "dog2": "02.jpg", "dog3": "05.jpg", "dog5": "00.jpg",
    "dog6": "02.jpg", "dog7": "01.jpg", "dog8": "04.jpg", "duck_toy": "01.jpg", "fancy_boot": "02.jpg",
    "grey_sloth_plushie": "04.jpg", "monster_toy": "04.jpg", "pink_sunglasses": "04.jpg", "poop_emoji": "00.jpg",
    "rc_car": "03.jpg", "red_cartoon": "00.jpg", "robot_toy": "00.jpg", "shiny_sneaker": "01.jpg",
    "teapot": "04.jpg", "vase": "02.jpg", "wolf_plushie": "04.jpg",
}

_SHARED_CONTEXTS = (
    "in the jungle", "in the snow", "on the beach", "on a cobblestone street", "on top of pink fabric",
    "on top of a wooden floor", "with a city in the background", "with a mountain in the background",
    "with a blue house in the background", "on top of a purple rug in a forest",
)
_OBJECT_CONTEXTS = (
    "with a wheat field in the background", "with a tree and autumn leaves in the background",
    "with the Eiffel Tower in the background", "floating on top of water", "floating in an ocean of milk",
    "on top of green grass with sunflowers around it", "on top of a mirror",
    "on top of the sidewalk in a crowded street", "on top of a dirt road", "on top of a white rug",
)
_LIVE_CONTEXTS = (
    "wearing a red hat", "wearing a santa hat", "wearing a rainbow scarf", "wearing a black top hat and a monocle",
    "in a chef outfit", "in a firefighter outfit", "in a police outfit", "wearing pink glasses",
    "wearing a yellow shirt", "in a purple wizard outfit",
)
_PROPERTIES = ("red", "purple", "shiny", "wet", "cube shaped")  # the five recontext-free prompts


def _templates(contexts: Sequence[str]) -> tuple[tuple[str, str], ...]:
    """(generation template, eval-caption template) pairs; ``{}`` is the noun."""
    with_context = [(f"a photo of a {{}}, {c}", f"a {{}} {c}") for c in contexts]
    with_property = [(f"a photo of a {p} {{}}", f"a {p} {{}}") for p in _PROPERTIES]
    return tuple(with_context + with_property)


OBJECT_TEMPLATES = _templates(_SHARED_CONTEXTS + _OBJECT_CONTEXTS)
LIVE_TEMPLATES = _templates(_SHARED_CONTEXTS + _LIVE_CONTEXTS)
PROMPTS_PER_SUBJECT = 25
IMAGES_PER_PROMPT = 4

# DreamCache's reported DreamBench numbers (spec 5.2, paper Table 2), for the summary table.
PAPER_RESULTS: dict[str, dict[str, float]] = {
    "SD 2.1": {"dino": 0.767, "clip_i": 0.816, "clip_t": 0.301},
    "SD 1.5": {"dino": 0.713, "clip_i": 0.810, "clip_t": 0.298},
}


@dataclass(frozen=True)
class DreamBenchPrompt:
    """One (subject, prompt) cell of the benchmark."""

    subject: str
    kind: SubjectKind
    prompt_index: int
    prompt: str  # what is generated: "a photo of a dog, in the jungle"
    eval_caption: str  # what CLIP-T is scored against: "a dog in the jungle"


def subject_kind(subject: str) -> SubjectKind:
    return "live" if subject in LIVE_SUBJECTS else "object"


def check_subjects(subjects: Sequence[str]) -> list[str]:
    unknown = [s for s in subjects if s not in DREAMBOOTH_CLASSES]
    if unknown:
        raise InvalidValue(f"not DreamBench subjects: {unknown}; known: {', '.join(SUBJECTS)}")
    if len(set(subjects)) != len(subjects):
        raise InvalidValue("subjects must not repeat")
    return list(subjects)


def dreambench_prompts(subjects: Sequence[str] | None = None,
                       prompts_per_subject: int = PROMPTS_PER_SUBJECT) -> list[DreamBenchPrompt]:
    """The benchmark's (subject, prompt) rows, subjects in the given (default: canonical) order.

    ``prompts_per_subject`` below 25 takes the first prompts of each list (a smoke run, not the benchmark).
    """
    if not 1 <= prompts_per_subject <= PROMPTS_PER_SUBJECT:
        raise InvalidValue(f"prompts_per_subject must be 1..{PROMPTS_PER_SUBJECT}, got {prompts_per_subject}")
    rows = []
    for subject in check_subjects(list(subjects) if subjects is not None else list(SUBJECTS)):
        kind = subject_kind(subject)
        templates = LIVE_TEMPLATES if kind == "live" else OBJECT_TEMPLATES
        for index, (generation, caption) in enumerate(templates[:prompts_per_subject]):
            rows.append(DreamBenchPrompt(subject, kind, index, generation.format(GENERATION_NOUNS[subject]),
                                         caption.format(EVAL_NOUNS[subject])))
    return rows


# -- the protocol's averaging --------------------------------------------------------------------------------------
# Per-image score columns: DINO and CLIP-I against all real images of the subject ("all", standard DreamBench) and
# against the single reference ("ref"), both reported (ambiguity A10); CLIP-T against the eval caption.
SCORE_COLUMNS = ("dino_all", "clip_i_all", "clip_t", "dino_ref", "clip_i_ref")
SPLITS = ("overall", "objects", "live")


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def summarize_scores(rows: Sequence[dict]) -> dict[str, dict]:
    """The benchmark's numbers from per-image rows (``subject``, ``prompt_index`` and the score columns).

    As the official scripts: mean over a prompt's images, then over the subject's prompts, then over subjects;
    a split with no subject is left out. Each split also reports how many subjects, prompts and images it holds.
    """
    per_prompt: dict[tuple[str, int], list[dict]] = {}
    for row in rows:
        per_prompt.setdefault((row["subject"], int(row["prompt_index"])), []).append(row)
    per_subject: dict[str, dict[str, list[float]]] = {}
    counts: dict[str, list[int]] = {}
    for (subject, _), images in per_prompt.items():
        scores = per_subject.setdefault(subject, {c: [] for c in SCORE_COLUMNS})
        for column in SCORE_COLUMNS:
            scores[column].append(_mean([float(image[column]) for image in images]))
        counts.setdefault(subject, []).append(len(images))
    subject_means = {s: {c: _mean(v) for c, v in scores.items()} for s, scores in per_subject.items()}
    summary: dict[str, dict] = {}
    for split in SPLITS:
        members = [s for s in subject_means if split == "overall" or (split == "live") == (subject_kind(s) == "live")]
        if not members:
            continue
        summary[split] = {
            "subjects": len(members), "prompts": sum(len(counts[s]) for s in members),
            "images": sum(sum(counts[s]) for s in members),
            **{c: _mean([subject_means[s][c] for s in members]) for c in SCORE_COLUMNS},
        }
    return summary


def summary_markdown(summary: dict[str, dict], backbone: str | None = None, title: str = "DreamBench") -> str:
    """The summary table with the paper's numbers underneath (``backbone``: "SD 2.1"/"SD 1.5" marks the comparable
    row). DINO / CLIP-I are against all real subject images; the "ref" columns against the single reference."""
    header = ("| | subjects | prompts | images | DINO | CLIP-I | CLIP-T | DINO (ref) | CLIP-I (ref) |\n"
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    lines = [f"## {title}", "", header]
    for split, row in summary.items():
        lines.append(f"| {split} | {row['subjects']} | {row['prompts']} | {row['images']} | {row['dino_all']:.3f} | "
                     f"{row['clip_i_all']:.3f} | {row['clip_t']:.3f} | {row['dino_ref']:.3f} | {row['clip_i_ref']:.3f} |")
    for name, paper in PAPER_RESULTS.items():
        mark = " (same backbone)" if name == backbone else ""
        lines.append(f"| paper: DreamCache {name}{mark} | 30 | 750 | 3000 | {paper['dino']:.3f} | "
                     f"{paper['clip_i']:.3f} | {paper['clip_t']:.3f} | | |")
    lines += ["", "Paper rows: overall numbers of Table 2 (DreamBench, one reference per subject)."]
    return "\n".join(lines) + "\n"
