"""The report's HTML page: `personalize-report` on the smoke sweep's real run dirs, parsed and checked
against the files it was made from; a hand-built report for what is missing and for escaping; and, in
the slow set, the page rendered by a real headless Chromium.

The browser test needs Chromium from the distribution (`apt-get install -y chromium`, /usr/bin/chromium)
and is skipped, saying so, when it is absent. Run it with the other slow tests (`make test-slow`) or alone:

    .venv/bin/python -m pytest -q -m slow tests/test_report_html.py
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import json
import re
import subprocess
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from personalize.config import PROJECT_ROOT, compose
from personalize.errors import PersonalizeError
from personalize.report.command import make_report
from personalize.report.page import PageSettings, render_page
from personalize.report.render import write_report
from tests import sweeps
from tests.test_report import make_run, report_cfg

CHROMIUM = Path("/usr/bin/chromium")
PROTOCOL = "dreambooth"  # the protocol of the smoke table's first column: the grids show its images
PROMPTS, PER_PROMPT, THUMB = 6, 4, 128  # conf/report.yaml's report.html defaults


# --------------------------------------------------------------------------------------------- a DOM


@dataclass
class Node:
    tag: str
    attrs: dict
    children: list = field(default_factory=list)
    text: str = ""  # the text directly inside, unescaped

    def all(self, tag: str | None = None, cls: str | None = None, **attrs) -> list["Node"]:
        """Every descendant with this tag, class and attributes (`data_method=` is data-method)."""
        found = []
        for child in self.children:
            wanted = {k.replace("_", "-"): v for k, v in attrs.items()}
            if ((tag is None or child.tag == tag) and (cls is None or cls in child.attrs.get("class", "").split())
                    and all(child.attrs.get(k) == v for k, v in wanted.items())):
                found.append(child)
            found += child.all(tag, cls, **attrs)
        return found

    def one(self, *args, **kwargs) -> "Node":
        found = self.all(*args, **kwargs)
        assert len(found) == 1, (args, kwargs, len(found))
        return found[0]

    def full_text(self) -> str:
        return self.text + "".join(c.full_text() for c in self.children)


class _Builder(HTMLParser):
    VOID = {"img", "meta", "br", "link", "input", "hr", "source", "area", "base", "col", "embed", "wbr"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.root = Node("#document", {})
        self.stack = [self.root]

    def handle_starttag(self, tag, attrs):
        node = Node(tag, {k: (v or "") for k, v in attrs})
        self.stack[-1].children.append(node)
        if tag not in self.VOID:
            self.stack.append(node)

    def handle_endtag(self, tag):
        assert tag not in self.VOID, f"</{tag}>"
        assert self.stack[-1].tag == tag, f"</{tag}> closes <{self.stack[-1].tag}>: the page is not well nested"
        self.stack.pop()

    def handle_data(self, data):
        self.stack[-1].text += data


def parse(page: str) -> Node:
    builder = _Builder()
    builder.feed(page)
    builder.close()
    assert builder.stack == [builder.root], "unclosed elements: " + ", ".join(n.tag for n in builder.stack[1:])
    return builder.root


def decode(img: Node) -> Image.Image:
    """The image of an <img>'s data: URI; its MIME type must be what the bytes are."""
    match = re.fullmatch(r"data:image/(jpeg|png);base64,([A-Za-z0-9+/=]+)", img.attrs["src"])
    assert match, img.attrs["src"][:80]
    image = Image.open(io.BytesIO(base64.b64decode(match[2], validate=True)))
    image.load()
    assert image.format == match[1].upper()
    return image


def fitted(width: int, height: int, size: int) -> tuple[int, int]:
    scale = size / max(width, height)
    return round(width * scale), round(height * scale)


# -------------------------------------------------------------------------------- the smoke report


