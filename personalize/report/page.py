"""The report as one self-contained HTML page: the paper's table with ours beside it, the metric-vs-step
plot, and per method x subject a grid of the images the evaluation generated at the selected checkpoint,
beside the subject's photos, so methods are compared by eye as well as by number.

Self-contained means the page opens from disk with no server and no network: every image is a data: URI
(downscaled JPEG thumbnails; the plot as the PNG `personalize-report` already wrote), the CSS is inline,
and there is no script, font or link to anything outside the file. All text is escaped, and the page is
written as ASCII (other characters as character references), so it reads the same in any locale.

It is fed by what the report computes (a `personalize.report.tables.Report`, the paths of its outputs);
nothing here selects checkpoints or averages: the numbers are the report's. Where the evaluation put its
images is the run dir's layout (`personalize.rundir`).

Size: a 128 px thumbnail is about 6 kB (8 kB as base64), and a page holds (photos + methods x prompts x
images per prompt) x subjects of them: a full 30-subject sweep of two methods, 30 x (5 + 2 x 6 x 4), is
about 1,600 thumbnails, some 13 MB; `report.html.prompts` / `images_per_prompt` / `thumb` trade it down.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from PIL import Image, ImageOps, UnidentifiedImageError

from personalize.errors import PersonalizeError
from personalize.io import atomic_write_text
from personalize.report.runs import RunInfo
from personalize.report.spec import REAL_IMAGES_ROW
from personalize.rundir import GRID_FILE, SPEC_FILE, eval_dir, parse_image_name, step_name

if TYPE_CHECKING:  # tables.py renders the markdown; the page only reads a built Report
    from personalize.report.tables import Report

log = logging.getLogger(__name__)

# The DreamBooth subjects have 4-6 photos; a user's own folder may hold many more, which would only
# lengthen the column without helping the comparison.
MAX_PHOTOS = 8
# One grid row holds one prompt's images: more than 8 per row would not fit beside the photos and the
# other methods on a laptop screen at 128 px.
MAX_PER_ROW = 8
_UNSET = "\u2014"


# ------------------------------------------------------------------------------------------ settings


@dataclass(frozen=True)
class PageSettings:
    """`report.html`: where the page goes and how much of each run's samples it shows."""

    path: Path | None  # None: no page
    protocol: str | None = None  # whose images the grids show; None: the protocol of the table's first column
    prompts: int = 6  # prompts per grid, spread over the protocol's list
    images_per_prompt: int = 4
    thumb: int = 128  # px, the longer side of every thumbnail

    @classmethod
    def from_cfg(cls, cfg: Any) -> "PageSettings":
        """Checked before anything is read or written; a bad value is one line naming it and a valid one."""
        if cfg is None or cfg.get("path") in (None, ""):
            return cls(path=None)
        protocol = cfg.get("protocol")
        return cls(
            path=Path(str(cfg.path)).expanduser(),
            protocol=None if protocol in (None, "") else str(protocol),
            prompts=_whole(cfg.get("prompts", 6), "report.html.prompts", 1, 100, "prompts per grid, e.g. 6"),
            images_per_prompt=_whole(cfg.get("images_per_prompt", 4), "report.html.images_per_prompt", 1, MAX_PER_ROW,
                                     "images in a grid row, e.g. 4"),
            thumb=_whole(cfg.get("thumb", 128), "report.html.thumb", 16, 512, "thumbnail pixels, e.g. 128"),
        )

    def for_report(self, report: "Report") -> "PageSettings":
        """The settings with the grids' protocol decided and checked against the protocols the runs have."""
        have = sorted({str(rec["protocol"]) for run in report.runs for rec in run.records})
        if self.protocol is None:
            first = next((c.protocol for c in report.spec.columns if c.protocol in have), have[0] if have else None)
            return replace(self, protocol=first)
        if self.protocol not in have:
            choices = ", ".join(have) if have else "none: no run of the table was evaluated"
            raise PersonalizeError(f"report.html.protocol={self.protocol!r} was not evaluated in these runs: "
                                   f"use one of {choices} (or null for the table's first)")
        return self


