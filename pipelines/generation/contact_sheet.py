"""Contact sheets of a generation run, for a person to look at it: one PNG grid per subject (its reference at
the head, then prompts across, seeds down; the run's settings under the title) and an ``index.html`` that links
them, lists the prompts and the failed rows.

Sheets are drawn from the images already in storage, so a sheet shows every row of its subject in the plan,
rendered this run or before. Nothing here imports Ray or torch: the batch job maps
:func:`render_subject_sheet` over subjects with Ray Data, and anything else can call it directly.
"""

from __future__ import annotations

import html
import io
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont, ImageOps

from dreamcache import storage

logger = logging.getLogger(__name__)

BACKGROUND = (255, 255, 255)
ERROR_FILL = (250, 215, 215)
MISSING_FILL = (225, 225, 225)
TEXT = (20, 20, 20)
MAX_ERRORS_LISTED = 500  # the manifest has them all; a page of thousands helps nobody


REFERENCE_LABEL = "reference"


@dataclass(frozen=True)
class SheetLayout:
    """Where things go on a sheet: a title line, ``caption_lines`` lines of settings, a header row of column
    labels, a column of seed labels. Grid column 0 is the subject's reference, prompt ``p`` is column ``p + 1``."""

    columns: int  # prompt columns, not counting the reference
    rows: int
    cell: int = 160
    gap: int = 4
    title_height: int = 22
    caption_lines: int = 0
    line_height: int = 13
    header_height: int = 18
    label_width: int = 64

    @property
    def grid_top(self) -> int:
        return self.title_height + self.caption_lines * self.line_height + self.header_height

    @property
    def size(self) -> tuple[int, int]:
        width = self.label_width + (self.columns + 1) * (self.cell + self.gap) + self.gap
        height = self.grid_top + self.rows * (self.cell + self.gap) + self.gap
        return width, height

    def cell_box(self, column: int, row: int) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) of grid cell ``column`` (0: the reference) and seed ``row``."""
        left = self.label_width + self.gap + column * (self.cell + self.gap)
        top = self.grid_top + self.gap + row * (self.cell + self.gap)
        return left, top, left + self.cell, top + self.cell

    def reference_box(self) -> tuple[int, int, int, int]:
        return self.cell_box(0, 0)

    def image_box(self, prompt_column: int, row: int) -> tuple[int, int, int, int]:
        return self.cell_box(prompt_column + 1, row)


@dataclass(frozen=True)
class SheetCell:
    column: int  # the prompt column
    row: int
    image_uri: str | None  # None: the row failed
    error: str | None = None


def wrap_text(text: str, width: float, measure: Callable[[str], float]) -> list[str]:
    """``text`` in lines no wider than ``width`` (by ``measure``), broken at spaces where it can and inside a
    long word (a URI) where it must."""
    lines: list[str] = []
    line = ""
    for word in text.split(" "):
        candidate = f"{line} {word}" if line else word
        if measure(candidate) <= width:
            line = candidate
            continue
        if line:
            lines.append(line)
        while len(word) > 1 and measure(word) > width:
            cut = len(word) - 1
            while cut > 1 and measure(word[:cut]) > width:
                cut -= 1
            lines.append(word[:cut])
            word = word[cut:]
        line = word
    return lines + [line] if line else lines


def render_sheet(
    title: str,
    column_labels: Sequence[str],
    row_labels: Sequence[str],
    cells: Sequence[SheetCell],
    load: Callable[[str], Image.Image],
    cell: int = 160,
    caption: Sequence[str] = (),
    reference_uri: str | None = None,
) -> Image.Image:
    """Draw one grid: the subject's reference at the head (grid column 0, first row), then its images, prompts
    across and seeds down; under the title the ``caption`` lines (the run's settings), wrapped to the sheet's
    width. Each image is scaled to fit its cell; a failed row is a red cell, an image that cannot be read (or a
    reference the caches do not name) a grey one, so a sheet is always drawn."""
    font = ImageFont.load_default()
    width = SheetLayout(columns=len(column_labels), rows=len(row_labels), cell=cell).size[0]
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength
    lines = [wrapped for line in caption for wrapped in wrap_text(line, width - 8, lambda t: measure(t, font=font))]
    layout = SheetLayout(columns=len(column_labels), rows=len(row_labels), cell=cell, caption_lines=len(lines))
    sheet = Image.new("RGB", layout.size, BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    draw.text((layout.gap, 4), title, fill=TEXT, font=font)
    for i, line in enumerate(lines):
        draw.text((layout.gap, layout.title_height + i * layout.line_height), line, fill=TEXT, font=font)
    for column, label in enumerate([REFERENCE_LABEL, *column_labels]):
        left, top, _, _ = layout.cell_box(column, 0)
        draw.text((left, top - layout.header_height), label, fill=TEXT, font=font)
    for row, label in enumerate(row_labels):
        _, top, _, _ = layout.cell_box(0, row)
        draw.text((layout.gap, top + 2), label, fill=TEXT, font=font)

    def grey(box: tuple[int, int, int, int], text: str) -> None:
        draw.rectangle((box[0], box[1], box[2] - 1, box[3] - 1), fill=MISSING_FILL)  # rectangle includes its far edges
        draw.text((box[0] + 4, box[1] + 4), text, fill=TEXT, font=font)

    if reference_uri is None:
        grey(layout.reference_box(), "no reference")
    else:
        try:
            sheet.paste(fit_to_cell(load(reference_uri), cell), layout.reference_box()[:2])
        except Exception as exc:  # noqa: BLE001 - a sheet is for looking; an unreadable reference must not stop it
            logger.warning("contact sheet: cannot read reference %s: %s", reference_uri, exc)
            grey(layout.reference_box(), "unreadable")
    for c in cells:
        box = layout.image_box(c.column, c.row)
        inside = (box[0], box[1], box[2] - 1, box[3] - 1)  # ImageDraw.rectangle includes its far edges
        if c.image_uri is None:
            draw.rectangle(inside, fill=ERROR_FILL)
            draw.text((box[0] + 4, box[1] + 4), "error", fill=TEXT, font=font)
            continue
        try:
            image = load(c.image_uri)
        except Exception as exc:  # noqa: BLE001 - a sheet is for looking; one unreadable image must not stop it
            logger.warning("contact sheet: cannot read %s: %s", c.image_uri, exc)
            grey(box, "unreadable")
            continue
        sheet.paste(fit_to_cell(image, cell), box[:2])
    return sheet


def fit_to_cell(image: Image.Image, cell: int) -> Image.Image:
    """The image scaled (up or down, aspect kept) and centred on a white ``cell`` x ``cell`` square."""
    fitted = ImageOps.contain(image.convert("RGB"), (cell, cell), Image.Resampling.LANCZOS)
    square = Image.new("RGB", (cell, cell), BACKGROUND)
    square.paste(fitted, ((cell - fitted.width) // 2, (cell - fitted.height) // 2))
    return square


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def load_image(uri: str) -> Image.Image:
    """One of the run's own PNGs, or a subject's reference. Not dreamcache.images.decode_image: that module pulls
    torch into every sheet worker (seconds per fresh worker); a reference was decoded and checked by the caching
    job already, and the pixel limit below keeps an oversized one from being decoded here."""
    with Image.open(io.BytesIO(storage.read_bytes(uri))) as image:
        if image.width * image.height > Image.MAX_IMAGE_PIXELS:
            raise ValueError(f"{uri}: {image.width}x{image.height} is too large for a contact sheet")
        return image.convert("RGB")


# -- one subject, as a Ray Data row ---------------------------------------------------------------------------
def subject_sheet_record(subject_id: str, columns: Sequence[int], seeds: Sequence[int],
                         cells: Sequence[SheetCell], reference_uri: str | None = None) -> dict:
    """The row handed to :func:`render_subject_sheet`: plain strings, so Arrow stores it as it is."""
    return {
        "subject_id": subject_id,
        "columns": json.dumps(list(columns)),
        "seeds": json.dumps(list(seeds)),
        "cells": json.dumps([[c.column, c.row, c.image_uri, c.error] for c in cells]),
        "reference_uri": reference_uri or "",  # "": none known (Arrow would type a column of only None as null)
    }


def render_subject_sheet(record: Mapping, sheets_prefix: str, cell: int = 160, caption: Sequence[str] = ()) -> dict:
    """Draw and write ``<sheets_prefix>/<subject_id>.png``; returns the record with ``sheet_uri`` added."""
    subject_id = storage.validate_id(record["subject_id"])
    columns = json.loads(record["columns"])
    seeds = json.loads(record["seeds"])
    cells = [SheetCell(*c) for c in json.loads(record["cells"])]
    sheet = render_sheet(subject_id, [f"P{p}" for p in columns], [f"seed {s}" for s in seeds], cells, load_image, cell,
                         caption, record.get("reference_uri") or None)
    uri = storage.join_uri(sheets_prefix, subject_id + ".png")
    storage.write_bytes(uri, png_bytes(sheet))
    return {**record, "sheet_uri": uri}


# -- the index page -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SubjectSummary:
    subject_id: str
    ok: int
    errors: int
    sheet_name: str | None  # relative to the index; None when the sheet was not drawn (over the limit)


def index_html(
    run_id: str,
    counts: Mapping[str, int],
    prompts: Sequence[tuple[int, str, str, float]],
    subjects: Sequence[SubjectSummary],
    errors: Sequence[tuple[str, str, int, str]],
    note: str = "",
) -> str:
    """The run's page: counts, the prompt legend (P-number -> text), one row per subject with its sheet, and
    the failed rows (subject, prompt, seed, reason). Every value from the plan is escaped."""
    e = html.escape
    parts = [
        "<!doctype html>", "<html><head><meta charset='utf-8'>",
        f"<title>dreamcache run {e(run_id)}</title>",
        "<style>body{font-family:sans-serif;margin:1.5em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}"
        "img{max-width:480px}</style></head><body>",
        f"<h1>Generation run {e(run_id)}</h1>",
        "<p>" + ", ".join(f"{e(k)}: {v}" for k, v in counts.items()) + "</p>",
    ]
    if note:
        parts.append(f"<p>{e(note)}</p>")
    parts += ["<h2>Prompts</h2>", "<table><tr><th>column</th><th>prompt</th><th>negative prompt</th><th>guidance</th></tr>"]
    parts += [f"<tr><td>P{i}</td><td>{e(p)}</td><td>{e(n)}</td><td>{g:g}</td></tr>" for i, p, n, g in prompts]
    parts += ["</table>", "<h2>Subjects</h2>", "<table><tr><th>subject</th><th>ok</th><th>errors</th><th>sheet</th></tr>"]
    for s in subjects:
        link = (f"<a href='{e(s.sheet_name)}'><img src='{e(s.sheet_name)}' alt='{e(s.subject_id)}'></a>"
                if s.sheet_name else "(not drawn)")
        parts.append(f"<tr><td>{e(s.subject_id)}</td><td>{s.ok}</td><td>{s.errors}</td><td>{link}</td></tr>")
    parts.append("</table>")
    if errors:
        listed = "" if len(errors) <= MAX_ERRORS_LISTED else f", the first {MAX_ERRORS_LISTED} listed"
        parts += [f"<h2>Failed rows ({len(errors)}{listed})</h2>",
                  "<table><tr><th>subject</th><th>prompt</th><th>seed</th><th>error</th></tr>"]
        parts += [f"<tr><td>{e(s)}</td><td>{e(p)}</td><td>{seed}</td><td>{e(err)}</td></tr>"
                  for s, p, seed, err in errors[:MAX_ERRORS_LISTED]]
        parts.append("</table>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
