"""A fake Hugging Face hub: answers the API calls of a push (create_repo + create_commit) and
records every request. In-process through huggingface_hub's own HTTP client (`FakeHub` as an
httpx transport), or for a subprocess on a local HTTP server (`serve`, then HF_ENDPOINT=its URL)."""

from __future__ import annotations

import base64
import importlib
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

_http = importlib.import_module("huggingface_hub.utils._http")
if not hasattr(_http, "set_client_factory"):
    pytest.skip(
        "huggingface_hub < 1.0 sends requests with `requests`; the fake hub needs its httpx client",
        allow_module_level=True,
    )
# The HTTP client package huggingface_hub uses (httpx in 1.x, its fork httpx2 in 2.x).
httpx = importlib.import_module(type(_http.default_client_factory()).__module__.split(".")[0])


class FakeHub:
    """Answers the hub API calls of create_repo + create_commit and records every request."""

    def __init__(self, repo_id: str, fail_status: int | None = None):
        self.repo_id = repo_id
        self.requests: list[httpx.Request] = []
        self.fail_status = fail_status

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        path = request.url.path
        if self.fail_status:
            return httpx.Response(self.fail_status, json={"error": "Invalid credentials in Authorization header"})
        if path == "/api/repos/create":
            return httpx.Response(200, json={"url": f"https://huggingface.co/{self.repo_id}", "name": self.repo_id})
        if path == "/api/validate-yaml":
            return httpx.Response(200, json={"errors": [], "warnings": []})
        if path.endswith("/preupload/main"):
            files = json.loads(request.content)["files"]
            return httpx.Response(
                200,
                json={
                    "files": [
                        {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None} for f in files
                    ]
                },
            )
        if path.endswith("/commit/main"):
            return httpx.Response(
                200,
                json={
                    "commitUrl": f"https://huggingface.co/{self.repo_id}/commit/{'0' * 40}",
                    "commitOid": "0" * 40,
                    "success": True,
                },
            )
        return httpx.Response(404, json={"error": f"unexpected {request.method} {path}"})

    def json_of(self, path_suffix: str) -> dict:
        (request,) = [r for r in self.requests if r.url.path.endswith(path_suffix)]
        return json.loads(request.content)

    def committed_files(self) -> dict[str, bytes]:
        (request,) = [r for r in self.requests if r.url.path.endswith("/commit/main")]
        lines = [json.loads(line) for line in request.content.decode().splitlines()]
        assert lines[0]["key"] == "header"
        return {
            item["value"]["path"]: base64.b64decode(item["value"]["content"])
            for item in lines[1:]
            if item["key"] == "file"
        }


@contextmanager
def serve(fake: FakeHub) -> Iterator[str]:
    """`fake` behind an HTTP server on 127.0.0.1; yields its URL (a hub endpoint)."""

    class Handler(BaseHTTPRequestHandler):
        def _answer(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length") or 0))
            request = httpx.Request(
                self.command,
                f"http://{self.headers['host']}{self.path}",
                headers=dict(self.headers.items()),
                content=body,
            )
            response = fake(request)
            self.send_response(response.status_code)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(response.content)))
            self.end_headers()
            self.wfile.write(response.content)

        do_GET = do_POST = do_PUT = do_HEAD = _answer

        def log_message(self, *args: object) -> None:  # quiet
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