@dataclass
class Smoke:
    sweep: sweeps.Sweep
    page_path: Path
    folder: Path  # report.out_dir
    wandb_data: Path
    log: str

    @property
    def page(self) -> str:
        return self.page_path.read_text(encoding="ascii")  # written as ASCII: other characters are references


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> Smoke:
    """`personalize-report` on the session's smoke sweep (made once, shared with test_report), W&B offline."""
    sweep = sweeps.smoke_sweep(tmp_path_factory)
    wandb_data = tmp_path_factory.mktemp("wandb-data")  # W&B stages artifact files here
    result = sweeps.run("personalize-report", f"experiment={sweeps.SMOKE}", outputs=sweep.outputs,
                        WANDB_DATA_DIR=str(wandb_data))
    assert result.returncode == 0, result.log[-4000:]
    page = sweep.outputs / "report" / f"{sweeps.SMOKE}.html"
    assert str(page) in result.log  # listed with the other outputs
    return Smoke(sweep, page, sweep.outputs / "report" / sweeps.SMOKE, wandb_data, result.log)


def smoke_table():
    return compose("report", [f"experiment={sweeps.SMOKE}"], output_dir="/unused").table


def run_dirs(sweep: sweeps.Sweep) -> dict[tuple[str, str], Path]:
    out = {}
    for run in sweep.runs:
        config = yaml.safe_load((run / "config.yaml").read_text())
        out[(config["method"]["name"], config["subject"]["name"])] = run
    return out


def test_page_is_self_contained_every_image_decodes(smoke):
    page = smoke.page
    assert page.startswith("<!DOCTYPE html>") and len(page) < 2_000_000, len(page)
    dom = parse(page)
    # nothing to fetch: no scripts, stylesheets, frames or fonts; every src/href is a data: URI
    for tag in ("script", "link", "iframe", "object", "embed", "base"):
        assert not dom.all(tag), tag
    assert not re.search(r"https?://|url\(|@import|file:", page, re.IGNORECASE)
    nodes = dom.all()
    for node in nodes:
        for name in ("src", "href", "srcset", "poster", "data"):
            if name in node.attrs:
                assert node.attrs[name].startswith("data:image/"), (node.tag, name, node.attrs[name][:60])
    images = dom.all("img")
    assert images
    for img in images:
        image = decode(img)
        assert max(image.size) <= THUMB or img.attrs.get("id") == "metrics-vs-step"
        # shown at its own aspect ratio (a small sample scaled up to the thumbnail size)
        if img.attrs.get("id") != "metrics-vs-step":
            assert (int(img.attrs["width"]), int(img.attrs["height"])) == fitted(*image.size, THUMB)
        assert img.attrs.get("alt")


def test_table_is_the_papers_rows_with_ours_beside(smoke):
    dom = parse(smoke.page)
    table_cfg = smoke_table()
    paper = yaml.safe_load((PROJECT_ROOT / "experiments" / "paper_tables.yaml").read_text())[str(table_cfg.name)]
    ours = pd.read_csv(smoke.folder / "table.csv")  # the report's numbers, from the same run
    table = dom.one("table", id="paper-table")
    head = table.one("thead").all("tr")
    assert [th.full_text() for th in head[0].all("th")][1:] == [str(c.label) for c in table_cfg.columns]
    assert [th.full_text() for th in head[1].all("th")] == ["ours", "paper"] * len(table_cfg.columns)
    rows = table.one("tbody").all("tr")
    assert [r.attrs["data-method"] for r in rows] == list(table_cfg.methods) == ["two_stage", "dreambooth"]
    for row in rows:
        method = row.attrs["data-method"]
        cells = row.all("td")
        assert len(cells) == 2 * len(table_cfg.columns)
        for k, column in enumerate(table_cfg.columns):
            mine = ours[(ours.method == method) & (ours.column == column.label)].iloc[0]
            assert cells[2 * k].full_text() == f"{mine.ours:.3f}"  # every subject has a value: no (n/N)
            expected = paper["rows"][method]
            for part in str(column.paper).split("."):
                expected = expected[part]
            assert cells[2 * k + 1].full_text() == f"{float(expected):.3f}"
    # the per-subject table and the Missing section are there too
    assert [r.attrs["data-subject"] for r in dom.one("table", id="subject-table").one("tbody").all("tr")] == list(
        table_cfg.subjects)
    assert "Missing (0 cell(s))" in dom.one("section", id="missing").full_text()


