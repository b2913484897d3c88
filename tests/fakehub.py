"""A Hugging Face Hub stand-in on localhost, for tests that must go through the real client code.

It answers the few endpoints `huggingface_hub` (2.x) uses to resolve, list and download a model repo,
with the headers the real Hub sends (X-Repo-Commit, ETag, X-Linked-Etag/-Size for LFS files, X-Error-Code
for errors), so `snapshot_download`, `hf_hub_download` and diffusers/transformers' `from_pretrained` run
unchanged against it: point them at it with HF_ENDPOINT. Failures are served the way the Hub serves them
(a removed repo: 404 + X-Error-Code RepoNotFound; a gated one: 403 + GatedRepo; an unknown revision: 404 +
RevisionNotFound), so the client raises its own exception types. Every request is recorded.

Run it in-process (`FakeHub(...)` as a context manager) or as a script for a subprocess test:
    python tests/fakehub.py <port file> <repo_id>=<folder> ... [gated=<repo_id>]
"""

from __future__ import annotations

import hashlib
import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

LFS_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".msgpack", ".h5", ".onnx")


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class FakeRepo:
    """The files of one repo at one commit, read from a folder (plus extra files given as bytes)."""

    def __init__(self, repo_id: str, folder: Path | None = None, extra: dict[str, bytes] | None = None):
        self.repo_id = repo_id
        self.files: dict[str, bytes] = {}
        if folder is not None:
            for path in sorted(Path(folder).rglob("*")):
                if path.is_file():
                    self.files[path.relative_to(folder).as_posix()] = path.read_bytes()
        self.files.update(extra or {})
        digest = hashlib.sha1(repo_id.encode())
        for name in sorted(self.files):
            digest.update(name.encode() + b"\0" + self.files[name])
        self.commit = digest.hexdigest()

    def entry(self, path: str) -> dict:
        data = self.files[path]
        entry = {"type": "file", "path": path, "size": len(data), "oid": git_blob_sha1(data)}
        if path.endswith(LFS_SUFFIXES):  # on the Hub the ETag of an LFS file is its sha256
            entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
        return entry


class FakeHub:
    """A threaded HTTP server on 127.0.0.1 serving `repos`; `gated`: ids answered 403 GatedRepo."""

    def __init__(self, repos: list[FakeRepo], gated: tuple[str, ...] = ()):
        self.repos = {repo.repo_id: repo for repo in repos}
        self.gated = set(gated)
        self.requests: list[tuple[str, str]] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_HEAD(self):
                hub.handle(self, head=True)

            def do_GET(self):
                hub.handle(self, head=False)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "FakeHub":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def downloaded(self, repo_id: str) -> set[str]:
        """Files of `repo_id` whose content was fetched (GET on /resolve/)."""
        prefix = f"/{repo_id}/resolve/"
        return {unquote(p[len(prefix):]).split("/", 1)[1] for m, p in self.requests
                if m == "GET" and p.startswith(prefix)}

    # ------------------------------------------------------------------------------------ serving
    def _send(self, handler, status: int, body: bytes = b"", headers: dict | None = None, head: bool = False):
        handler.send_response(status)
        for key, value in (headers or {}).items():
            handler.send_header(key, value)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        if not head:
            handler.wfile.write(body)

    def _error(self, handler, status: int, code: str, message: str, head: bool):
        body = json.dumps({"error": message}).encode()
        self._send(handler, status, body, {"X-Error-Code": code, "X-Error-Message": message,
                                           "Content-Type": "application/json"}, head)

    def _repo(self, handler, repo_id: str, revision: str, head: bool):
        """The repo at `revision`, or None after answering with the Hub's error for it."""
        if repo_id in self.gated:
            self._error(handler, 403, "GatedRepo", f"Access to model {repo_id} is restricted.", head)
            return None
        repo = self.repos.get(repo_id)
        if repo is None:
            self._error(handler, 404, "RepoNotFound", "Repository not found", head)
            return None
        if revision not in ("main", repo.commit):
            self._error(handler, 404, "RevisionNotFound", "Invalid rev id", head)
            return None
        return repo

    def handle(self, handler, head: bool) -> None:
        method = "HEAD" if head else "GET"
        path = urlparse(handler.path).path
        self.requests.append((method, path))
        parts = [unquote(p) for p in path.strip("/").split("/")]
        if parts[:2] == ["api", "models"] and len(parts) >= 4:
            repo_id = "/".join(parts[2:4])
            rest = parts[4:]
            if not rest or rest[0] == "revision":  # model_info / repo_info
                revision = rest[1] if len(rest) > 1 else "main"
                repo = self._repo(handler, repo_id, revision, head)
                if repo is not None:
                    info = {"id": repo_id, "modelId": repo_id, "sha": repo.commit, "private": False,
                            "gated": False, "disabled": False, "downloads": 0, "likes": 0, "tags": [],
                            "siblings": [{"rfilename": f} for f in repo.files]}
                    self._send(handler, 200, json.dumps(info).encode(), {"Content-Type": "application/json"}, head)
                return
            if rest[0] == "tree":  # list_repo_tree (recursive): every file, one page
                repo = self._repo(handler, repo_id, rest[1] if len(rest) > 1 else "main", head)
                if repo is not None:
                    prefix = "/".join(rest[2:])
                    entries = [repo.entry(f) for f in repo.files if f.startswith(prefix)]
                    self._send(handler, 200, json.dumps(entries).encode(), {"Content-Type": "application/json"}, head)
                return
        if len(parts) >= 5 and parts[2] == "resolve":  # /<ns>/<name>/resolve/<revision>/<file>
            repo_id, revision, file = "/".join(parts[:2]), parts[3], "/".join(parts[4:])
            repo = self._repo(handler, repo_id, revision, head)
            if repo is None:
                return
            if file not in repo.files:
                self._error(handler, 404, "EntryNotFound", f"{file} does not exist", head)
                return
            data, entry = repo.files[file], repo.entry(file)
            headers = {"X-Repo-Commit": repo.commit, "ETag": f'"{entry["oid"]}"',
                       "Content-Type": "application/octet-stream"}
            if "lfs" in entry:
                headers.update({"X-Linked-Etag": f'"{entry["lfs"]["oid"]}"', "X-Linked-Size": str(len(data))})
            self._send(handler, 200, data, headers, head)
            return
        self._error(handler, 404, "NotFound", f"fake hub: no such endpoint {path}", head)


def main(argv: list[str]) -> None:
    port_file, *specs = argv
    repos, gated = [], []
    for spec in specs:
        key, value = spec.split("=", 1)
        if key == "gated":
            gated.append(value)
        else:
            repos.append(FakeRepo(key, Path(value)))
    with FakeHub(repos, tuple(gated)) as hub:
        Path(port_file).write_text(hub.url)
        threading.Event().wait()


if __name__ == "__main__":
    main(sys.argv[1:])