def _whole(value: Any, name: str, low: int, high: int, what: str) -> int:
    try:
        number = int(str(value))
    except ValueError:
        number = None
    if number is None or not low <= number <= high:
        raise PersonalizeError(f"{name}={value!r}: use a whole number from {low} to {high} ({what})")
    return number


# ------------------------------------------------------------------------------------------- images


def selected_step(report: "Report", method: str, subject: str, protocol: str) -> int | None:
    """The stage step the report selected for (method, subject, protocol), if any."""
    part = report.subjects[(report.subjects.method == method) & (report.subjects.subject == subject)
                           & (report.subjects.protocol == protocol)]
    if part.empty:
        return None
    step = part.stage_step.iloc[0]
    return int(step) if str(step).isdigit() else int(str(step).split("/")[0])


def eval_folder(run: RunInfo, protocol: str, stage_step: int | None = None) -> Path | None:
    """Where the evaluation put a run's images for a checkpoint (by stage step; default the last) and protocol."""
    records = [r for r in run.records if r["protocol"] == protocol
               and (stage_step is None or r.get("stage_step") == stage_step)]
    if not records:
        return None
    record = max(records, key=lambda r: r["step"])
    return eval_dir(run.run_dir, str(record.get("checkpoint") or step_name(record["step"])), protocol)


def eval_images(run: RunInfo, protocol: str, stage_step: int | None = None) -> list[Path]:
    """The images the evaluation generated for a run's checkpoint (by stage step; default the last) and protocol."""
    folder = eval_folder(run, protocol, stage_step)
    if folder is None or run.source != "local":
        return []
    return sorted(p for p in folder.glob("*.png") if p.name != GRID_FILE)


def image_data_uri(path: Path, size: int) -> tuple[str, int, int] | None:
    """(data URI of a JPEG thumbnail at most `size` px, its width, height); None if not a readable image."""
    try:
        with Image.open(path) as img:
            img.draft("RGB", (size, size))  # a big JPEG decodes at 1/2..1/8 scale: fast, and enough for a thumb
            img = ImageOps.exif_transpose(img).convert("RGB")  # photos as the camera held them
    except (OSError, ValueError, SyntaxError, UnidentifiedImageError, Image.DecompressionBombError):
        return None
    img.thumbnail((size, size), Image.LANCZOS)  # shrinks only: a small image stays small in the file
    buffer = io.BytesIO()
    # 4:4:4 (no chroma subsampling): at 128 px, halving the colour resolution visibly smears the samples
    img.save(buffer, format="JPEG", quality=85, subsampling=0, optimize=True)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii"), img.width, img.height


def _display_size(width: int, height: int, size: int) -> tuple[int, int]:
    """Shown with the longer side at `size` px, so a small sample (a tiny model's 32 px) is still visible."""
    scale = size / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def _img(path: Path, size: int, alt: str, css: str, **data: Any) -> str | None:
    found = image_data_uri(path, size)
    if found is None:
        log.warning("report page: '%s' is not a readable image, left out", path)
        return None
    uri, width, height = found
    shown_w, shown_h = _display_size(width, height, size)
    attrs = "".join(f' data-{k.replace("_", "-")}="{_e(v)}"' for k, v in data.items())
    return (f'<img class="{css}" src="{uri}" width="{shown_w}" height="{shown_h}" alt="{_e(alt)}" '
            f'title="{_e(alt)}"{attrs}>')


def subject_photos(folder: str | Path | None, limit: int = MAX_PHOTOS) -> list[Path]:
    """The first `limit` files of a subject folder that open as images (sorted, as training reads them)."""
    if not folder or not Path(folder).is_dir():
        return []
    photos = []
    for path in sorted(p for p in Path(folder).iterdir() if p.is_file() and not p.name.startswith(".")):
        try:
            with Image.open(path):
                photos.append(path)
        except (OSError, ValueError, SyntaxError, UnidentifiedImageError, Image.DecompressionBombError):
            continue  # a caption file, a README: not a photo
        if len(photos) == limit:
            break
    return photos


