"""A local stand-in for the Hugging Face Hub endpoints freshnet's HfPublisher and feedback use.

Real HTTP on 127.0.0.1 (threaded http.server); it records every request so tests can assert on
what the real huggingface_hub client sent. Endpoints (huggingface_hub 2.x), for <kind> spaces
and datasets:
  POST /api/repos/create                       create a Space or dataset (409 if it exists)
  GET  /api/<kind>/<owner>/<name>[/revision/<rev>]   info: sha + siblings
  POST /api/validate-yaml                      README front matter check
  POST /api/<kind>/<id>/preupload/<rev>        upload modes: "regular" for every file (no LFS)
  POST /api/<kind>/<id>/commit/<rev>           ndjson commit; 412 when parentCommit is not the head
  GET  /api/<kind>/<id>/commits/<rev>          the history, newest first
  GET  /api/<kind>/<id>/tree/<rev>[/<path>]    list_repo_tree at any commit, paginated (Link header)
  HEAD/GET /<kind>/<id>/resolve/<rev>/<path>   hf_hub_download (X-Repo-Commit, ETag, size)
  GET  /api/spaces/<id>/runtime                {"stage": "RUNNING", ...}

Tokens: ``token`` is an admin token (every request must carry it, as before). ``grant(token,
"datasets/owner/name", write=...)`` adds a fine-grained token valid for that one repo, as the Hub's
fine-grained tokens are: it cannot create repos (403, which huggingface_hub's create_repo with
exist_ok answers with a repo_info check), a read grant cannot commit (403), and any other repo
is hidden from it (404 RepoNotFound). Without a valid token a private repo answers 401.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, quote, unquote, urlsplit

KINDS = {"spaces": "space", "datasets": "dataset", "models": "model"}
_KIND = r"(spaces|datasets|models)"


@dataclass
class Repo:
    files: dict[str, bytes]
    commits: list[dict] = field(default_factory=list)
    sha: str = ""
    private: bool = False
    # The tree at every commit (the dict is copied per commit, the bytes are shared).
    trees: dict[str, dict[str, bytes]] = field(default_factory=dict)


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass(frozen=True)
class Grant:
    repo: str  # "<kind>/<owner>/<name>"
    write: bool


class HubStandIn:
    def __init__(self, token: str | None = None, page_size: int = 1000) -> None:
        # With a token, every request must carry it (as the Hub does for writes and private
        # Spaces): a missing or wrong one gets 401.
        self.token = token
        self.repos: dict[str, Repo] = {}  # Spaces, by "owner/name"
        self.datasets: dict[str, Repo] = {}  # dataset repos, by "owner/name"
        self.grants: dict[str, Grant] = {}
        self.page_size = page_size  # list_repo_tree entries per page (the Hub's is 1000)
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

    def grant(self, token: str, repo: str, write: bool) -> None:
        """A fine-grained token for one repo, "datasets/owner/name" (read, or read and write)."""
        kind = repo.split("/", 1)[0]
        if kind not in KINDS or repo.count("/") != 2:
            raise ValueError(f"grant: repo must be '<kind>/<owner>/<name>', got {repo!r}")
        self.grants[token] = Grant(repo, write)

    def create_dataset(self, repo_id: str, private: bool = True) -> Repo:
        """A dataset repo made by its owner (on the Hub's website, say)."""
        with self.lock:
            repo = Repo(files={".gitattributes": b"*.jpg filter=lfs diff=lfs merge=lfs -text\n"})
            repo.private = private
            self.datasets[repo_id] = repo
            self._new_commit(repo, "initial commit")
            return repo

    def push_elsewhere(self, repo_id: str) -> str:
        """Someone else commits to the Space (moves its head)."""
        with self.lock:
            repo = self.repos[repo_id]
            repo.files["OTHER.md"] = b"someone else"
            return self._new_commit(repo, "someone else's commit")

    def _table(self, kind: str) -> dict[str, Repo]:
        return self.datasets if kind == "datasets" else self.repos

    def _new_commit(self, repo: Repo, summary: str) -> str:
        digest = hashlib.sha1(
            repo.sha.encode() + summary.encode() + json.dumps(sorted(repo.files)).encode()
        )
        for name in sorted(repo.files):
            digest.update(repo.files[name])
        repo.sha = digest.hexdigest()
        repo.commits.append({"sha": repo.sha, "summary": summary, "files": sorted(repo.files)})
        repo.trees[repo.sha] = dict(repo.files)
        return repo.sha

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        # http.server builds a handler per request and passes it no state: a subclass per
        # stand-in carries this one.
        return type("Handler", (_HubHandler,), {"hub": self})


class _HubHandler(BaseHTTPRequestHandler):
    """The Hub's endpoints, served from the stand-in's repos (``self.hub``)."""

    hub: HubStandIn  # set per stand-in by its _handler()

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
        if self.command != "HEAD":
            self.wfile.write(data)

    def _error(self, status: int, error: str, code: str | None = None) -> None:
        headers = {"X-Error-Message": error}
        if code:
            headers["X-Error-Code"] = code
        self._send(status, {"error": error}, headers)

    def _record(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        self.hub.requests.append(
            Request(
                self.command,
                self.path,
                {k.lower(): v for k, v in self.headers.items()},
                body,
            )
        )
        return body

    def _bearer(self) -> str | None:
        sent = self.headers.get("Authorization") or ""
        return sent.removeprefix("Bearer ") if sent.startswith("Bearer ") else None

    def _denied(self) -> bool:
        """The admin token's check (all requests, when the stand-in has one)."""
        if self.hub.token is None:
            return False
        sent = self._bearer()
        if sent == self.hub.token or (sent in self.hub.grants):
            return False
        error = "Invalid credentials in Authorization header" if sent else "Unauthorized"
        self._error(401, error)
        return True

    def _repo(self, kind: str, repo_id: str, write: bool = False) -> Repo | None:
        """The repo, when this request's token may read it (or write it); else an error
        was sent and None is returned."""
        sent = self._bearer()
        if sent is not None and sent != self.hub.token and sent not in self.hub.grants:
            if self.hub.token is not None or self.hub.grants:
                self._error(401, "Invalid credentials in Authorization header")
                return None
        repo = self.hub._table(kind).get(repo_id)
        grant = self.hub.grants.get(sent) if sent else None
        if grant is not None and grant.repo != f"{kind}/{repo_id}":
            # A fine-grained token sees nothing outside its repo.
            self._not_found()
            return None
        if repo is None:
            self._not_found()
            return None
        if repo.private and sent is None:
            self._error(401, "Unauthorized", "RepoNotFound")
            return None
        if write and grant is not None and not grant.write:
            self._error(
                403,
                f"You don't have the rights to write to {kind}/{repo_id}: this token is read-only",
            )
            return None
        return repo

    def _not_found(self) -> None:
        self._error(404, "Repository not found", "RepoNotFound")

    def _revision(self, repo: Repo, rev: str) -> str | None:
        rev = unquote(rev)
        if rev == "main":
            return repo.sha
        if rev in repo.trees:
            return rev
        self._error(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        return None

    def do_HEAD(self) -> None:
        self._resolve()

    def do_GET(self) -> None:
        if urlsplit(self.path).path.split("/")[1:2] != ["api"]:
            return self._resolve()
        self._record()
        if self._denied():
            return
        path = urlsplit(self.path).path
        if m := re.fullmatch(r"/api/spaces/([^/]+/[^/]+)/runtime", path):
            if m.group(1) not in self.hub.repos:
                return self._not_found()
            return self._send(
                200, {"stage": self.hub.runtime_stage, "hardware": {"current": "cpu-basic"}}
            )
        if m := re.fullmatch(rf"/api/{_KIND}/([^/]+/[^/]+)/commits/[^/]+", path):
            repo = self._repo(m.group(1), m.group(2))
            if repo is None:
                return None
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
        if m := re.fullmatch(rf"/api/{_KIND}/([^/]+/[^/]+)/tree/([^/]+)(/.*)?", path):
            return self._tree(m.group(1), m.group(2), m.group(3), m.group(4))
        if m := re.fullmatch(rf"/api/{_KIND}/([^/]+/[^/]+)(?:/revision/([^/]+))?", path):
            kind, repo_id = m.group(1), m.group(2)
            repo = self._repo(kind, repo_id)
            if repo is None:
                return None
            sha = self._revision(repo, m.group(3) or "main")
            if sha is None:
                return None
            info = {
                "id": repo_id,
                "sha": sha,
                "private": repo.private,
                "siblings": [{"rfilename": n} for n in sorted(repo.trees[sha])],
            }
            if kind == "spaces":
                info["sdk"] = "gradio"
            return self._send(200, info)
        self._send(404, {"error": f"stand-in has no GET {path}"})

    def _tree(self, kind: str, repo_id: str, rev: str, sub: str | None) -> None:
        repo = self._repo(kind, repo_id)
        if repo is None:
            return
        sha = self._revision(repo, rev)
        if sha is None:
            return
        query = parse_qs(urlsplit(self.path).query)
        recursive = query.get("recursive", ["False"])[0].lower() == "true"
        start = int(query.get("cursor", ["0"])[0])
        base = unquote(sub or "").strip("/")
        head = f"{base}/" if base else ""
        entries: dict[str, dict] = {}
        for name, data in sorted(repo.trees[sha].items()):
            if not name.startswith(head):
                continue
            rest = name[len(head) :].split("/")
            # The folders above the file, as the Hub lists them.
            for depth in range(1, len(rest) if recursive else min(2, len(rest))):
                folder = head + "/".join(rest[:depth])
                entries.setdefault(folder, {"type": "directory", "path": folder, "oid": "0" * 40})
            if recursive or len(rest) == 1:
                entries[name] = {
                    "type": "file",
                    "path": name,
                    "size": len(data),
                    "oid": hashlib.sha1(data).hexdigest(),
                }
        if base and not entries:
            return self._error(404, f"{base} does not exist on {rev}", "EntryNotFound")
        listed = sorted(entries.values(), key=lambda e: e["path"])
        page = listed[start : start + self.hub.page_size]
        headers = {}
        if start + self.hub.page_size < len(listed):
            nxt = f"{self.hub.url}{urlsplit(self.path).path}?recursive={recursive}"
            headers["Link"] = f'<{nxt}&cursor={start + self.hub.page_size}>; rel="next"'
        self._send(200, page, headers)

    def _resolve(self) -> None:
        self._record()
        if self._denied():
            return
        path = urlsplit(self.path).path
        m = re.fullmatch(rf"/{_KIND}/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        if not m:
            return self._send(404, {"error": f"stand-in has no {self.command} {path}"})
        repo = self._repo(m.group(1), m.group(2))
        if repo is None:
            return
        sha = self._revision(repo, m.group(3))
        if sha is None:
            return
        name = unquote(m.group(4))
        data = repo.trees[sha].get(name)
        if data is None:
            return self._error(404, f"{name} does not exist", "EntryNotFound")
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("ETag", f'"{hashlib.sha1(data).hexdigest()}"')
        self.send_header("X-Repo-Commit", sha)
        self.end_headers()
        if self.command == "GET":
            self.wfile.write(data)

    def do_POST(self) -> None:
        body = self._record()
        if self._denied():
            return
        path = urlsplit(self.path).path
        if path == "/api/repos/create":
            return self._create(json.loads(body))
        if path == "/api/validate-yaml":
            return self._send(200, {"errors": [], "warnings": []})
        if m := re.fullmatch(rf"/api/{_KIND}/([^/]+/[^/]+)/preupload/[^/]+", path):
            if self._repo(m.group(1), m.group(2), write=True) is None:
                return None
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
        if m := re.fullmatch(rf"/api/{_KIND}/([^/]+/[^/]+)/commit/[^/]+", path):
            return self._commit(m.group(1), m.group(2), body)
        self._send(404, {"error": f"stand-in has no POST {path}"})

    def _create(self, payload: dict) -> None:
        kind = {v: k for k, v in KINDS.items()}.get(payload.get("type") or "model")
        repo_id = f"{payload['organization']}/{payload['name']}"
        sent = self._bearer()
        if sent in self.hub.grants:
            # A fine-grained token for one repo has no right to create repos.
            return self._error(
                403, "You don't have the rights to create a repo under this namespace"
            )
        if self.hub.grants and self.hub.token is None and sent is None:
            return self._error(401, "Unauthorized")
        with self.hub.lock:
            table = self.hub._table(kind)
            if repo_id in table:
                return self._send(
                    409,
                    {
                        "error": f"You already created this {KINDS[kind]} repo",
                        "url": f"{self.hub.url}/{kind}/{repo_id}",
                    },
                )
            if kind == "spaces":
                files = {".gitattributes": b"*.pkl filter=lfs diff=lfs merge=lfs -text\n"}
            else:
                files = {".gitattributes": b"*.jpg filter=lfs diff=lfs merge=lfs -text\n"}
            repo = Repo(files=files)
            repo.private = payload.get("visibility") == "private" or bool(payload.get("private"))
            table[repo_id] = repo
            self.hub._new_commit(repo, "initial commit")
        self._send(200, {"url": f"{self.hub.url}/{kind}/{repo_id}"})

    def _commit(self, kind: str, repo_id: str, body: bytes) -> None:
        lines = [json.loads(ln) for ln in body.splitlines() if ln.strip()]
        header = lines[0]["value"]
        with self.hub.lock:
            repo = self._repo(kind, repo_id, write=True)
            if repo is None:
                return
            parent = header.get("parentCommit")
            if parent and parent != repo.sha:
                return self._send(
                    412,
                    {"error": "A commit has happened since. Please refresh and try again."},
                )
            files = dict(repo.files)
            for item in lines[1:]:
                value = item["value"]
                if item["key"] == "file":
                    files[value["path"]] = base64.b64decode(value["content"])
                elif item["key"] == "deletedFile":
                    files.pop(value["path"], None)
                else:
                    return self._send(400, {"error": f"stand-in cannot handle {item['key']}"})
            repo.files = files
            sha = self.hub._new_commit(repo, header["summary"])
        prefix = "" if kind == "models" else f"{kind}/"
        self._send(
            200,
            {
                "success": True,
                "commitOid": sha,
                "commitUrl": f"{self.hub.url}/{prefix}{quote(repo_id)}/commit/{sha}",
            },
        )
