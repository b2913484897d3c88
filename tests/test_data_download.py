"""`personalize-data`: the DreamBooth dataset fetched from a repository-shaped zip through the real CLI (a
file:// URL, or a loopback HTTP server for a download killed half-way), verified, atomic, and the one-line
errors offline or with a wrong archive; the real copy in ../shared/dreambooth passes the same checks."""

from __future__ import annotations

import io
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import zipfile
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

from personalize.config import PROJECT_ROOT, compose
from personalize.dataset import MARKER, data_task, extract_dataset, open_url, inspect_dataset
from personalize.errors import PersonalizeError
from tests.conftest import SHARED_DREAMBOOTH

# The dataset as the repository holds it (git ls-tree of google/dreambooth, dataset/): subject -> photos.
PHOTOS = {
    "backpack": 6, "backpack_dog": 5, "bear_plushie": 5, "berry_bowl": 6, "can": 6, "candle": 5, "cat": 5,
    "cat2": 5, "clock": 6, "colorful_sneaker": 5, "dog": 5, "dog2": 6, "dog3": 6, "dog5": 5, "dog6": 5,
    "dog7": 5, "dog8": 5, "duck_toy": 4, "fancy_boot": 6, "grey_sloth_plushie": 5, "monster_toy": 5,
    "pink_sunglasses": 6, "poop_emoji": 5, "rc_car": 5, "red_cartoon": 4, "robot_toy": 5, "shiny_sneaker": 6,
    "teapot": 5, "vase": 6, "wolf_plushie": 5,
}
UNREACHABLE = "http://127.0.0.1:9/dreambooth.zip"  # loopback, the discard port: refused at once, no network


def _jpeg(seed: int) -> bytes:
    """A small, distinct, real JPEG (noise, so each photo's bytes differ)."""
    rng = random.Random(seed)
    image = Image.frombytes("RGB", (40, 32), bytes(rng.randrange(256) for _ in range(40 * 32 * 3)))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def make_archive(path: Path, drop: str | None = None) -> dict[str, bytes]:
    """A zip laid out like GitHub's archive of google/dreambooth (`dreambooth-main/...`, with the repo's
    other files too); `drop` leaves one subject out. Returns the files that belong in the dataset folder."""
    dataset = {f"{s}/{i:02d}.jpg": _jpeg(zlib.crc32(f"{s}/{i}".encode())) for s, n in PHOTOS.items() if s != drop for i in range(n)}
    dataset["prompts_and_classes.txt"] = b"Classes\n\nsubject_name,class\n" + b"".join(f"{s},x\n".encode() for s in PHOTOS)
    dataset["references_and_licenses.txt"] = b"per-photo references and licences\n"
    root_files = {"LICENSE.md": b"Creative Commons Attribution 4.0\n", "README.md": b"# DreamBooth\n"}
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("dreambooth-main/", b"")
        for name, data in {**root_files, "CONTRIBUTING.md": b"x", "docs/teaser_static.jpg": _jpeg(1)}.items():
            zf.writestr(f"dreambooth-main/{name}", data)
        for name, data in dataset.items():
            zf.writestr(f"dreambooth-main/dataset/{name}", data)
    return {**dataset, **root_files}


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> tuple[Path, dict[str, bytes]]:
    path = tmp_path_factory.mktemp("archive") / "dreambooth-main.zip"
    return path, make_archive(path)


def data_cli(*args: str, cwd: Path, timeout: int = 180, popen: bool = False):
    """`personalize-data` (the installed console script, else the same entry point through python)."""
    script = Path(sys.executable).parent / "personalize-data"
    cmd = [str(script)] if script.exists() else [sys.executable, "-c", "from personalize.cli import data_main; data_main()"]
    env = {k: v for k, v in os.environ.items() if k != "DREAMBOOTH_DIR"}
    env["PYTHONPATH"] = str(PROJECT_ROOT)  # `python -c` from cwd=tmp must still find the package
    if popen:
        return subprocess.Popen([*cmd, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=cwd)
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)


def one_error_line(result) -> str:
    """Exit code 2 and one `error:` line: no traceback (the download's progress lines may come before it)."""
    assert result.returncode == 2, result.stdout + result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if not line.startswith("downloading ")]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def leftovers(target: Path) -> list[str]:
    return sorted(p.name for p in target.parent.iterdir() if p.name.startswith(f".{target.name}."))


def test_fetch_verify_and_say_where(archive, tmp_path):
    zip_path, files = archive
    target, cwd = tmp_path / "data" / "dreambooth", tmp_path / "cwd"
    cwd.mkdir()
    url = zip_path.as_uri()
    result = data_cli(f"paths.dreambooth_dir={target}", f"url={url}", cwd=cwd)
    assert result.returncode == 0, result.stderr
    assert f"30 subjects, 158 photos in {target}, fetched from {url}" in result.stdout
    assert f"downloading {url}:" in result.stderr and "(100%)" in result.stderr  # the progress line

    # exactly the dataset folder (plus the licence and README), byte for byte; nothing else of the repo
    got = {str(p.relative_to(target)): p.read_bytes() for p in target.rglob("*") if p.is_file() and p.name != MARKER}
    assert got == files
    marker = json.loads((target / MARKER).read_text())
    assert (marker["subjects"], marker["total_photos"], marker["photos"], marker["source"]) == (30, 158, PHOTOS, url)
    assert leftovers(target) == [] and list(cwd.iterdir()) == []  # no staging folder, no Hydra run dir or log



