"""open_storage: the Storage backend a URI names (``file://`` or ``s3://``)."""

from __future__ import annotations

from freshnet.storage import Storage
from freshnet.storage_file import FileStorage
from freshnet.storage_s3 import S3Storage


def open_storage(uri: str) -> Storage:
    """Open ``file://PATH`` (relative paths resolve against the working directory) or ``s3://bucket/prefix``."""
    if uri.startswith("file://"):
        return FileStorage(uri[len("file://") :] or ".")
    if uri.startswith("s3://"):
        return S3Storage.from_uri(uri)  # imports boto3 only when used
    raise ValueError(f"storage: unsupported URI {uri!r}; allowed: file://PATH, s3://BUCKET/PREFIX")