def spread(items: Sequence[int], count: int) -> list[int]:
    """`count` items evenly spread over `items` (first and last included), all of them if there are fewer.

    DreamBooth's prompt list runs from backgrounds to accessories to art styles: the first few prompts
    would all be backgrounds."""
    items = list(items)
    if len(items) <= count:
        return items
    if count == 1:
        return items[:1]
    return [items[round(i * (len(items) - 1) / (count - 1))] for i in range(count)]


@dataclass
class Grid:
    """The samples one (method, subject) shows: rows of (prompt, image paths), or why there are none."""

    method: str
    subject: str
    protocol: str | None
    stage_step: int | None
    checkpoint: str | None
    rows: list[tuple[str, list[Path]]]
    reason: str | None = None  # why there are no images


def sample_grid(report: "Report", run: RunInfo | None, method: str, subject: str, settings: PageSettings) -> Grid:
    """The selected checkpoint's evaluation images of `run` for the page's protocol, a few per prompt."""
    protocol = settings.protocol
    empty = Grid(method, subject, protocol, None, None, [])
    if run is None:
        return replace(empty, reason="no run")
    if protocol is None:
        return replace(empty, reason="no protocol was evaluated")
    step = selected_step(report, method, subject, protocol)
    if step is None:
        return replace(empty, reason=run.reason() if run.status != "ok" else
                       f"no checkpoint selected for protocol {protocol} (see Missing)")
    folder = eval_folder(run, protocol, step)
    images = eval_images(run, protocol, step)
    grid = replace(empty, stage_step=step, checkpoint=folder.parent.name if folder else None)
    if run.source != "local":
        return replace(grid, reason=f"the images are on the machine that ran it ({run.run_dir})")
    by_prompt: dict[int, list[tuple[int, Path]]] = {}
    for path in images:
        indices = parse_image_name(path.name)
        if indices is not None:
            by_prompt.setdefault(indices[0], []).append((indices[1], path))
    if not by_prompt:
        return replace(grid, reason=f"no evaluation images in {folder}")
    prompts = _prompts(folder)
    rows = []
    for index in spread(sorted(by_prompt), settings.prompts):
        text = prompts[index] if index < len(prompts) else f"prompt {index}"
        rows.append((text, [p for _, p in sorted(by_prompt[index])[:settings.images_per_prompt]]))
    return replace(grid, rows=rows)


def _prompts(folder: Path) -> list[str]:
    try:
        prompts = json.loads((folder / SPEC_FILE).read_text()).get("prompts") or []
    except (OSError, ValueError, AttributeError):
        return []
    return [str(p) for p in prompts] if isinstance(prompts, list) else []


# ------------------------------------------------------------------------------------------ render


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _fmt(value: Any, digits: int = 3) -> str:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return _UNSET
    return _UNSET if number != number or number in (float("inf"), float("-inf")) else f"{number:.{digits}f}"


_CSS = """
body { font: 14px/1.4 system-ui, -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif; margin: 20px 24px;
       color: #1b1b1b; background: #fff; }
h1 { font-size: 22px; margin: 0 0 4px; } h2 { font-size: 18px; margin: 28px 0 8px; } h3 { font-size: 15px; margin: 18px 0 6px; }
p.meta { color: #444; margin: 2px 0; }
table.results { border-collapse: collapse; margin: 6px 0; }
table.results th, table.results td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; white-space: nowrap; }
table.results th { background: #f2f2f2; }
table.results th.row { text-align: left; }
td.paper { color: #555; background: #fafafa; }
span.n { color: #b00; font-size: 12px; }
.note { color: #444; font-style: italic; }
img.plot { max-width: 100%; height: auto; border: 1px solid #ddd; }
.compare { display: flex; flex-wrap: wrap; gap: 16px; align-items: flex-start; }
figure { margin: 0; }
figcaption { font-weight: 600; font-size: 13px; margin-bottom: 4px; }
.photo-list { display: flex; flex-direction: column; gap: 4px; }
.cells { display: grid; gap: 4px; }
.cells .prompt { grid-column: 1 / -1; font-size: 11px; line-height: 1.25; height: 2.5em; overflow: hidden;
                 color: #444; }  /* two lines, the same height for every method, so their rows line up */
img.photo, img.sample { display: block; object-fit: contain; background: #eee; }
p.missing { color: #b00; width: 240px; }
ul.missing li { margin: 1px 0; }
details { margin: 8px 0; }
"""


