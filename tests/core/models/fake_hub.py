"""A local HTTP server that answers like the Hugging Face Hub's file endpoints (no internet here).

It serves the repos it is given (repo id -> folder) at one commit each, with the
endpoints ``huggingface_hub.snapshot_download`` uses: repo info, the recursive
tree listing, and HEAD/GET of ``/{repo}/resolve/{revision}/{file}``. Gated repos
answer 401 ``GatedRepo`` without the right token; unknown repos, revisions and
files answer with the Hub's error codes. Every request is recorded.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@dataclass
class FakeHub:
    repos: dict[str, Path]
    gated: dict[str, str] = field(default_factory=dict)  # repo id -> the token that opens it
    requests: list[str] = field(default_factory=list)  # "METHOD path"
    url: str = ""

    def files(self, repo: str) -> dict[str, bytes]:
        root = self.repos[repo]
        return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:  # quiet
            pass

        def _error(self, status: int, code: str, message: str) -> None:
            body = json.dumps({"error": message}).encode()
            self.send_response(status)
            self.send_header("X-Error-Code", code)
            self.send_header("X-Error-Message", message)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _json(self, payload: object) -> None:
            body = json.dumps(payload).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _repo(self, repo: str) -> bool:
            if repo not in hub.repos:
                self._error(401, "RepoNotFound", f"Repository Not Found for url: {self.path}.")
                return False
            token = hub.gated.get(repo)
            if token is not None and self.headers.get("Authorization") != f"Bearer {token}":
                self._error(401, "GatedRepo", f"Access to model {repo} is restricted. You must have access to it.")
                return False
            return True

        def _revision(self, revision: str) -> bool:
            if revision not in ("main", COMMIT):
                self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
                return False
            return True

        def do_HEAD(self) -> None:
            self.do_GET()

        def do_GET(self) -> None:
            hub.requests.append(f"{self.command} {self.path}")
            parts = [unquote(p) for p in urlparse(self.path).path.strip("/").split("/")]
            if parts[:2] == ["api", "models"] and len(parts) >= 6:
                repo, kind, revision = "/".join(parts[2:4]), parts[4], parts[5]
                if not (self._repo(repo) and self._revision(revision)):
                    return
                files = hub.files(repo)
                if kind == "revision":
                    self._json({"id": repo, "sha": COMMIT, "private": False,
                                "siblings": [{"rfilename": name} for name in files]})  # fmt: skip
                    return
                if kind == "tree":
                    self._json([
                        {"type": "file", "path": name, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
                        for name, data in files.items()
                    ])  # fmt: skip
                    return
            if len(parts) >= 5 and parts[2] == "resolve":
                repo, revision, name = "/".join(parts[:2]), parts[3], "/".join(parts[4:])
                if not (self._repo(repo) and self._revision(revision)):
                    return
                data = hub.files(repo).get(name)
                if data is None:
                    self._error(404, "EntryNotFound", f"{name} does not exist in {repo}")
                    return
                self.send_response(200)
                self.send_header("X-Repo-Commit", COMMIT)
                self.send_header("ETag", f'"{hashlib.sha1(data).hexdigest()}"')
                self.send_header("Content-Length", str(len(data)))
                self.send_header("Content-Type", "application/octet-stream")
                self.end_headers()
                if self.command == "GET":
                    self.wfile.write(data)
                return
            self._error(404, "NotFound", f"no route {self.path}")

    return Handler


@contextmanager
def serve_hub(repos: dict[str, Path], gated: dict[str, str] | None = None) -> Iterator[FakeHub]:
    """Run a FakeHub on 127.0.0.1 for the duration of the block; ``hub.url`` is its endpoint."""
    hub = FakeHub(repos=repos, gated=gated or {})
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(hub))
    hub.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield hub
    finally:
        server.shutdown()
        server.server_close()
