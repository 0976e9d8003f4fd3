"""S3Storage: the storage contract on S3 (boto3, imported only when used), with conditional writes."""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from freshnet.storage import (
    POINTERS_DIR,
    RESERVED,
    NotFound,
    Storage,
    StorageError,
    check_key,
    check_writable_key,
)

T = TypeVar("T")


def _s3_endpoint_from_env() -> str | None:
    for name in ("FRESHNET_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
        if os.environ.get(name):
            return os.environ[name]
    return None


_CLIENTS: dict[tuple[object, ...], Any] = {}
_CLIENTS_LOCK = threading.Lock()


def _s3_client(
    endpoint_url: str | None, region: str | None, attempts: int, timeout_s: float
) -> Any:
    """A boto3 S3 client, shared per process and settings (building one costs ~0.3 s)."""
    style = os.environ.get("FRESHNET_S3_ADDRESSING_STYLE", "path") if endpoint_url else None
    # Credentials from the environment are part of the key: a changed key must not reuse a client.
    creds = tuple(
        os.environ.get(n) for n in ("AWS_ACCESS_KEY_ID", "AWS_PROFILE", "AWS_SESSION_TOKEN")
    )
    key = (os.getpid(), endpoint_url, region, attempts, timeout_s, style, creds)
    with _CLIENTS_LOCK:
        client = _CLIENTS.get(key)
        if client is None:
            import boto3  # lazily: importing freshnet.storage_open must stay cheap
            from botocore.config import Config as BotoConfig

            conf = BotoConfig(
                retries={"max_attempts": attempts, "mode": "standard"},
                connect_timeout=min(timeout_s, 10.0),
                read_timeout=timeout_s,
                # Custom endpoints (moto, MinIO, an IP address) rarely resolve bucket subdomains.
                s3={"addressing_style": style} if style else None,
                max_pool_connections=32,  # ingest writes images from many threads
            )
            # A Session per client: boto3's default session is not thread-safe to create from.
            client = boto3.session.Session().client(
                "s3", endpoint_url=endpoint_url, region_name=region, config=conf
            )
            _CLIENTS[key] = client
    return client


# S3 error codes meaning "the key is not there" (GET and HEAD answer differently).
_MISSING = {"NoSuchKey", "404", "NotFound"}
# A conditional write lost: the precondition (If-None-Match / If-Match) did not hold.
_PRECONDITION = {"PreconditionFailed", "412"}
# S3 answers 409 when another conditional write on the same key is in flight; retrying resolves it.
_CONFLICT = {"ConditionalRequestConflict", "409"}


class S3Storage(Storage):
    """S3 backend (boto3): the same contract as FileStorage, using S3 conditional writes.

    ``put_if_absent`` is ``PutObject`` with ``If-None-Match: *``; a pointer lives at
    ``<prefix>/_pointers/<name>``, its version token is the object's ETag, and ``swap_pointer``
    is ``PutObject`` with ``If-Match: <etag>`` (or ``If-None-Match: *`` when it must be unset).
    Both are atomic on AWS S3 (since Aug/Nov 2024) and on S3-compatible servers that implement
    conditional writes. The endpoint comes from ``endpoint_url`` or FRESHNET_S3_ENDPOINT_URL /
    AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL; region and credentials from boto3's standard chain.
    """

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        max_attempts: int | None = None,
        timeout_s: float | None = None,
    ):
        if not bucket:
            raise ValueError("s3 storage: empty bucket name; use s3://BUCKET/PREFIX")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.endpoint_url = endpoint_url or _s3_endpoint_from_env()
        self.region = region or os.environ.get("FRESHNET_S3_REGION") or None
        # Few quick retries: a dead endpoint must fail a task fast, Prefect retries the task.
        self.max_attempts = max_attempts or int(os.environ.get("FRESHNET_S3_MAX_ATTEMPTS", "3"))
        self.timeout_s = timeout_s or float(os.environ.get("FRESHNET_S3_TIMEOUT_S", "30"))
        self.uri = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        self.page_size = 1000  # ListObjectsV2 keys per request (S3's maximum)
        self._client_obj: Any = None
        self._client_pid: int | None = None

    @classmethod
    def from_uri(cls, uri: str) -> S3Storage:
        """Open ``s3://BUCKET[/PREFIX]``."""
        if not uri.startswith("s3://"):
            raise ValueError(f"s3 storage: URI must start with s3://, got {uri!r}")
        bucket, _, prefix = uri[len("s3://") :].partition("/")
        if not bucket:
            raise ValueError(f"s3 storage: no bucket in {uri!r}; use s3://BUCKET/PREFIX")
        return cls(bucket, prefix)

    def __getstate__(self) -> dict[str, Any]:
        # A boto3 client is neither picklable nor fork-safe: each process builds its own.
        state = self.__dict__.copy()
        state["_client_obj"] = None
        state["_client_pid"] = None
        return state

    # -- plumbing ---------------------------------------------------------------------------

    @property
    def _where(self) -> str:
        return f"{self.uri} at {self.endpoint_url or 'the AWS S3 default endpoint'}"

    def _client(self) -> Any:
        if self._client_obj is None or self._client_pid != os.getpid():
            self._client_obj = _s3_client(
                self.endpoint_url, self.region, self.max_attempts, self.timeout_s
            )
            self._client_pid = os.getpid()
        return self._client_obj

    def _key(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _pointer_key(self, name: str) -> str:
        return self._key(f"{POINTERS_DIR}/{check_key(name)}")

    @staticmethod
    def _code(exc: Exception) -> str:
        resp = getattr(exc, "response", None) or {}
        err = resp.get("Error") or {}
        code = str(err.get("Code") or "")
        status = str((resp.get("ResponseMetadata") or {}).get("HTTPStatusCode") or "")
        return code or status

    def _call(self, op: str, key: str, fn: Any, **kwargs: Any) -> Any:
        """Run one client call; turn transport and permission failures into StorageError."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn(Bucket=self.bucket, **kwargs)
        except ClientError as exc:
            code = self._code(exc)
            if code in _MISSING or code in _PRECONDITION or code in _CONFLICT:
                raise  # the caller decides what these mean
            if code == "NoSuchBucket":
                raise StorageError(
                    f"s3 storage: bucket {self.bucket!r} does not exist ({self._where}); "
                    "create it (infra/bootstrap.py) or fix the storage URI"
                ) from exc
            raise StorageError(f"s3 storage: {op} {key!r} failed in {self._where}: {exc}") from exc
        except BotoCoreError as exc:
            # Connection refused, timeouts, no credentials, bad endpoint URL, ...
            raise StorageError(f"s3 storage: {op} {key!r} failed, {self._where}: {exc}") from exc

    def _retry_conflicts(self, attempt: Callable[[], T]) -> T:
        """Call ``attempt()``; repeat while S3 reports a concurrent conditional write (409)."""
        from botocore.exceptions import ClientError

        delay = 0.05
        for _ in range(8):
            try:
                return attempt()
            except ClientError as exc:
                if self._code(exc) not in _CONFLICT:
                    raise
                time.sleep(delay)
                delay = min(delay * 2, 1.0)
        return attempt()

    # -- contract ---------------------------------------------------------------------------

    def get(self, key: str) -> bytes:
        from botocore.exceptions import ClientError

        k = self._key(key)
        try:
            resp = self._call("get", key, self._client().get_object, Key=k)
            body: bytes = resp["Body"].read()
            return body
        except ClientError as exc:
            if self._code(exc) in _MISSING:
                raise NotFound(key) from None
            raise StorageError(f"s3 storage: get {key!r} failed in {self._where}: {exc}") from exc

    def put(self, key: str, data: bytes) -> None:
        # A single PutObject is atomic: readers see the old or the new object, never a part.
        check_writable_key(key)
        self._call("put", key, self._client().put_object, Key=self._key(key), Body=data)

    def put_if_absent(self, key: str, data: bytes) -> bool:
        from botocore.exceptions import ClientError

        k = self._key(check_writable_key(key))

        def attempt() -> bool:
            try:
                self._call(
                    "put_if_absent",
                    key,
                    self._client().put_object,
                    Key=k,
                    Body=data,
                    IfNoneMatch="*",
                )
                return True
            except ClientError as exc:
                if self._code(exc) in _PRECONDITION:
                    return False
                raise

        try:
            return self._retry_conflicts(attempt)
        except ClientError as exc:
            raise StorageError(
                f"s3 storage: put_if_absent {key!r} failed in {self._where}: {exc}"
            ) from exc

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self._call("exists", key, self._client().head_object, Key=self._key(key))
            return True
        except ClientError as exc:
            if self._code(exc) in _MISSING:
                return False
            raise StorageError(
                f"s3 storage: exists {key!r} failed in {self._where}: {exc}"
            ) from exc

    def list(self, prefix: str = "") -> list[str]:
        root = f"{self.prefix}/" if self.prefix else ""
        paginator = self._client().get_paginator("list_objects_v2")
        out: list[str] = []
        pages = self._call(
            "list",
            prefix,
            paginator.paginate,
            Prefix=root + prefix,
            PaginationConfig={"PageSize": self.page_size},
        )
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            for page in pages:  # pagination is lazy: errors surface while iterating
                for obj in page.get("Contents", []):
                    key = obj["Key"][len(root) :]
                    if key.split("/", 1)[0] not in RESERVED:
                        out.append(key)
        except ClientError as exc:
            if self._code(exc) == "NoSuchBucket":
                raise StorageError(
                    f"s3 storage: bucket {self.bucket!r} does not exist ({self._where}); "
                    "create it (infra/bootstrap.py) or fix the storage URI"
                ) from exc
            raise StorageError(
                f"s3 storage: list {prefix!r} failed in {self._where}: {exc}"
            ) from exc
        except BotoCoreError as exc:
            raise StorageError(f"s3 storage: list {prefix!r} failed, {self._where}: {exc}") from exc
        return sorted(out)

    def delete(self, key: str) -> None:
        check_writable_key(key)
        self._call("delete", key, self._client().delete_object, Key=self._key(key))

    def read_pointer(self, name: str) -> tuple[bytes | None, str | None]:
        from botocore.exceptions import ClientError

        try:
            resp = self._call(
                "read_pointer", name, self._client().get_object, Key=self._pointer_key(name)
            )
        except ClientError as exc:
            if self._code(exc) in _MISSING:
                return None, None
            raise StorageError(
                f"s3 storage: read_pointer {name!r} failed in {self._where}: {exc}"
            ) from exc
        # Body and ETag come from the same GET, so the token matches the bytes returned.
        return resp["Body"].read(), resp["ETag"]

    def swap_pointer(self, name: str, value: bytes, expected: str | None) -> bool:
        from botocore.exceptions import ClientError

        k = self._pointer_key(name)
        cond = {"IfNoneMatch": "*"} if expected is None else {"IfMatch": expected}

        def attempt() -> bool:
            try:
                self._call(
                    "swap_pointer", name, self._client().put_object, Key=k, Body=value, **cond
                )
                return True
            except ClientError as exc:
                # 412: someone else moved it; 404 (If-Match on a deleted pointer): not what we saw.
                if self._code(exc) in _PRECONDITION or self._code(exc) in _MISSING:
                    return False
                raise

        try:
            return self._retry_conflicts(attempt)
        except ClientError as exc:
            raise StorageError(
                f"s3 storage: swap_pointer {name!r} failed in {self._where}: {exc}"
            ) from exc

    def get_to_file(self, key: str, dest: Path) -> Path:
        """Stream the object to ``dest`` (temp file + rename), for models too big to hold twice."""
        from botocore.exceptions import ClientError

        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            resp = self._call("get", key, self._client().get_object, Key=self._key(key))
        except ClientError as exc:
            if self._code(exc) in _MISSING:
                raise NotFound(key) from None
            raise StorageError(f"s3 storage: get {key!r} failed in {self._where}: {exc}") from exc
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                for chunk in resp["Body"].iter_chunks(1 << 20):
                    f.write(chunk)
            os.replace(tmp, dest)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        return dest

    def presigned_url(self, key: str, expires_s: int = 7 * 24 * 3600) -> str | None:
        """A presigned GET URL (SigV4 allows at most 7 days). It is signed for the host the browser
        uses: FRESHNET_S3_PUBLIC_ENDPOINT_URL when the workers reach S3 by another name."""
        import boto3
        from botocore.config import Config as BotoConfig

        public = os.environ.get("FRESHNET_S3_PUBLIC_ENDPOINT_URL") or self.endpoint_url
        style = os.environ.get("FRESHNET_S3_ADDRESSING_STYLE", "path") if public else None
        # SigV4 explicitly: boto3 may presign with SigV2, which AWS rejects in newer regions.
        conf = BotoConfig(
            signature_version="s3v4", s3={"addressing_style": style} if style else None
        )
        client = boto3.session.Session().client(
            "s3", endpoint_url=public, region_name=self.region, config=conf
        )
        url: str = client.generate_presigned_url(
            "get_object",
            Params={"Bucket": self.bucket, "Key": self._key(key)},
            ExpiresIn=max(1, min(int(expires_s), 7 * 24 * 3600)),
        )
        return url

    def ensure_bucket(self) -> bool:
        """Create the bucket if missing (idempotent); True if this call created it."""
        from botocore.exceptions import ClientError

        client = self._client()
        try:
            self._call("head_bucket", "", client.head_bucket)
            return False
        except ClientError as exc:
            if self._code(exc) not in _MISSING and self._code(exc) != "NoSuchBucket":
                raise StorageError(
                    f"s3 storage: cannot check bucket in {self._where}: {exc}"
                ) from exc
        kwargs: dict[str, Any] = {}
        region = client.meta.region_name
        if region and region != "us-east-1":
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": region}
        try:
            self._call("create_bucket", "", client.create_bucket, **kwargs)
        except StorageError as exc:
            if "BucketAlreadyOwnedByYou" in str(exc):
                return False
            raise
        return True