def test_plot_is_the_reports_png(smoke):
    plot = parse(smoke.page).one("section", id="plot").one("img", id="metrics-vs-step")
    data = base64.b64decode(plot.attrs["src"].split(",", 1)[1])
    assert data == (smoke.folder / "metrics_vs_step.png").read_bytes()
    assert (int(plot.attrs["width"]), int(plot.attrs["height"])) == Image.open(io.BytesIO(data)).size


def test_one_grid_per_method_and_subject_beside_the_photos(smoke):
    dom = parse(smoke.page).one("section", id="samples")
    table_cfg = smoke_table()
    subjects_csv = pd.read_csv(smoke.folder / "subjects.csv")
    runs = run_dirs(smoke.sweep)
    assert len(dom.all("figure", cls="grid")) == len(table_cfg.methods) * len(table_cfg.subjects) == 4
    for subject in table_cfg.subjects:
        section = dom.one("section", cls="subject", data_subject=subject)
        # the subject's photos, in training's order, each a thumbnail of the right photo
        folder = Path(yaml.safe_load((runs[("two_stage", subject)] / "config.yaml").read_text())["subject"]["data_dir"])
        photos = sorted(p for p in folder.iterdir() if p.suffix == ".jpg")
        shown = section.one("figure", cls="photos").all("img", cls="photo")
        assert len(shown) == len(photos) >= 4
        for img, photo in zip(shown, photos):
            thumb, original = decode(img).convert("RGB"), Image.open(photo).convert("RGB")
            assert thumb.size == fitted(*original.size, THUMB)
            reference = np.asarray(original.resize(thumb.size, Image.BILINEAR), dtype=np.float64)
            # JPEG and a different resampling filter: the mean colour agrees within a few levels
            assert np.abs(np.asarray(thumb, dtype=np.float64).mean((0, 1)) - reference.mean((0, 1))).max() < 4
        for method in table_cfg.methods:
            grid = section.one("figure", cls="grid", data_method=method, data_subject=subject)
            picked = subjects_csv[(subjects_csv.method == method) & (subjects_csv.subject == subject)
                                  & (subjects_csv.protocol == PROTOCOL)]
            step = int(picked.stage_step.iloc[0])
            assert grid.attrs["data-step"] == str(step) and grid.attrs["data-protocol"] == PROTOCOL
            record = next(r for r in map(json.loads, (runs[(method, subject)] / "metrics.jsonl").read_text().split("\n")[:-1])
                          if r["protocol"] == PROTOCOL and r["stage_step"] == step)
            out = runs[(method, subject)] / "eval" / record["checkpoint"] / PROTOCOL
            prompts = json.loads((out / "spec.json").read_text())["prompts"]
            assert len(prompts) == 25 and record["checkpoint"] in grid.one("figcaption").full_text()
            # 6 of the 25 prompts, evenly spread from the first to the last; the smoke makes 1 image each
            indices = [round(i * 24 / (PROMPTS - 1)) for i in range(PROMPTS)]
            assert indices == [0, 5, 10, 14, 19, 24]
            assert [p.full_text() for p in grid.all("div", cls="prompt")] == [prompts[i] for i in indices]
            samples = grid.all("img", cls="sample")
            assert len(samples) == PROMPTS
            for img, index in zip(samples, indices):
                original = Image.open(out / f"p{index:02d}_i00.png").convert("RGB")
                thumb = decode(img).convert("RGB")
                assert thumb.size == original.size == (64, 64)  # a thumbnail only shrinks
                error = np.abs(np.asarray(thumb, dtype=np.float64) - np.asarray(original, dtype=np.float64)).mean()
                assert error < 10, error  # JPEG (quality 85, 4:4:4) of these noise-like 64 px images: ~7 levels