def _paper_table(report: "Report") -> str:
    spec = report.spec
    with_paper = bool(spec.paper)
    head1 = ['<th class="row" rowspan="2">method</th>' if with_paper else '<th class="row">method</th>']
    head2 = []
    for column in spec.columns:
        if with_paper:
            head1.append(f'<th colspan="2">{_e(column.label)}</th>')
            head2 += ["<th>ours</th>", "<th>paper</th>"]
        else:
            head1.append(f"<th>{_e(column.label)}</th>")
    rows = []
    real = report.real_images
    # the methods, then the real-images row (the subject's photos against each other) where it is shown
    for method, frame in [(m, report.table) for m in spec.methods] + ([(REAL_IMAGES_ROW, real)] if len(real) else []):
        label = "real images" if method == REAL_IMAGES_ROW else spec.method_label(method)
        cells = [f'<th class="row">{_e(label)}</th>']
        for column in spec.columns:
            part = frame[frame.column == column.label]
            if method != REAL_IMAGES_ROW:
                part = part[part.method == method]
            elif part.empty:  # a metric without a real-images value (CLIP-T, FID, ...)
                cells.append(f'<td class="ours">{_e(_UNSET)}</td>' + (f'<td class="paper">{_e(_UNSET)}</td>' if with_paper else ""))
                continue
            cell = part.iloc[0] if len(part) else None
            ours = _fmt(None if cell is None else cell.ours)
            n, expected = (0, len(spec.subjects)) if cell is None else (int(cell.n), int(cell.expected))
            short = f' <span class="n">({n}/{expected})</span>' if n < expected and (n or method != REAL_IMAGES_ROW) else ""
            tip = f"mean over {n} of {expected} subject(s)"
            if cell is not None and n > 1:
                tip += f", std {_fmt(cell.ours_std)}"
            cells.append(f'<td class="ours" title="{_e(tip)}">{_e(ours)}{short}</td>')
            if with_paper:
                cells.append(f'<td class="paper">{_e(_fmt(None if cell is None else cell.paper))}</td>')
        rows.append(f'<tr data-method="{_e(method)}">{"".join(cells)}</tr>')
    thead = f"<tr>{''.join(head1)}</tr>" + (f"<tr>{''.join(head2)}</tr>" if head2 else "")
    return (f'<table id="paper-table" class="results"><thead>{thead}</thead>'
            f'<tbody>{"".join(rows)}</tbody></table>')


def _subject_table(report: "Report") -> str:
    spec = report.spec
    real_columns = list(report.real_images.column)
    head = (['<th class="row">subject</th>'] + [f"<th>{_e(m)}<br>{_e(c.label)}</th>" for m in spec.methods
                                                for c in spec.columns]
            + [f"<th>real images<br>{_e(label)}</th>" for label in real_columns])
    rows = []
    for subject in spec.subjects:
        cells = [f'<th class="row">{_e(subject)}</th>']
        for method in spec.methods:
            for column in spec.columns:
                part = report.subjects[(report.subjects.method == method) & (report.subjects.subject == subject)
                                       & (report.subjects.column == column.label)]
                text = _UNSET if part.empty else f"{_fmt(part.value.iloc[0])} @{part.stage_step.iloc[0]}"
                cells.append(f"<td>{_e(text)}</td>")
        for label in real_columns:
            part = report.subjects[(report.subjects.method == REAL_IMAGES_ROW) & (report.subjects.subject == subject)
                                   & (report.subjects.column == label)]
            cells.append(f"<td>{_e(_UNSET if part.empty else _fmt(part.value.iloc[0]))}</td>")
        rows.append(f'<tr data-subject="{_e(subject)}">{"".join(cells)}</tr>')
    return (f'<table id="subject-table" class="results"><thead><tr>{"".join(head)}</tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table>')


