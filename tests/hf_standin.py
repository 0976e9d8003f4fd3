"""A local stand-in for the few Hugging Face Hub endpoints freshnet's HfPublisher calls.

Real HTTP on 127.0.0.1 (threaded http.server); it records every request so tests can assert on
what the real huggingface_hub client sent. Endpoints (huggingface_hub 2.x):
  POST /api/repos/create                       create a Space (409 if it exists)
  GET  /api/spaces/<owner>/<name>              info: sha + siblings
  POST /api/validate-yaml                      README front matter check
  POST /api/spaces/<id>/preupload/<rev>        upload modes: "regular" for every file (no LFS)
  POST /api/spaces/<id>/commit/<rev>           ndjson commit; 412 when parentCommit is not the head
  GET  /api/spaces/<id>/runtime                {"stage": "RUNNING", ...}
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Repo:
    files: dict[str, bytes]
    commits: list[dict] = field(default_factory=list)
    sha: str = ""


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


class HubStandIn:
    def __init__(self, token: str | None = None) -> None:
        # With a token, every request must carry it (as the Hub does for writes and private
        # Spaces): a missing or wrong one gets 401.
        self.token = token
        self.repos: dict[str, Repo] = {}
        self.requests: list[Request] = []
        self.runtime_stage = "RUNNING"
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        # A short poll interval: shutdown() waits for it (0.5 s by default, per test).
        self.thread = threading.Thread(
            target=lambda: self.server.serve_forever(poll_interval=0.05), daemon=True
        )

    def __enter__(self) -> HubStandIn:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def paths(self) -> list[str]:
        return [f"{r.method} {r.path.split('?')[0]}" for r in self.requests]

    def push_elsewhere(self, repo_id: str) -> str:
        """Someone else commits to the Space (moves its head)."""
        with self.lock:
            repo = self.repos[repo_id]
            repo.files["OTHER.md"] = b"someone else"
            return self._new_commit(repo, "someone else's commit")

    def _new_commit(self, repo: Repo, summary: str) -> str:
        digest = hashlib.sha1(
            repo.sha.encode() + summary.encode() + json.dumps(sorted(repo.files)).encode()
        )
        for name in sorted(repo.files):
            digest.update(repo.files[name])
        repo.sha = digest.hexdigest()
        repo.commits.append({"sha": repo.sha, "summary": summary, "files": sorted(repo.files)})
        return repo.sha

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:  # keep test output quiet
                pass

            def _send(self, status: int, body: object, headers: dict | None = None) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def _record(self) -> bytes:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                hub.requests.append(
                    Request(
                        self.command,
                        self.path,
                        {k.lower(): v for k, v in self.headers.items()},
                        body,
                    )
                )
                return body

            def _denied(self) -> bool:
                if hub.token is None:
                    return False
                sent = self.headers.get("Authorization")
                if sent == f"Bearer {hub.token}":
                    return False
                error = "Invalid credentials in Authorization header" if sent else "Unauthorized"
                self._send(401, {"error": error}, {"X-Error-Message": error})
                return True

            def do_GET(self) -> None:
                self._record()
                if self._denied():
                    return
                path = self.path.split("?")[0]
                if m := re.fullmatch(r"/api/spaces/([^/]+/[^/]+)/runtime", path):
                    if m.group(1) not in hub.repos:
                        return self._not_found()
                    return self._send(
                        200, {"stage": hub.runtime_stage, "hardware": {"current": "cpu-basic"}}
                    )
                if m := re.fullmatch(r"/api/spaces/([^/]+/[^/]+)/commits/[^/]+", path):
                    repo = hub.repos.get(m.group(1))
                    if repo is None:
                        return self._not_found()
                    return self._send(
                        200,
                        [
                            {
                                "id": c["sha"],
                                "authors": [{"user": "alice"}],
                                "date": "2026-11-27T00:00:00.000Z",
                                "title": c["summary"],
                                "message": c["summary"],
                            }
                            for c in reversed(repo.commits)
                        ],
                    )
                if m := re.fullmatch(r"/api/spaces/([^/]+/[^/]+)", path):
                    repo = hub.repos.get(m.group(1))
                    if repo is None:
                        return self._not_found()
                    return self._send(
                        200,
                        {
                            "id": m.group(1),
                            "sha": repo.sha,
                            "sdk": "gradio",
                            "siblings": [{"rfilename": n} for n in sorted(repo.files)],
                        },
                    )
                self._send(404, {"error": f"stand-in has no GET {path}"})

            def _not_found(self) -> None:
                self._send(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})

            def do_POST(self) -> None:
                body = self._record()
                if self._denied():
                    return
                path = self.path.split("?")[0]
                if path == "/api/repos/create":
                    payload = json.loads(body)
                    repo_id = f"{payload['organization']}/{payload['name']}"
                    with hub.lock:
                        if repo_id in hub.repos:
                            return self._send(
                                409,
                                {
                                    "error": "You already created this space repo",
                                    "url": f"{hub.url}/spaces/{repo_id}",
                                },
                            )
                        repo = Repo(
                            files={".gitattributes": b"*.pkl filter=lfs diff=lfs merge=lfs -text\n"}
                        )
                        hub.repos[repo_id] = repo
                        hub._new_commit(repo, "initial commit")
                    return self._send(200, {"url": f"{hub.url}/spaces/{repo_id}"})
                if path == "/api/validate-yaml":
                    return self._send(200, {"errors": [], "warnings": []})
                if m := re.fullmatch(r"/api/spaces/([^/]+/[^/]+)/preupload/[^/]+", path):
                    if m.group(1) not in hub.repos:
                        return self._not_found()
                    files = json.loads(body)["files"]
                    return self._send(
                        200,
                        {
                            "files": [
                                {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                for f in files
                            ]
                        },
                    )
                if m := re.fullmatch(r"/api/spaces/([^/]+/[^/]+)/commit/[^/]+", path):
                    return self._commit(m.group(1), body)
                self._send(404, {"error": f"stand-in has no POST {path}"})

            def _commit(self, repo_id: str, body: bytes) -> None:
                lines = [json.loads(ln) for ln in body.splitlines() if ln.strip()]
                header = lines[0]["value"]
                with hub.lock:
                    repo = hub.repos.get(repo_id)
                    if repo is None:
                        return self._not_found()
                    parent = header.get("parentCommit")
                    if parent and parent != repo.sha:
                        return self._send(
                            412,
                            {"error": "A commit has happened since. Please refresh and try again."},
                        )
                    for item in lines[1:]:
                        value = item["value"]
                        if item["key"] == "file":
                            repo.files[value["path"]] = base64.b64decode(value["content"])
                        elif item["key"] == "deletedFile":
                            repo.files.pop(value["path"], None)
                        else:
                            return self._send(
                                400, {"error": f"stand-in cannot handle {item['key']}"}
                            )
                    sha = hub._new_commit(repo, header["summary"])
                self._send(
                    200,
                    {
                        "success": True,
                        "commitOid": sha,
                        "commitUrl": f"{hub.url}/spaces/{repo_id}/commit/{sha}",
                    },
                )

        return Handler
