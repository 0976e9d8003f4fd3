"""Publishers of a Space bundle: git (any remote or local path) and Hugging Face, each one commit guarded by the parent."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from freshnet.redact import redact
from freshnet.space.bundle import IMAGE_SUFFIXES, bundle_files

if TYPE_CHECKING:
    from huggingface_hub import HfApi

log = logging.getLogger(__name__)

HF_PREFIX = "hf://spaces/"
GIT_AUTHOR = {
    "GIT_AUTHOR_NAME": "freshnet",
    "GIT_AUTHOR_EMAIL": "freshnet@localhost",
    "GIT_COMMITTER_NAME": "freshnet",
    "GIT_COMMITTER_EMAIL": "freshnet@localhost",
}


class PublishError(RuntimeError):
    """Publishing to the Space failed; nothing was recorded."""


class SpaceMoved(PublishError):
    """The Space's head is not the parent commit the ledger expected: someone else pushed."""


def _git(
    *args: str, cwd: Path | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **GIT_AUTHOR, "GIT_TERMINAL_PROMPT": "0"}
    proc = subprocess.run(["git", *args], cwd=cwd, env=env, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise PublishError(
            redact(f"git {' '.join(args[:2])} failed: {proc.stderr.strip() or proc.stdout.strip()}")
        )
    return proc


def is_local_target(target: str) -> bool:
    return "://" not in target and not (":" in target.split("/")[0] and "@" in target)


class GitPublisher:
    """Any git remote, or a local path (a repo with a checked-out work tree is created there)."""

    branch = "main"

    def __init__(self, target: str):
        self.target = target
        self.local = is_local_target(target)
        self.remote = str(Path(target).resolve()) if self.local else target

    def head(self) -> str | None:
        if (
            self.local
            and not (Path(self.remote) / ".git").exists()
            and not Path(self.remote, "HEAD").exists()
        ):
            return None
        proc = _git("ls-remote", self.remote, f"refs/heads/{self.branch}", check=False)
        if proc.returncode != 0:
            if self.local:
                return None
            raise PublishError(
                redact(f"cannot read the Space at {self.target}: {proc.stderr.strip()}")
            )
        first = proc.stdout.split()
        return first[0] if first else None

    def _ensure_local_repo(self) -> None:
        path = Path(self.remote)
        if (path / ".git").exists() or (path / "HEAD").exists():
            return
        if path.exists() and any(path.iterdir()):
            raise PublishError(
                f"Space path {path} exists, is not empty and is not a git repository"
            )
        path.mkdir(parents=True, exist_ok=True)
        _git("init", "-q", "-b", self.branch, cwd=path)
        # Pushes update the checked-out work tree, so the folder always shows the served files.
        _git("config", "receive.denyCurrentBranch", "updateInstead", cwd=path)
        log.info("created the local Space repository %s", path)

    def publish(self, bundle: Path, message: str, expected_parent: str | None) -> str:
        if self.local:
            self._ensure_local_repo()
        head = self.head()
        with tempfile.TemporaryDirectory(prefix="freshnet-space-") as tmp:
            work = Path(tmp) / "work"
            if head:
                _git("clone", "-q", "--branch", self.branch, self.remote, str(work))
                check_parent(self.target, head, expected_parent)
                _git("rm", "-r", "-q", "--ignore-unmatch", ".", cwd=work)
            else:
                check_parent(self.target, head, expected_parent)
                work.mkdir()
                _git("init", "-q", "-b", self.branch, cwd=work)
                _git("remote", "add", "origin", self.remote, cwd=work)
            for rel in bundle_files(bundle):
                dest = work / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(Path(bundle) / rel, dest)
            _git("add", "-A", cwd=work)
            _git("commit", "-q", "--allow-empty", "-m", message, cwd=work)
            commit = _git("rev-parse", "HEAD", cwd=work).stdout.strip()
            # A plain (non-force) push is refused unless it fast-forwards from the head we built
            # on: the atomic guard against a concurrent publisher.
            push = _git(
                "push", "-q", "origin", f"HEAD:refs/heads/{self.branch}", cwd=work, check=False
            )
            if push.returncode != 0:
                now = self.head()
                if now != head:
                    raise SpaceMoved(
                        redact(
                            f"Space {self.target} moved while publishing: head is now {now}, "
                            f"expected {head}; nothing was recorded, re-run to publish on top of it"
                        )
                    )
                raise PublishError(
                    redact(f"git push to {self.target} failed: {push.stderr.strip()}")
                )
        log.info("published %s to %s", commit[:12], redact(self.target))
        return commit

    def message(self, commit: str) -> str:
        """The full message of ``commit`` (a local repo is read in place, a remote is fetched)."""
        if self.local:
            return _git("log", "-1", "--format=%B", commit, cwd=Path(self.remote)).stdout
        with tempfile.TemporaryDirectory(prefix="freshnet-space-msg-") as tmp:
            _git("init", "-q", tmp)
            _git(
                "fetch", "-q", "--depth=1", self.remote, f"refs/heads/{self.branch}", cwd=Path(tmp)
            )
            fetched = _git("rev-parse", "FETCH_HEAD", cwd=Path(tmp)).stdout.strip()
            if fetched != commit:
                return ""  # the head moved on since: the caller's commit is no longer the head
            return _git("log", "-1", "--format=%B", "FETCH_HEAD", cwd=Path(tmp)).stdout


def check_parent(target: str, head: str | None, expected: str | None) -> str | None:
    """The head to publish on top of, or SpaceMoved.

    Only the exact head the ledger names is built upon. A commit of our own whose ledger entry
    was lost is recorded before this point by the publish path (its intent names it exactly), so
    any other head is someone else's change and is refused.
    """
    if expected is None or head == expected:
        return head
    raise SpaceMoved(
        f"Space {redact(target)} is at {head or 'no commit'}, but the ledger expected {expected}: "
        "someone else changed the Space; inspect it, then roll back or promote explicitly"
    )


class HfPublisher:
    """A Hugging Face Space through huggingface_hub: create_repo + one create_commit guarded by the parent."""

    def __init__(self, repo_id: str, token: str | None = None, endpoint: str | None = None):
        if repo_id.count("/") != 1 or not all(repo_id.split("/")):
            raise PublishError(f"Space id must be 'owner/name', got {repo_id!r}")
        self.repo_id = repo_id
        self._token = token or os.environ.get("HF_TOKEN") or None  # read at run time, never logged
        self.endpoint = endpoint or os.environ.get("HF_ENDPOINT") or None

    def __repr__(self) -> str:
        return f"HfPublisher({self.repo_id!r}, endpoint={self.endpoint!r})"

    def _api(self) -> HfApi:
        from huggingface_hub import HfApi

        return HfApi(endpoint=self.endpoint, token=self._token)

    def head(self) -> str | None:
        from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

        try:
            return self._api().space_info(self.repo_id).sha
        except RepositoryNotFoundError:
            return None
        except HfHubHTTPError as exc:
            raise PublishError(f"cannot read Space {self.repo_id}: {_http_reason(exc)}") from None

    def message(self, commit: str) -> str:
        """Title and message of ``commit`` ("" when the Space has no such commit)."""
        from huggingface_hub.errors import HfHubHTTPError

        try:
            commits = self._api().list_repo_commits(self.repo_id, repo_type="space")
        except HfHubHTTPError as exc:
            raise PublishError(f"cannot read Space {self.repo_id}: {_http_reason(exc)}") from None
        for c in commits:
            if c.commit_id == commit:
                return f"{c.title}\n\n{c.message or ''}"
        return ""

    def publish(self, bundle: Path, message: str, expected_parent: str | None) -> str:
        from huggingface_hub import CommitOperationAdd, CommitOperationDelete
        from huggingface_hub.errors import HfHubHTTPError

        api = self._api()
        try:
            api.create_repo(self.repo_id, repo_type="space", space_sdk="gradio", exist_ok=True)
            info = api.space_info(self.repo_id)
        except HfHubHTTPError as exc:
            raise PublishError(f"Space {self.repo_id}: {_http_reason(exc)}") from None
        base = check_parent(f"hf://spaces/{self.repo_id}", info.sha, expected_parent)
        files = bundle_files(bundle)
        existing = {s.rfilename for s in (info.siblings or [])}
        ops: list[Any] = [CommitOperationAdd(rel, str(Path(bundle) / rel)) for rel in files]
        # Stale files of the previous bundle go; the Hub's own .gitattributes (LFS rules) stays.
        stale = existing - set(files) - {".gitattributes"}
        ops += [CommitOperationDelete(rel) for rel in sorted(stale)]
        try:
            result = api.create_commit(
                self.repo_id,
                ops,
                commit_message=message,
                repo_type="space",
                # The head we just checked: the Hub refuses the commit if anything landed since.
                parent_commit=base or info.sha,
            )
        except HfHubHTTPError as exc:
            status = getattr(exc.response, "status_code", None)
            if status in (409, 412):
                raise SpaceMoved(
                    f"Space {self.repo_id} refused the commit (HTTP {status}): its head is no longer "
                    f"{base or info.sha}; someone else pushed. Nothing was recorded."
                ) from None
            raise PublishError(
                f"Space {self.repo_id}: commit failed: {_http_reason(exc)}"
            ) from None
        log.info("published %s to hf://spaces/%s", result.oid[:12], self.repo_id)
        return result.oid

    def wait_running(self, timeout_s: float = 900.0, poll_s: float = 10.0) -> str:
        """Wait until the Space runtime reports RUNNING; raise on an error stage or timeout."""
        api = self._api()
        deadline = time.monotonic() + timeout_s
        stage = "unknown"
        while time.monotonic() < deadline:
            stage = str(api.get_space_runtime(self.repo_id).stage)
            if stage == "RUNNING":
                return stage
            if "ERROR" in stage:
                raise PublishError(f"Space {self.repo_id} failed to start: stage {stage}")
            time.sleep(poll_s)
        raise PublishError(
            f"Space {self.repo_id} not RUNNING after {timeout_s:.0f} s (stage {stage})"
        )


def _http_reason(exc: Exception) -> str:
    response = getattr(exc, "response", None)
    status = getattr(response, "status_code", "?")
    return f"HTTP {status}: {str(exc).splitlines()[0][:300]}"


def publisher_for(target: str, token: str | None = None) -> GitPublisher | HfPublisher:
    if target.startswith(HF_PREFIX):
        return HfPublisher(target[len(HF_PREFIX) :].strip("/"), token=token)
    if target.startswith("hf://"):
        raise PublishError(f"Space target {redact(target)!r}: use hf://spaces/<owner>/<name>")
    return GitPublisher(target)


def publish(
    bundle: Path, target: str, message: str, expected_parent: str | None, token: str | None = None
) -> str:
    """Push the bundle as one commit to ``target``; return the commit id.

    ``expected_parent``: the head the ledger last saw; None skips the check (first publish).
    ``token``: hf targets only; default HF_TOKEN (a caller with a Prefect Secret passes it here).
    Raises SpaceMoved when the Space's head differs or moves during the push.
    """
    missing = [n for n in ("app.py", "model.pkl", "README.md") if not (Path(bundle) / n).is_file()]
    if missing:
        raise PublishError(f"bundle {bundle} is incomplete: missing {', '.join(missing)}")
    return publisher_for(target, token).publish(Path(bundle), message, expected_parent)


def space_head(target: str, token: str | None = None) -> str | None:
    """The Space's current commit, or None when it has none yet."""
    return publisher_for(target, token).head()


def commit_message(target: str, commit: str, token: str | None = None) -> str:
    """The message of Space commit ``commit`` ("" when the Space does not have it)."""
    return publisher_for(target, token).message(commit)


INTENT_MARK = "[freshnet-intent {}]"


def intent_mark(intent_id: str) -> str:
    """The marker a publish puts in its commit title: the next publish finds its commit by it."""
    return INTENT_MARK.format(intent_id)


def wait_space(
    target: str,
    timeout_s: float = 900.0,
    token: str | None = None,
    canary: Path | None = None,
    app_url: str | None = None,
) -> dict[str, Any]:
    """hf targets: wait for the runtime to reach RUNNING; then, with ``canary``, one prediction.

    The canary goes to ``app_url`` (a served app) or, for hf targets, to the Space itself through
    gradio_client. Returns {"stage", "canary_label"}; raises PublishError on failure.
    """
    pub = publisher_for(target, token)
    stage = pub.wait_running(timeout_s) if isinstance(pub, HfPublisher) else "RUNNING"
    label = None
    if canary is not None:
        src = app_url or (pub.repo_id if isinstance(pub, HfPublisher) else None)
        if src is None:
            raise PublishError(f"no app to send the canary to for {target}: pass app_url")
        from gradio_client import Client, handle_file

        try:
            client = Client(src, token=getattr(pub, "_token", None), verbose=False)
            label = client.predict(handle_file(str(canary)), api_name="/predict")["label"]
        except Exception as exc:  # noqa: BLE001 - any failure to answer is a Space that does not work
            raise PublishError(
                f"canary request to {src} failed: {type(exc).__name__}: {exc}"
            ) from None
    return {"stage": stage, "canary_label": label}


def bundle_inputs_from_space(
    target: str, commit: str, dest: Path, token: str | None = None
) -> tuple[dict[str, Any], list[Path]]:
    """metadata.json and examples/ of the bundle published as ``commit`` (to rebuild it)."""
    dest.mkdir(parents=True, exist_ok=True)
    pub = publisher_for(target, token)
    if isinstance(pub, HfPublisher):
        from huggingface_hub import hf_hub_download

        def fetch(rel: str) -> Path:
            return Path(
                hf_hub_download(
                    pub.repo_id,
                    rel,
                    repo_type="space",
                    revision=commit,
                    local_dir=dest,
                    token=pub._token,
                    endpoint=pub.endpoint,
                )
            )

        meta = json.loads(fetch("metadata.json").read_text())
        examples = [fetch(f"examples/{name}") for name in meta.get("examples", [])]
        return meta, examples
    work = dest / "checkout"
    _git("clone", "-q", "--no-checkout", pub.remote, str(work))
    _git("checkout", "-q", commit, "--", ".", cwd=work)
    meta = json.loads((work / "metadata.json").read_text())
    examples = sorted(
        p for p in (work / "examples").glob("*") if p.suffix.lower() in IMAGE_SUFFIXES
    )
    return meta, examples
