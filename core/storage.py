"""Object storage behind one interface, with two real backends.

- ``LocalStorage``: files under a root folder (the embedded default, one machine).
- ``S3Storage``: any S3-compatible server through boto3 (AWS, MinIO, Ceph, moto...).

Keys are relative, slash-separated names such as ``inputs/<job id>``; a key that could escape
its root (absolute, ``..``, backslashes, control characters) is refused.
"""

from __future__ import annotations

import logging
import os
import re
import stat
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from core.errors import InputMissing, StorageUnavailable
from core.settings import Settings, StorageSettings

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

logger = logging.getLogger(__name__)

_KEY_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)*$")


class ObjectStorage(Protocol):
    def put(self, key: str, data: bytes, *, content_type: str) -> None: ...

    def get(self, key: str) -> bytes:
        """Raises ``InputMissing`` when there is no such object."""
        ...

    def delete(self, key: str) -> None: ...

    def exists(self, key: str) -> bool: ...

    def presigned_url(self, key: str) -> str | None:
        """A time-limited GET URL, or ``None`` where the backend cannot sign one."""
        ...

    def check(self) -> None:
        """Raise ``StorageUnavailable`` unless the storage answers."""
        ...


def validate_key(key: str) -> str:
    if not _KEY_PATTERN.fullmatch(key) or ".." in key.split("/"):
        raise ValueError(f"invalid storage key {key!r}")
    return key


class LocalStorage:
    """Files under ``root``. A missing object is ``InputMissing``; every other file-system
    failure (the folder unmounted, replaced, full, read-only...) is ``StorageUnavailable``,
    which callers treat as "try again later" rather than as a fault of the job."""

    def __init__(self, root: Path) -> None:
        self._root = root.resolve()
        try:
            self._root.mkdir(parents=True, exist_ok=True)
        except OSError:
            # A process may start during an outage: ``check`` and every call report it then.
            logger.warning("storage folder %s is not usable yet", self._root, exc_info=True)

    def _path(self, key: str) -> Path:
        return self._root / validate_key(key)

    def _root_usable(self) -> bool:
        return self._root.is_dir() and os.access(self._root, os.R_OK | os.W_OK | os.X_OK)

    def _unavailable(self, action: str) -> StorageUnavailable:
        return StorageUnavailable(f"storage folder {self._root} refused the {action}")

    def put(self, key: str, data: bytes, *, content_type: str) -> None:
        path = self._path(key)
        # Never re-create a vanished root: that would hide the outage and make every object
        # written before it look missing.
        if not self._root_usable():
            raise self._unavailable("write")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            _write_atomically(path, data)
        except OSError as exc:
            raise self._unavailable("write") from exc

    def get(self, key: str) -> bytes:
        path = self._path(key)
        try:
            return path.read_bytes()
        except FileNotFoundError as exc:
            # Checked after the failure: only a usable root makes "not there" mean missing.
            if not self._root_usable():
                raise self._unavailable("read") from exc
            raise InputMissing(f"object {key!r} is missing") from exc
        except OSError as exc:
            raise self._unavailable("read") from exc

    def delete(self, key: str) -> None:
        path = self._path(key)
        try:
            path.unlink()
        except FileNotFoundError as exc:
            if not self._root_usable():  # the object may still exist where the root went
                raise self._unavailable("delete") from exc
        except OSError as exc:
            raise self._unavailable("delete") from exc

    def exists(self, key: str) -> bool:
        path = self._path(key)
        try:
            return stat.S_ISREG(path.stat().st_mode)
        except FileNotFoundError as exc:
            if not self._root_usable():
                raise self._unavailable("lookup") from exc
            return False
        except OSError as exc:
            raise self._unavailable("lookup") from exc

    def presigned_url(self, key: str) -> str | None:
        return None

    def check(self) -> None:
        if not self._root_usable():
            raise StorageUnavailable(f"storage folder {self._root} is not usable")