def data(target: Path, *overrides: str):
    """The same task in this process (what the CLI runs after composing): the cheaper way to the later calls."""
    return data_task(compose("data", [f"paths.dreambooth_dir={target}", *overrides]))


def test_complete_is_left_alone_and_force_replaces(archive, tmp_path, capsys):
    zip_path, files = archive
    target = tmp_path / "dreambooth"
    data(target, f"url={zip_path.as_uri()}")
    marker = (target / MARKER).read_text()
    # complete: a second call downloads nothing (its URL is unreachable), verify_only agrees
    data(target, f"url={UNREACHABLE}")
    data(target, "verify_only=true")
    out = capsys.readouterr().out
    assert out.count("30 subjects, 158 photos") == 3 and out.count("complete; nothing to download") == 2
    assert (target / MARKER).read_text() == marker

    # a photo gone: no longer complete, one line naming it and the fix; force=true fetches it again
    (target / "teapot" / "03.jpg").unlink()
    with pytest.raises(PersonalizeError, match=r"subject 'teapot' has 4 readable photos, not 5: `personalize-data force=true`"):
        data(target, f"url={UNREACHABLE}")
    data(target, f"url={zip_path.as_uri()}", "force=true")
    assert (target / "teapot" / "03.jpg").read_bytes() == files["teapot/03.jpg"] and leftovers(target) == []


def test_archive_missing_a_subject_writes_nothing(tmp_path):
    zip_path = tmp_path / "short.zip"
    make_archive(zip_path, drop="teapot")
    target = tmp_path / "data" / "dreambooth"
    line = one_error_line(data_cli(f"paths.dreambooth_dir={target}", f"url={zip_path.as_uri()}", cwd=tmp_path))
    assert "subject folder 'teapot' is missing" in line and f"nothing was written to {target}" in line
    assert not target.exists() and leftovers(target) == []


def test_not_a_zip_and_not_the_repository(tmp_path):
    target = tmp_path / "data" / "dreambooth"
    page = tmp_path / "page.zip"
    page.write_text("<html>rate limited</html>")
    with pytest.raises(PersonalizeError, match="is not a readable zip archive"):
        data(target, f"url={page.as_uri()}")
    other = tmp_path / "other.zip"
    with zipfile.ZipFile(other, "w") as zf:
        zf.writestr("other-main/README.md", "another repository")
    with pytest.raises(PersonalizeError, match="has no dataset/prompts_and_classes.txt: it is not the google/dreambooth"):
        data(target, f"url={other.as_uri()}")
    assert not target.exists() and leftovers(target) == []


def test_offline_is_one_line_saying_what_to_do(tmp_path):
    target = tmp_path / "data" / "dreambooth"
    line = one_error_line(data_cli(f"paths.dreambooth_dir={target}", f"url={UNREACHABLE}", cwd=tmp_path))
    # what to download, where to put it (the resolved path), how to check it
    assert f"download {UNREACHABLE} by hand" in line and f"dataset/ folder to {target}" in line
    assert "personalize-data verify_only=true" in line
    assert not target.parent.exists()  # nothing written at all: the URL is opened first
    # verify_only on nothing says so, and never downloads
    with pytest.raises(PersonalizeError, match="there is no DreamBooth dataset at .*: fetch it with `personalize-data`"):
        data(target, "verify_only=true")