def _plot(plot: Path | None) -> str:
    if plot is None or not Path(plot).is_file():
        return '<p class="note">No per-step data: nothing to plot.</p>'
    uri = "data:image/png;base64," + base64.b64encode(Path(plot).read_bytes()).decode("ascii")
    with Image.open(plot) as img:
        width, height = img.size
    return (f'<img id="metrics-vs-step" class="plot" src="{uri}" width="{width}" height="{height}" '
            f'alt="metrics against the checkpoint\'s stage step, one line per method">')


def _grid_html(grid: Grid, settings: PageSettings) -> str:
    attrs = (f'class="grid" data-method="{_e(grid.method)}" data-subject="{_e(grid.subject)}" '
             f'data-protocol="{_e(grid.protocol or "")}" data-step="{_e("" if grid.stage_step is None else grid.stage_step)}"')
    where = "" if grid.stage_step is None else f" @ stage step {grid.stage_step}"
    if grid.checkpoint:
        where += f" ({grid.checkpoint})"
    caption = f"<figcaption>{_e(grid.method)}{_e(where)}</figcaption>"
    if not grid.rows:
        return f'<figure {attrs}>{caption}<p class="missing">{_e(grid.reason or "no images")}</p></figure>'
    columns = max(len(paths) for _, paths in grid.rows)
    cells = []
    for prompt, paths in grid.rows:
        cells.append(f'<div class="prompt" title="{_e(prompt)}">{_e(prompt)}</div>')
        for k, path in enumerate(paths):
            tag = _img(path, settings.thumb, f"{grid.method}, {grid.subject}: {prompt} (image {k})", "sample",
                       method=grid.method, subject=grid.subject)
            cells.append(tag or f'<div class="missing" style="width:{settings.thumb}px">unreadable image</div>')
        cells += ["<div></div>"] * (columns - len(paths))  # a short row keeps the next prompt on its own line
    style = f"grid-template-columns: repeat({columns}, {settings.thumb}px)"
    return f'<figure {attrs}>{caption}<div class="cells" style="{style}">{"".join(cells)}</div></figure>'


def _photos_html(subject: str, photos: list[Path], folder: str | None, settings: PageSettings) -> str:
    tags = [t for t in (_img(p, settings.thumb, f"{subject}: photo {p.name}", "photo", subject=subject)
                        for p in photos) if t]
    caption = f"<figcaption>{_e(subject)}: photos</figcaption>"
    if not tags:
        where = f" in {folder}" if folder else ""
        return (f'<figure class="photos" data-subject="{_e(subject)}">{caption}'
                f'<p class="missing">no photos found{_e(where)}</p></figure>')
    return (f'<figure class="photos" data-subject="{_e(subject)}">{caption}'
            f'<div class="photo-list">{"".join(tags)}</div></figure>')


def _samples(report: "Report", settings: PageSettings) -> str:
    spec = report.spec
    by_key: dict[tuple, RunInfo] = {}
    for run in sorted(report.runs, key=lambda r: (r.seed is None, r.seed)):  # several seeds: the lowest shows
        by_key.setdefault((run.method, run.subject), run)
    intro = (f"Protocol <b>{_e(settings.protocol)}</b>: up to {settings.prompts} prompts spread over its list, "
             f"{settings.images_per_prompt} image(s) each, from the checkpoint the table selected for that "
             "method and subject (the same prompts and seeds for every method). Left: the subject's photos.")
    sections = []
    for subject in spec.subjects:
        runs = [by_key.get((m, subject)) for m in spec.methods]
        folder = next((r.subject_dir for r in runs if r is not None and r.subject_dir), None)
        parts = [_photos_html(subject, subject_photos(folder), folder, settings)]
        parts += [_grid_html(sample_grid(report, run, method, subject, settings), settings)
                  for method, run in zip(spec.methods, runs)]
        sections.append(f'<section class="subject" data-subject="{_e(subject)}"><h3>{_e(subject)}</h3>'
                        f'<div class="compare">{"".join(parts)}</div></section>')
    return f'<p class="meta">{intro}</p>' + "".join(sections)