def test_page_went_to_wandb_as_html_and_as_a_report_artifact(smoke):
    page = smoke.page_path.read_bytes()
    run = (smoke.folder / "wandb" / "latest-run").resolve()  # this report's offline run
    logged = list(run.glob("files/media/html/report/page_*.html"))
    assert len(logged) == 1 and logged[0].read_bytes() == page  # unchanged: no stylesheet injected
    # The artifact: the offline run's log records it (type "report", the page's path and MD5, as W&B
    # writes its protobuf records), and the file it will upload is staged, byte for byte the page.
    log = next(run.glob("run-*.wandb")).read_bytes()
    assert b'"\x06report*\x1creport-zeng2023_table1_smoke' in log  # ArtifactRecord: type = 4, name = 5
    digest = base64.b64encode(hashlib.md5(page).digest())
    assert re.search(re.escape(f"{sweeps.SMOKE}.html".encode()) + rb".{1,3}" + re.escape(digest), log)
    staged = [p for p in (smoke.wandb_data / "artifacts" / "staging").iterdir() if p.read_bytes() == page]
    assert staged


# ---------------------------------------------------------------------------- hand-built and input


def test_missing_samples_are_said_and_text_is_escaped(tmp_path):
    """Runs built by hand: one with images whose prompt is markup, one without images, one subject without runs."""
    sweep = tmp_path / "train" / "multiruns" / "zeng2023_table1" / "2026-01-01_00-00-00"
    hostile = '<img src=x onerror="alert(1)"> & <b>bold</b>'
    for method in ("two_stage", "dreambooth"):
        for subject in ("dog", "dog2"):
            run = make_run(sweep, method, subject, name=f"0_{method}-{subject}-s0")
            config = yaml.safe_load((run / "config.yaml").read_text())
            config["subject"]["data_dir"] = str(PROJECT_ROOT / "data" / "samples" / ("dog" if subject == "dog" else "nowhere"))
            (run / "config.yaml").write_text(yaml.safe_dump(config))
            if subject == "dog":  # two prompts x 3 images at the selected steps (400 / 600, as test_report's)
                start, step = (100, 400) if method == "two_stage" else (0, 600)
                out = run / "eval" / f"step-{start + step:06d}" / PROTOCOL
                out.mkdir(parents=True)
                (out / "spec.json").write_text(json.dumps({"prompts": [hostile, "a sks dog"]}))
                for p in range(2):
                    for i in range(3):
                        Image.new("RGB", (256, 192), (40 * p, 80 * i, 200)).save(out / f"p{p:02d}_i{i:02d}.png")
    cfg = report_cfg(tmp_path, "table.subjects=[dog,dog2,dog5]")
    report = make_report(cfg)
    paths = write_report(report, tmp_path / "out")
    settings = PageSettings.from_cfg(cfg.report.html).for_report(report)
    assert settings.protocol == PROTOCOL and settings.path == Path(str(cfg.report.html.path))
    page = render_page(report, paths["plot"], settings)
    assert page.isascii() and hostile not in page and html.escape(hostile) in page
    dom = parse(page)
    assert not dom.all("img", src="x") and all(b.full_text() != "bold" for b in dom.all("b"))  # no markup got in
    dog = dom.one("section", cls="subject", data_subject="dog")
    grid = dog.one("figure", cls="grid", data_method="dreambooth")
    assert [p.full_text() for p in grid.all("div", cls="prompt")] == [hostile, "a sks dog"]
    samples = grid.all("img", cls="sample")
    assert len(samples) == 6 and all(decode(s).size == (128, 96) for s in samples)  # 256x192 shrunk to 128 px
    assert decode(samples[4]).convert("RGB").getpixel((64, 48)) == pytest.approx((40, 80, 200), abs=6)  # p01_i01
    assert len(dog.one("figure", cls="photos").all("img")) == 5
    dog2 = dom.one("section", cls="subject", data_subject="dog2")
    assert "no photos found in" in dog2.one("figure", cls="photos").full_text()
    for method in ("two_stage", "dreambooth"):
        text = dog2.one("figure", cls="grid", data_method=method).full_text()
        assert "no evaluation images in" in text and "eval/step-" in text
        assert dom.one("section", cls="subject", data_subject="dog5").one(
            "figure", cls="grid", data_method=method).one("p", cls="missing").full_text() == "no run"
    assert "(2/3)" in dom.one("table", id="paper-table").full_text()


