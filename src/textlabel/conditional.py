"""Conditional writes of one small object: create it only if absent, replace or delete it only if unchanged.

S3 does this with ``If-None-Match: *`` and ``If-Match: <ETag>`` on PUT (s3fs passes them
through); a local disk with ``O_EXCL`` and a compare-and-swap under ``flock``. The lease
(lease.py) is built on these. A conditional write whose first attempt took effect but
whose answer was lost is retried by botocore and then fails its condition: callers check
whether what is there is what they wrote.
"""

from __future__ import annotations

import fcntl
import os
from typing import Any

from textlabel import storage


class Conflict(Exception):
    """A conditional write found another version than the one it was conditioned on."""


class S3Store:
    """Conditional writes on S3: If-None-Match to create, If-Match on the ETag to replace."""

    def __init__(self, loc: storage.Location):
        self.s3 = storage.fsspec_of(loc.fs)
        self.bucket, _, self.key = loc.path.partition("/")

    def _call(self, method: str, **kwargs: Any) -> Any:
        """One S3 call; a failed precondition (HTTP 412) becomes Conflict."""
        try:
            return self.s3.call_s3(method, Bucket=self.bucket, Key=self.key, **kwargs)
        except FileExistsError:
            raise
        except OSError as exc:
            if "PreconditionFailed" in repr(exc.__cause__) or "pre-conditions" in str(exc):
                raise Conflict(str(exc)) from exc
            raise

    def _put(self, data: bytes, **condition: str) -> str:
        return self._call("put_object", Body=data, **condition)["ETag"]

    def create(self, data: bytes) -> str:
        return self._put(data, IfNoneMatch="*")

    def replace(self, data: bytes, token: str) -> str:
        return self._put(data, IfMatch=token)

    def read(self) -> tuple[bytes, str] | None:
        from fsspec.asyn import sync

        async def get() -> tuple[bytes, str]:
            resp = await self.s3._call_s3("get_object", Bucket=self.bucket, Key=self.key)
            async with resp["Body"] as body:
                return await body.read(), resp["ETag"]

        try:
            return sync(self.s3.loop, get)
        except FileNotFoundError:
            return None

    def delete(self, token: str | None = None) -> None:
        """Delete the object; with ``token``, only if it is still that version (Conflict if not)."""
        try:
            self._call("delete_object", **({"IfMatch": token} if token else {}))
        except FileNotFoundError:
            pass  # gone already


class LocalStore:
    """O_EXCL to create; replace compares the file's identity under an flock on a sidecar file."""

    def __init__(self, loc: storage.Location):
        self.path = loc.path

    @staticmethod
    def _token(st: os.stat_result) -> str:
        return f"{st.st_ino}:{st.st_mtime_ns}:{st.st_size}"

    def create(self, data: bytes) -> str:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
            return self._token(os.fstat(f.fileno()))

    def read(self) -> tuple[bytes, str] | None:
        try:
            with open(self.path, "rb") as f:
                return f.read(), self._token(os.fstat(f.fileno()))
        except FileNotFoundError:
            return None

    def replace(self, data: bytes, token: str) -> str:
        with open(self.path + ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            current = self.read()
            if current is None or current[1] != token:
                raise Conflict(f"{self.path} changed")
            storage.write_bytes(storage.resolve(self.path), data)
            return self._token(os.stat(self.path))

    def delete(self, token: str | None = None) -> None:
        """Delete the file; with ``token``, only if it is still that version (Conflict if not)."""
        if token is not None:
            with open(self.path + ".lock", "a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                current = self.read()
                if current is not None and current[1] != token:
                    raise Conflict(f"{self.path} changed")
                self._unlink()
            return
        self._unlink()

    def _unlink(self) -> None:
        for path in (self.path, self.path + ".lock"):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass


def store_for(loc: storage.Location) -> Any:
    """The conditional-write store of ``loc``: S3Store or LocalStore."""
    return S3Store(loc) if storage.fsspec_of(loc.fs) is not None else LocalStore(loc)