def render_page(report: "Report", plot: Path | None, settings: PageSettings) -> str:
    """The page's HTML (ASCII: every other character as a character reference)."""
    spec = report.spec
    paper = spec.paper or {}
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           '<meta name="viewport" content="width=device-width, initial-scale=1">',
           f"<title>{_e(spec.name)}: report</title><style>{_CSS}</style></head><body>",
           f"<h1>{_e(spec.name)}</h1>"]
    if paper.get("source"):
        out.append(f'<p class="meta">{_e(paper["source"])}</p>')
    if spec.setup:
        out.append(f'<p class="meta" id="setup">Setup: {_e(spec.setup)}</p>')
    out.append(f'<p class="meta">W&amp;B group <code>{_e(report.group)}</code>; runs from '
               f"{_e(', '.join(report.sources) or 'the given runs')}.</p>")
    out.append(f'<p class="meta">Checkpoint: {_e(spec.describe_selection())}. Ours is the mean over '
               f"{len(spec.subjects)} subject(s); <span class=\"n\">(n/N)</span> marks a mean over fewer "
               "(see Missing).</p>")

    out.append('<section id="table"><h2>The paper\'s table, ours beside it</h2>')
    out.append(_paper_table(report))
    for note in ([f"Note (paper): {paper['note']}"] if paper.get("note") else []) + [f"Note: {n}" for n in report.notes]:
        out.append(f'<p class="note">{_e(note)}</p>')
    out.append("</section>")

    out.append('<section id="plot"><h2>Every metric against the checkpoint step</h2>'
               '<p class="meta">Mean over subjects (band: one standard deviation); dashed: the paper\'s value.</p>')
    out.append(_plot(plot) + "</section>")

    out.append('<section id="samples"><h2>Samples at the selected checkpoint</h2>')
    out.append(_samples(report, settings) + "</section>")

    out.append('<section id="per-subject"><h2>Per subject</h2>'
               '<p class="meta">Value @ stage step of the selected checkpoint.</p>')
    out.append(_subject_table(report) + "</section>")

    out.append(f'<section id="missing"><h2>Missing ({len(report.missing)} cell(s))</h2>')
    if report.missing.empty:
        out.append("<p>None: every method x subject x column has a value.</p>")
    else:
        items = [f"<li>{_e(m)} / {_e(s)} ({_e(', '.join(part.column))}): {_e(r)}</li>"
                 for (m, s, r), part in report.missing.groupby(["method", "subject", "reason"], sort=False)]
        out.append(f'<ul class="missing">{"".join(items)}</ul>')
    out.append("</section>")

    listed = [("in the table", report.runs), ("outside the table", report.extra), ("superseded", report.superseded)]
    items = [f"<li>{_e(r.label)} [{_e(r.status)}] {_e(what)}: <code>{_e(r.run_dir)}</code></li>"
             for what, runs in listed for r in sorted(runs, key=lambda r: r.label)]
    out.append(f'<details id="runs"><summary>Runs ({len(items)})</summary><ul>{"".join(items)}</ul></details>')
    out.append("</body></html>")
    return "\n".join(out).encode("ascii", "xmlcharrefreplace").decode("ascii") + "\n"


def write_page(report: "Report", plot: Path | None, settings: PageSettings) -> Path | None:
    """Write the page to `settings.path` (atomically); None when the page is off."""
    if settings.path is None:
        return None
    page = render_page(report, plot, settings)
    atomic_write_text(settings.path, page)
    size = len(page) / 1e6
    if size > 30:
        log.warning("report page %s is %.0f MB: lower report.html.prompts or report.html.images_per_prompt",
                    settings.path, size)
    return settings.path