def _write_atomically(path: Path, data: bytes) -> None:
    # Write then rename so that readers never see a half-written object.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        Path(tmp).replace(path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class S3Storage:
    def __init__(self, settings: StorageSettings) -> None:
        self._bucket = settings.s3_bucket
        self._expiry = settings.presign_expiry_seconds
        self._client = _s3_client(settings, settings.s3_endpoint_url)
        self._signer = _s3_client(
            settings, settings.s3_public_endpoint_url or settings.s3_endpoint_url
        )
        if settings.s3_create_bucket:
            self._ensure_bucket(settings.s3_region)

    def _ensure_bucket(self, region: str) -> None:
        try:
            self._client.head_bucket(Bucket=self._bucket)
        except ClientError:
            if region == "us-east-1":
                self._client.create_bucket(Bucket=self._bucket)
            else:
                self._client.create_bucket(
                    Bucket=self._bucket,
                    CreateBucketConfiguration={"LocationConstraint": region},  # type: ignore[typeddict-item]
                )

    def put(self, key: str, data: bytes, *, content_type: str) -> None:
        try:
            self._client.put_object(
                Bucket=self._bucket, Key=validate_key(key), Body=data, ContentType=content_type
            )
        except (BotoCoreError, ClientError) as exc:
            raise StorageUnavailable("object storage refused the write") from exc

    def get(self, key: str) -> bytes:
        try:
            response = self._client.get_object(Bucket=self._bucket, Key=validate_key(key))
            body: bytes = response["Body"].read()
            return body
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in {"NoSuchKey", "404"}:
                raise InputMissing(f"object {key!r} is missing") from exc
            raise StorageUnavailable("object storage refused the read") from exc
        except BotoCoreError as exc:
            raise StorageUnavailable("object storage is unreachable") from exc

    def delete(self, key: str) -> None:
        try:
            self._client.delete_object(Bucket=self._bucket, Key=validate_key(key))
        except (BotoCoreError, ClientError) as exc:
            raise StorageUnavailable("object storage refused the delete") from exc

    def exists(self, key: str) -> bool:
        try:
            self._client.head_object(Bucket=self._bucket, Key=validate_key(key))
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in {"NoSuchKey", "404", "NotFound"}:
                return False
            raise StorageUnavailable("object storage refused the lookup") from exc
        except BotoCoreError as exc:
            raise StorageUnavailable("object storage is unreachable") from exc
        return True

    def presigned_url(self, key: str) -> str | None:
        url: str = self._signer.generate_presigned_url(
            "get_object",
            Params={"Bucket": self._bucket, "Key": validate_key(key)},
            ExpiresIn=self._expiry,
        )
        return url

    def check(self) -> None:
        try:
            self._client.head_bucket(Bucket=self._bucket)
        except (BotoCoreError, ClientError) as exc:
            raise StorageUnavailable(f"bucket {self._bucket!r} is not reachable") from exc


def _s3_client(settings: StorageSettings, endpoint_url: str | None) -> S3Client:
    config = Config(
        region_name=settings.s3_region,
        s3={"addressing_style": settings.s3_addressing_style},
        signature_version="s3v4",
        # Newer botocore adds CRC checksums to every request by default; many S3-compatible
        # servers reject or mishandle them, so only send them when an operation needs one.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        retries={"max_attempts": 3, "mode": "standard"},
        connect_timeout=5,
        read_timeout=30,
    )
    client: S3Client = boto3.client(
        "s3",
        endpoint_url=endpoint_url,
        aws_access_key_id=_secret(settings.s3_access_key_id),
        aws_secret_access_key=_secret(settings.s3_secret_access_key),
        config=config,
    )
    return client


def _secret(value: object) -> str | None:
    get = getattr(value, "get_secret_value", None)
    return get() if callable(get) else None


def build_storage(settings: Settings) -> ObjectStorage:
    if settings.storage.backend == "s3":
        return S3Storage(settings.storage)
    return LocalStorage(settings.storage_root())
