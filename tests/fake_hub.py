"""A local stand-in for the Hugging Face Hub's file routes, so hub-id loading is tested offline (HF_ENDPOINT).

It serves folders as model repositories at one commit, answering what huggingface_hub's snapshot_download asks:
repository info per revision, the recursive file tree, and file resolution (HEAD for metadata, GET for bytes),
with the Hub's error codes for unknown repositories and revisions.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

COMMIT = "0123456789abcdef0123456789abcdef01234567"
REVISIONS = ("main", "v1", COMMIT)
INFO = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/revision/(?P<rev>[^/]+)$")
TREE = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/tree/(?P<rev>[^/]+)(?:/.*)?$")
RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")


class _Handler(BaseHTTPRequestHandler):
    repos: dict[str, Path] = {}
    requests: list[str] = []

    def log_message(self, *args: object) -> None:  # keep test output clean
        pass

    def do_HEAD(self) -> None:  # noqa: N802 - http.server's naming
        self._answer(body=False)

    def do_GET(self) -> None:  # noqa: N802
        self._answer(body=True)

    def _answer(self, body: bool) -> None:
        path = unquote(urlparse(self.path).path)
        self.requests.append(f"{self.command} {path}")
        for pattern, route in ((INFO, self._info), (TREE, self._tree), (RESOLVE, self._file)):
            match = pattern.match(path)
            if match:
                folder = self.repos.get(match["repo"])
                if folder is None:
                    return self._error(404, "RepoNotFound", "Repository not found")
                if match["rev"] not in REVISIONS:
                    return self._error(404, "RevisionNotFound", "Invalid rev id")
                return route(match, folder, body)
        self._error(404, "EntryNotFound", "no such route")

    def _files(self, folder: Path) -> list[Path]:
        return sorted(p for p in folder.rglob("*") if p.is_file())

    def _info(self, match: re.Match, folder: Path, body: bool) -> None:
        siblings = [{"rfilename": p.relative_to(folder).as_posix()} for p in self._files(folder)]
        self._json({"id": match["repo"], "modelId": match["repo"], "sha": COMMIT, "siblings": siblings}, body)

    def _tree(self, match: re.Match, folder: Path, body: bool) -> None:
        entries = [
            {"type": "file", "oid": _oid(p), "size": p.stat().st_size, "path": p.relative_to(folder).as_posix()}
            for p in self._files(folder)
        ]
        self._json(entries, body)

    def _file(self, match: re.Match, folder: Path, body: bool) -> None:
        file = folder / match["path"]
        if not file.is_file():
            return self._error(404, "EntryNotFound", "Entry not found")
        data = file.read_bytes()
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("ETag", f'"{_oid(file)}"')
        self.send_header("X-Repo-Commit", COMMIT)
        self.end_headers()
        if body:
            self.wfile.write(data)

    def _json(self, payload: object, body: bool) -> None:
        data = json.dumps(payload).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body:
            self.wfile.write(data)

    def _error(self, status: int, code: str, message: str) -> None:
        data = json.dumps({"error": message}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("X-Error-Code", code)
        self.send_header("X-Error-Message", message)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)


def _oid(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()  # noqa: S324 - git's blob id scheme, not security


@contextmanager
def fake_hub(repos: dict[str, Path]) -> Iterator[tuple[str, list[str]]]:
    """Serve `repos` (repo id -> folder) on 127.0.0.1; yields the endpoint URL and the log of requests."""
    handler = type("Handler", (_Handler,), {"repos": dict(repos), "requests": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", handler.requests
    finally:
        server.shutdown()
        server.server_close()
