"""The ``/v1/files`` store (Replicate's clients upload inputs there before they run a model).

Metadata lives in Redis with a TTL, the bytes in object storage under ``files/<id>``; a file
belongs to the API key that uploaded it and is found only by that key (or an admin). Object
storage has no TTL of its own: once the metadata has expired the file cannot be used, and its
bytes stay until a bucket lifecycle rule on ``files/`` (or the operator) removes them.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from datetime import datetime, timedelta
from typing import Any

from pydantic import BaseModel
from redis import Redis

from core.errors import JobNotFound, UploadTooLarge
from core.jobs import utcnow
from core.redis_conn import text
from core.storage import ObjectStorage


class FileNotFound(JobNotFound):
    """A subclass of the job error so that it maps to 404 like it (app/errors.py)."""

    title = "File not found"


class StoredFile(BaseModel):
    id: str
    name: str
    content_type: str
    size: int
    sha256: str
    owner: str
    created_at: datetime
    expires_at: datetime
    metadata: dict[str, Any] = {}

    @property
    def key(self) -> str:
        return storage_key(self.id)


def storage_key(file_id: str) -> str:
    return f"files/{file_id}"


def is_file_id(value: str) -> bool:
    return len(value) == 32 and all(c in "0123456789abcdef" for c in value)


class FileStore:
    def __init__(
        self,
        connection: Redis,
        storage: ObjectStorage,
        *,
        prefix: str,
        ttl_seconds: int,
        max_bytes: int,
    ) -> None:
        self._redis = connection
        self._storage = storage
        self._prefix = prefix
        self._ttl_seconds = ttl_seconds
        self._max_bytes = max_bytes

    def _key(self, file_id: str) -> str:
        return f"{self._prefix}:file:{file_id}"

    def create(
        self,
        data: bytes,
        *,
        name: str,
        content_type: str,
        owner: str,
        metadata: dict[str, Any] | None = None,
    ) -> StoredFile:
        """Store the bytes first, then the metadata: a file is never listed without bytes."""
        if len(data) > self._max_bytes:
            raise UploadTooLarge(f"The file is larger than the limit of {self._max_bytes} bytes.")
        now = utcnow()
        stored = StoredFile(
            id=uuid.uuid4().hex,
            name=name[:255] or "file",
            content_type=content_type[:255] or "application/octet-stream",
            size=len(data),
            sha256=hashlib.sha256(data).hexdigest(),
            owner=owner,
            created_at=now,
            expires_at=now + timedelta(seconds=self._ttl_seconds),
            metadata=metadata or {},
        )
        self._storage.put(stored.key, data, content_type=stored.content_type)
        self._redis.set(self._key(stored.id), stored.model_dump_json(), ex=self._ttl_seconds)
        return stored

    def get(self, file_id: str, *, owner: str, admin: bool = False) -> StoredFile:
        """The file's metadata; another key's file is "not found", not "forbidden": its
        existence is not the caller's business."""
        raw = self._redis.get(self._key(file_id)) if is_file_id(file_id) else None
        if raw is None:
            raise FileNotFound(f"No file with id {file_id!r} (it may have expired).")
        stored = StoredFile.model_validate(json.loads(text(raw)))
        if stored.owner != owner and not admin:
            raise FileNotFound(f"No file with id {file_id!r} (it may have expired).")
        return stored

    def read(self, stored: StoredFile) -> bytes:
        return self._storage.get(stored.key)

    def delete(self, stored: StoredFile) -> None:
        self._redis.delete(self._key(stored.id))
        self._storage.delete(stored.key)