class _StallingServer:
    """Loopback HTTP: announces the whole archive, sends half of it, then stalls until released."""

    def __init__(self, data: bytes):
        self.release = threading.Event()
        release = self.release

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's name
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.send_header("Content-Type", "application/zip")
                self.end_headers()
                self.wfile.write(data[: len(data) // 2])
                self.wfile.flush()
                release.wait(60)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/dreambooth-main.zip"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


def test_a_killed_download_never_looks_complete(archive, tmp_path):
    zip_path, files = archive
    target = tmp_path / "data" / "dreambooth"
    server = _StallingServer(zip_path.read_bytes())
    try:
        proc = data_cli(f"paths.dreambooth_dir={target}", f"url={server.url}", cwd=tmp_path, popen=True)
        deadline = time.monotonic() + 120
        partial = []
        while time.monotonic() < deadline and proc.poll() is None:
            partial = [p for p in target.parent.glob(f".{target.name}.*/.archive.zip") if p.stat().st_size > 0] \
                if target.parent.is_dir() else []
            if partial:
                break
            time.sleep(0.2)
        assert partial, f"the download never started: {proc.poll()} {proc.stderr.read() if proc.poll() is not None else ''}"
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
    finally:
        server.close()
    staging = partial[0].parent
    assert staging.is_dir() and not target.exists()  # half an archive beside the target, nothing at it
    assert partial[0].stat().st_size < zip_path.stat().st_size
    with pytest.raises(PersonalizeError, match="there is no DreamBooth dataset at"):
        data(target, "verify_only=true")

    # the next fetch removes the dead writer's staging folder and completes
    data(target, f"url={zip_path.as_uri()}")
    assert not staging.exists() and leftovers(target) == []
    assert json.loads((target / MARKER).read_text())["total_photos"] == 158


def _unpacked(zip_path: Path, dest: Path) -> Path:
    extract_dataset(zip_path, dest, "file://test", dest)
    return dest


def test_inspection_catches_what_a_copy_by_hand_can_get_wrong(archive, tmp_path):
    zip_path, _ = archive
    root = _unpacked(zip_path, tmp_path / "db")
    assert inspect_dataset(root).problems == [] and inspect_dataset(root).photos == PHOTOS

    jpeg = root / "dog" / "02.jpg"  # a truncated photo (an interrupted copy) is not readable
    jpeg.write_bytes(jpeg.read_bytes()[: len(jpeg.read_bytes()) // 2])
    assert inspect_dataset(root).problems == ["photo 'dog/02.jpg' cannot be read (corrupt or truncated)",
                                              "subject 'dog' has 4 readable photos, not 5"]
    (root / "dog" / "02.jpg").write_bytes(_jpeg(7))
    (root / "prompts_and_classes.txt").unlink()
    assert inspect_dataset(root).problems == ["prompts_and_classes.txt is missing"]
    (root / "prompts_and_classes.txt").write_text("x")

    # a marker that disagrees with the folders (edited since it was written) fails the check
    (root / MARKER).write_text(json.dumps({"photos": {**PHOTOS, "dog": 6}}))
    assert "marker lists other photo counts" in inspect_dataset(root).problems[0]


def test_a_copy_by_hand_is_checked_then_marked(archive, tmp_path):
    """No marker (put there by hand): verify_only only checks; a plain call checks and marks it."""
    zip_path, _ = archive
    target = _unpacked(zip_path, tmp_path / "db")
    data(target, f"url={UNREACHABLE}", "verify_only=true")
    assert not (target / MARKER).exists()
    data(target, f"url={UNREACHABLE}")
    assert json.loads((target / MARKER).read_text())["photos"] == PHOTOS


def test_archive_names_cannot_leave_the_target(tmp_path):
    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as zf:
        zf.writestr("dreambooth-main/dataset/prompts_and_classes.txt", "x")
        zf.writestr("dreambooth-main/dataset/../../escaped.txt", "x")
        zf.writestr("dreambooth-main/dataset/.hidden", "x")
    dest = tmp_path / "out" / "db"
    dest.mkdir(parents=True)
    extract_dataset(evil, dest, "file://test", dest)
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file() and p != evil) == ["prompts_and_classes.txt"]


def test_settings_that_are_not_valid(tmp_path):
    with pytest.raises(PersonalizeError, match="url=nope is not a URL .*: use the repository's zip, e.g. url=https://"):
        open_url("nope", 5, tmp_path / "db")
    with pytest.raises(PersonalizeError, match="verify_only=yes is not true or false: use verify_only=true or verify_only=false"):
        data(tmp_path / "db", "verify_only=yes")
    for bad in ("0", "nan", "inf", "soon"):
        with pytest.raises(PersonalizeError, match=f"timeout_s={bad} is not a positive number of seconds: use e.g. timeout_s=60"):
            data(tmp_path / "db", f"timeout_s={bad}")
    assert not (tmp_path / "db").exists()


def test_a_target_that_cannot_be_written_is_one_line(archive, tmp_path):
    zip_path, _ = archive
    (tmp_path / "a-file").write_text("not a folder")
    with pytest.raises(PersonalizeError, match=r"cannot write the dataset beside .*a-file/db \(.*\): it needs ~250 MB"):
        data(tmp_path / "a-file" / "db", f"url={zip_path.as_uri()}")


@pytest.mark.skipif(not SHARED_DREAMBOOTH.is_dir(), reason="no ../shared/dreambooth on this machine")
def test_the_real_dataset_passes_the_checks(tmp_path):
    before = sorted(p.name for p in SHARED_DREAMBOOTH.iterdir())
    found = inspect_dataset(SHARED_DREAMBOOTH)
    assert found.problems == [] and found.photos == PHOTOS and found.total == 158
    result = data_cli(f"paths.dreambooth_dir={SHARED_DREAMBOOTH}", "verify_only=true", cwd=tmp_path)
    assert result.returncode == 0 and "30 subjects, 158 photos" in result.stdout, result.stderr
    assert sorted(p.name for p in SHARED_DREAMBOOTH.iterdir()) == before  # verify_only writes nothing