@pytest.mark.parametrize("override, message", [
    ("report.html.images_per_prompt=12", "report.html.images_per_prompt=12: use a whole number from 1 to 8"),
    ("report.html.prompts=none", "report.html.prompts='none': use a whole number from 1 to 100"),
    ("report.html.thumb=4", "report.html.thumb=4: use a whole number from 16 to 512"),
])
def test_bad_page_settings_are_one_line(tmp_path, override, message):
    with pytest.raises(PersonalizeError, match=re.escape(message)):
        PageSettings.from_cfg(report_cfg(tmp_path, override).report.html)


def test_bad_protocol_names_the_evaluated_ones(tmp_path):
    make_run(tmp_path / "train" / "runs", "two_stage", "dog")
    cfg = report_cfg(tmp_path, "report.html.protocol=jindal")
    with pytest.raises(PersonalizeError, match=re.escape(
            "report.html.protocol='jindal' was not evaluated in these runs: use one of dreambooth, simple")):
        PageSettings.from_cfg(cfg.report.html).for_report(make_report(cfg))
    assert PageSettings.from_cfg(report_cfg(tmp_path, "report.html.path=null").report.html).path is None


def test_cli_bad_setting_exits_2_before_writing(tmp_path):
    make_run(tmp_path / "train" / "runs", "two_stage", "dog")
    out = tmp_path / "report"
    result = sweeps.run("personalize-report", "experiment=zeng2023_table1", "logger=none",
                        f"report.runs_dirs=[{tmp_path / 'train'}]", f"report.out_dir={out}",
                        f"report.html.path={tmp_path / 'page.html'}", "report.html.images_per_prompt=9",
                        outputs=tmp_path)
    assert result.returncode == 2, result.log[-2000:]
    assert "error: report.html.images_per_prompt=9: use a whole number from 1 to 8" in result.log
    assert not (tmp_path / "page.html").exists() and not (out / "table.csv").exists()


# ----------------------------------------------------------------------------------------- browser

# Put first in <head> of a copy of the page: records every error the page raises (script errors,
# console.error, an image or other resource that fails to load: those fire 'error' on the element,
# seen by a capturing listener) and, once everything has loaded, what each image and the table came
# to, as JSON in <pre id="render-probe">, which --dump-dom then prints.
PROBE = """<script>
(function () {
  var errors = [];
  window.addEventListener("error", function (e) {
    var t = e.target || {};
    errors.push(t.tagName ? "failed to load <" + t.tagName.toLowerCase() + ">" : String(e.message));
  }, true);
  window.addEventListener("securitypolicyviolation", function (e) { errors.push("CSP " + e.blockedURI); });
  var original = console.error;
  console.error = function () { errors.push("console.error " + Array.prototype.join.call(arguments, " ")); original.apply(console, arguments); };
  function box(el) { var r = el.getBoundingClientRect(); return {x: r.left, y: r.top, w: r.width, h: r.height}; }
  window.addEventListener("load", function () {
    var images = Array.prototype.map.call(document.images, function (img) {
      return {id: img.id, cls: img.className, method: img.dataset.method || null, subject: img.dataset.subject || null,
              complete: img.complete, natural: [img.naturalWidth, img.naturalHeight], box: box(img)};
    });
    var table = document.getElementById("paper-table");
    var pre = document.createElement("pre");
    pre.id = "render-probe";
    pre.textContent = JSON.stringify({errors: errors, images: images, table: box(table),
                                      table_rows: table.querySelectorAll("tbody tr").length,
                                      grids: document.querySelectorAll("figure.grid").length});
    document.body.appendChild(pre);
  });
})();
</script>"""

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars", "--force-device-scale-factor=1", "--window-size=1400,2000"]


