"""The contact sheet of a generation run: one sheet per subject (drawn in Ray tasks) and an index page."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from dreamcache import storage

from . import contact_sheet
from .generation_plan import id_problem
from .generation_settings import GenerationJobConfig


def write_contact_sheets(manifest: Sequence[Mapping], config: GenerationJobConfig, run_prefix: str, run_id: str,
                         counts: Mapping[str, int]) -> str:
    """Draw the sheets (one Ray task per subject) and write the index; returns the index URI."""
    touched = {r["subject_id"] for r in manifest if r["action"] != "skipped"} if config.contact_sheet == "new" \
        else {r["subject_id"] for r in manifest}
    by_subject: dict[str, list[Mapping]] = {}
    for r in manifest:
        if r["subject_id"] in touched:
            by_subject.setdefault(r["subject_id"], []).append(r)
    drawable = [s for s in sorted(by_subject) if id_problem(s) is None][: config.contact_sheet_max_subjects]
    records = []
    for subject in drawable:
        subject_rows = by_subject[subject]
        columns = sorted({r["prompt_index"] for r in subject_rows})
        seeds = sorted({r["seed"] for r in subject_rows})
        cells = [contact_sheet.SheetCell(columns.index(r["prompt_index"]), seeds.index(r["seed"]),
                                         r["image_uri"], r["error"]) for r in subject_rows]
        records.append(contact_sheet.subject_sheet_record(subject, columns, seeds, cells))
    sheets_prefix = storage.join_uri(run_prefix, "sheets")
    if records:
        import ray

        from .ray_runtime import init_ray

        init_ray()  # already up when rows were rendered; a run with only failed rows still draws their sheets
        ray.data.from_items(records).map(
            contact_sheet.render_subject_sheet, fn_kwargs={"sheets_prefix": sheets_prefix, "cell": config.contact_sheet_cell},
            num_cpus=0.25,
        ).materialize()
    legend: dict[int, tuple] = {}
    for r in manifest:
        legend.setdefault(r["prompt_index"], (r["prompt_index"], r["prompt"], r["negative_prompt"] or "", r["guidance_scale"]))
    subjects = [
        contact_sheet.SubjectSummary(s, sum(r["status"] == "ok" for r in rows), sum(r["status"] != "ok" for r in rows),
                                     f"sheets/{s}.png" if s in drawable else None)
        for s, rows in sorted(by_subject.items())
    ]
    errors = [(r["subject_id"], r["prompt"], r["seed"], r["error"] or "") for r in manifest if r["status"] != "ok"]
    note = "" if by_subject else "Nothing was rendered or failed in this run: every image already existed."
    if len(drawable) < len(by_subject):
        note = f"Sheets drawn for the first {len(drawable)} of {len(by_subject)} subjects."
    index_uri = storage.join_uri(run_prefix, "index.html")
    page = contact_sheet.index_html(run_id, counts, [legend[k] for k in sorted(legend)], subjects,
                                    errors, note)
    storage.write_bytes(index_uri, page.encode("utf-8"))
    return index_uri
