"""The contact sheet of a generation run: one sheet per subject (drawn in Ray tasks) and an index page.

The run's rows are streamed from its manifest part files in batches; the driver keeps the rows of at most
``contact_sheet_max_subjects`` subjects and the first errors, so a run of millions of rows draws its page in
bounded memory. Each sheet starts with its subject's reference: the URIs of the drawn subjects only are looked
up in the caching manifest, in the cluster (``plan.reference_uris``), and each sheet task reads its own.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import pyarrow.dataset as pads
import ray

from dreamcache import storage

from . import contact_sheet
from .plan import id_problem, reference_uris
from .settings import GenerationJobConfig

COLUMNS = ["subject_id", "prompt_index", "prompt", "negative_prompt", "guidance_scale", "image_guidance_scale",
           "seed", "image_uri", "error", "status", "action"]
MAX_ERRORS = 1000


def _run_rows(files: Sequence[str]):
    if not files:
        return
    filesystem, _ = storage.pyarrow_filesystem(files[0])
    dataset = pads.dataset([storage.pyarrow_filesystem(f)[1] for f in files], filesystem=filesystem, format="parquet")
    for batch in dataset.to_batches(columns=COLUMNS):
        yield from batch.to_pylist()


def _scales(values: set[float]) -> str:
    """One scale, or the range a run's prompts span (a prompts file may set them per prompt)."""
    if not values:
        return "-"
    low, high = min(values), max(values)
    return f"{low:g}" if low == high else f"{low:g}-{high:g} (per prompt)"


def settings_caption(config: GenerationJobConfig, text_scales: set[float], image_scales: set[float]) -> list[str]:
    """The run's settings as sheet caption lines: what a reader needs to tell one sheet's run from another's."""
    return [f"model: {config.model}", f"adapter: {config.adapter}",
            f"steps: {config.steps}   guidance: {config.guidance}   text scale s_T: {_scales(text_scales)}   "
            f"image scale s_I: {_scales(image_scales)}"]


def write_contact_sheets(run_files: Sequence[str], config: GenerationJobConfig, run_prefix: str, run_id: str,
                         counts: Mapping[str, int]) -> str:
    """Draw the sheets (one Ray task per subject) and write the index; returns the index URI."""
    limit = config.contact_sheet_max_subjects
    by_subject: dict[str, list[Mapping]] = {}
    # (column, prompt, negative, scale): an explicit plan numbers its prompt columns per subject, so one column
    # number may stand for several prompts.
    legend: set[tuple] = set()
    errors: list[tuple] = []
    image_scales: set[float] = set()  # the text scales are in the legend
    more_subjects = False
    for r in _run_rows(run_files):
        if r["status"] != "ok" and len(errors) < MAX_ERRORS:
            errors.append((r["subject_id"], r["prompt"], r["seed"], r["error"] or ""))
        if r["prompt_index"] is None:  # a plan row that could not be read: listed with the errors, never drawn
            continue
        legend.add((r["prompt_index"], r["prompt"], r["negative_prompt"] or "", r["guidance_scale"]))
        image_scales.add(r["image_guidance_scale"])
        if config.contact_sheet == "new" and r["action"] == "skipped":
            continue
        if r["subject_id"] not in by_subject and len(by_subject) >= limit:
            more_subjects = True
            continue
        by_subject.setdefault(r["subject_id"], []).append(r)
    drawable = [s for s in sorted(by_subject) if id_problem(s) is None]
    references = reference_uris(config, drawable)
    records = []
    for subject in drawable:
        subject_rows = by_subject[subject]
        columns = sorted({r["prompt_index"] for r in subject_rows})
        seeds = sorted({r["seed"] for r in subject_rows})
        cells = [contact_sheet.SheetCell(columns.index(r["prompt_index"]), seeds.index(r["seed"]),
                                         r["image_uri"], r["error"]) for r in subject_rows]
        records.append(contact_sheet.subject_sheet_record(subject, columns, seeds, cells, references.get(subject)))
    sheets_prefix = storage.join_uri(run_prefix, "sheets")
    if records:
        ray.data.from_items(records).map(
            contact_sheet.render_subject_sheet,
            fn_kwargs={"sheets_prefix": sheets_prefix, "cell": config.contact_sheet_cell,
                       "caption": settings_caption(config, {g for *_, g in legend}, image_scales)},
            num_cpus=0.25,
        ).materialize()
    subjects = [
        contact_sheet.SubjectSummary(s, sum(r["status"] == "ok" for r in rows), sum(r["status"] != "ok" for r in rows),
                                     f"sheets/{s}.png" if s in drawable else None)
        for s, rows in sorted(by_subject.items())
    ]
    note = "" if by_subject else "Nothing was rendered or failed in this run: every image already existed."
    if more_subjects:
        note = f"Sheets drawn for the first {len(by_subject)} subjects of this run (contact_sheet_max_subjects)."
    index_uri = storage.join_uri(run_prefix, "index.html")
    page = contact_sheet.index_html(run_id, counts, sorted(legend), subjects, errors, note)
    storage.write_bytes(index_uri, page.encode("utf-8"))
    return index_uri