def chromium(*args: str, profile: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(CHROMIUM), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
                          capture_output=True, text=True, timeout=180)


@pytest.mark.slow
@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Chromium at /usr/bin/chromium: apt-get install -y chromium")
def test_page_renders_in_headless_chromium(smoke, tmp_path):
    page = smoke.page
    probed = tmp_path / "probed.html"
    probed.write_text(page.replace("<head>", "<head>" + PROBE, 1), encoding="ascii")
    # --virtual-time-budget: the DOM is dumped once the page has loaded and has been idle that long
    dumped = chromium("--dump-dom", "--virtual-time-budget=10000", "--enable-logging=stderr", "--v=0",
                      probed.as_uri(), profile=tmp_path / "profile-dom")
    assert dumped.returncode == 0, dumped.stderr[-3000:]
    found = re.search(r'<pre id="render-probe">(.*?)</pre>', dumped.stdout, re.S)
    assert found, dumped.stdout[-2000:]
    probe = json.loads(html.unescape(found[1]))
    assert probe["errors"] == []
    # the browser's own log of the page's console (it logs every level as INFO:CONSOLE): empty, as the
    # page has no script and the probe writes to the console only on an error
    console = [line for line in dumped.stderr.splitlines() if "CONSOLE" in line]
    assert console == [], console

    expected_imgs = parse(page).all("img")
    # the plot, the photos (5 and 6), 2 methods x 2 subjects x 6 samples
    assert len(probe["images"]) == len(expected_imgs) == 1 + (5 + 6) + 2 * 2 * 6
    for image in probe["images"]:
        assert image["complete"] and image["natural"][0] > 0 and image["natural"][1] > 0, image  # not broken
        assert image["box"]["w"] > 0 and image["box"]["h"] > 0, image  # laid out, visible
    samples = [i for i in probe["images"] if i["cls"] == "sample"]
    assert {(i["method"], i["subject"]) for i in samples} == {(m, s) for m in ("two_stage", "dreambooth")
                                                               for s in ("sample_dog", "sample_dog2")}
    assert probe["table_rows"] == 2 and probe["table"]["w"] > 300 and probe["grids"] == 4
    # the methods' grids of one subject sit side by side, each prompt's row at the same height
    first = {m: [i for i in samples if i["method"] == m and i["subject"] == "sample_dog"] for m in ("two_stage", "dreambooth")}
    assert [i["box"]["y"] for i in first["two_stage"]] == [i["box"]["y"] for i in first["dreambooth"]]
    assert first["dreambooth"][0]["box"]["x"] > first["two_stage"][0]["box"]["x"] + 128

    # The screenshot of the page itself (no probe): the table, the plot and the first grid rows are in
    # the 1400x2000 view, and each of those areas holds a picture, not a blank.
    shot = tmp_path / "page.png"
    taken = chromium(f"--screenshot={shot}", smoke.page_path.as_uri(), profile=tmp_path / "profile-shot")
    assert taken.returncode == 0 and shot.exists(), taken.stderr[-3000:]
    screen = np.asarray(Image.open(shot).convert("RGB"), dtype=np.float64)
    assert screen.shape == (2000, 1400, 3)
    plot = next(i for i in probe["images"] if i["id"] == "metrics-vs-step")
    regions = [probe["table"], plot["box"], first["two_stage"][0]["box"], first["dreambooth"][0]["box"]]
    for region in regions:
        x, y, w, h = (int(round(region[k])) for k in ("x", "y", "w", "h"))
        assert y + h <= 2000, region
        assert screen[y:y + h, x:x + w].std() > 10, region  # drawn: text, lines or pixels, not one colour
