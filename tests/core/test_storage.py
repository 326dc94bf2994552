"""Both storage backends through the same interface; S3 over HTTP against moto's server."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import boto3
import httpx
import pytest

from core.errors import InputMissing, StorageUnavailable
from core.settings import Settings, StorageSettings
from core.storage import LocalStorage, ObjectStorage, S3Storage, build_storage, validate_key


def _s3(endpoint: str, bucket: str, **extra: object) -> S3Storage:
    return S3Storage(
        StorageSettings(
            backend="s3",
            s3_endpoint_url=endpoint,
            s3_bucket=bucket,
            s3_access_key_id="testing",
            s3_secret_access_key="testing",
            s3_create_bucket=True,
            **extra,
        )
    )


@pytest.fixture(params=["local", "s3"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> ObjectStorage:
    if request.param == "local":
        return LocalStorage(tmp_path / "store")
    endpoint = request.getfixturevalue("s3_endpoint")
    return _s3(endpoint, f"roundtrip-{abs(hash(str(tmp_path))) % 10**8}")


def test_put_get_exists_delete_roundtrip(storage: ObjectStorage) -> None:
    storage.check()
    storage.put("inputs/abc", b"\x00\x01payload", content_type="image/png")
    assert storage.exists("inputs/abc")
    assert storage.get("inputs/abc") == b"\x00\x01payload"
    storage.put("inputs/abc", b"second", content_type="image/png")
    assert storage.get("inputs/abc") == b"second"
    storage.delete("inputs/abc")
    assert not storage.exists("inputs/abc")
    with pytest.raises(InputMissing):
        storage.get("inputs/abc")
    storage.delete("inputs/abc")  # deleting twice is fine


@contextmanager
def replaced_by_a_file(root: Path) -> Iterator[Path]:
    """A storage outage that holds even for root (tests run as root, so chmod would not do):
    the folder is moved away and a regular file takes its place, then both are undone."""
    away = root.with_name(root.name + ".away")
    root.rename(away)
    try:
        root.write_bytes(b"not a folder")
        yield away
    finally:
        root.unlink(missing_ok=True)
        away.rename(root)


def test_local_storage_outage_is_unavailable_not_missing(tmp_path: Path) -> None:
    root = tmp_path / "store"
    storage = LocalStorage(root)
    storage.put("inputs/kept", b"before", content_type="image/png")
    with replaced_by_a_file(root):
        calls = {
            "put": lambda: storage.put("inputs/new", b"x", content_type="image/png"),
            "get": lambda: storage.get("inputs/kept"),
            "get a missing key": lambda: storage.get("inputs/never-written"),
            "delete": lambda: storage.delete("inputs/kept"),
            "exists": lambda: storage.exists("inputs/kept"),
            "check": storage.check,
        }
        for name, call in calls.items():
            with pytest.raises(StorageUnavailable):
                call()
                pytest.fail(f"{name} did not raise")
    assert storage.get("inputs/kept") == b"before"  # nothing was lost or re-created
    assert not storage.exists("inputs/new")


def test_a_vanished_root_is_unavailable_and_not_recreated(tmp_path: Path) -> None:
    root = tmp_path / "store"
    storage = LocalStorage(root)
    storage.put("inputs/kept", b"before", content_type="image/png")
    root.rename(tmp_path / "elsewhere")  # e.g. an unmounted volume
    with pytest.raises(StorageUnavailable):
        storage.get("inputs/kept")  # not InputMissing: the job must not fail for it
    with pytest.raises(StorageUnavailable):
        storage.delete("inputs/kept")
    with pytest.raises(StorageUnavailable):
        storage.put("inputs/new", b"x", content_type="image/png")
    assert not root.exists()  # writing did not hide the outage behind a fresh, empty folder
    (tmp_path / "elsewhere").rename(root)
    assert storage.get("inputs/kept") == b"before"


def test_other_file_system_errors_are_unavailable(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "store")
    (tmp_path / "store" / "inputs").write_bytes(b"a file where a folder belongs")
    with pytest.raises(StorageUnavailable):
        storage.put("inputs/a", b"x", content_type="image/png")
    with pytest.raises(StorageUnavailable):
        storage.get("inputs/a")
    with pytest.raises(InputMissing):  # the root is fine: a missing object is just missing
        storage.get("results/never-written.png")
    assert not storage.exists("results/never-written.png")


def test_local_storage_made_during_an_outage_works_once_it_is_back(tmp_path: Path) -> None:
    root = tmp_path / "store"
    root.write_bytes(b"not a folder")
    storage = LocalStorage(root)  # a worker starting during the outage does not crash
    with pytest.raises(StorageUnavailable):
        storage.check()
    root.unlink()
    root.mkdir()
    storage.check()
    storage.put("inputs/a", b"x", content_type="image/png")
    assert storage.get("inputs/a") == b"x"


@pytest.mark.parametrize(
    "key", ["../etc/passwd", "/abs", "a/../../b", "a//b", "", "a\\b", "inputs/\x00", ".hidden"]
)
def test_keys_that_could_escape_their_prefix_are_refused(key: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        validate_key(key)
    with pytest.raises(ValueError):
        LocalStorage(tmp_path).put(key, b"x", content_type="text/plain")


def test_s3_presigned_url_is_fetchable_and_expires(s3_endpoint: str) -> None:
    storage = _s3(s3_endpoint, "presign-bucket", presign_expiry_seconds=120)
    storage.put("results/x.png", b"result-bytes", content_type="image/png")
    url = storage.presigned_url("results/x.png")
    assert url is not None and "X-Amz-Expires=120" in url
    response = httpx.get(url)
    assert response.status_code == 200
    assert response.content == b"result-bytes"


def test_s3_presigns_for_the_public_endpoint(s3_endpoint: str) -> None:
    storage = _s3(s3_endpoint, "public-bucket", s3_public_endpoint_url="https://cdn.example.com")
    url = storage.presigned_url("results/y.png")
    assert url is not None
    assert url.startswith("https://cdn.example.com/public-bucket/results/y.png?")  # path-style


def test_s3_objects_are_real_objects_in_the_bucket(s3_endpoint: str) -> None:
    storage = _s3(s3_endpoint, "wire-bucket")
    storage.put("inputs/job1", b"abc", content_type="image/webp")
    client = boto3.client(
        "s3",
        endpoint_url=s3_endpoint,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
    )
    head = client.head_object(Bucket="wire-bucket", Key="inputs/job1")
    assert head["ContentType"] == "image/webp"
    assert head["ContentLength"] == 3


def test_unreachable_s3_is_storage_unavailable() -> None:
    storage = S3Storage(
        StorageSettings(
            backend="s3",
            s3_endpoint_url="http://127.0.0.1:9",
            s3_access_key_id="x",
            s3_secret_access_key="y",
        )
    )
    with pytest.raises(StorageUnavailable):
        storage.check()
    with pytest.raises(StorageUnavailable):
        storage.put("inputs/a", b"x", content_type="image/png")


def test_build_storage_picks_the_configured_backend(tmp_path: Path) -> None:
    local = build_storage(Settings(var_dir=tmp_path))
    assert isinstance(local, LocalStorage)
    local.put("results/a.png", b"1", content_type="image/png")
    assert (tmp_path / "storage" / "results" / "a.png").read_bytes() == b"1"
