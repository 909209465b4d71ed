"""The ``s3://BUCKET/PREFIX`` store, through boto3.

- create-if-absent: ``PutObject`` with ``If-None-Match: *`` (412 when the key exists);
- compare-and-swap: ``PutObject`` with ``If-Match: <etag>`` (412 when another writer
  moved it; the registry re-reads and retries);
- blobs are checked against their sha256 before upload; big ones go up in parts,
  and ``gc`` aborts the multipart uploads an interrupted push left behind.

The endpoint comes from ``LORABAY_S3_ENDPOINT`` (else boto3's own ``AWS_ENDPOINT_URL``
or AWS itself), credentials and region from the usual AWS variables and files.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from pathlib import Path

from lorabay.hub import faults
from lorabay.hub.errors import (
    InvalidAdapter,
    RegistryUnavailable,
    StoreAccessDenied,
    StoreFailed,
    StoreThrottled,
)
from lorabay.hub.store import MARKER, MARKER_CONTENT, ObjectInfo, PreconditionFailed

CHUNK = 1 << 20
MULTIPART_THRESHOLD = 64 << 20  # bigger blobs go up in parts of this size


def multipart_threshold() -> int:
    return int(os.environ.get("LORABAY_S3_MULTIPART_BYTES") or MULTIPART_THRESHOLD)


def fast_timestamp(value):
    """Timestamps as S3 sends them (ISO 8601 in listings, RFC 822 in headers) parsed by the
    standard library: botocore's dateutil parser took 0.4 s of a 1,000-adapter ``hub list``
    and ~1 ms of every GET. Anything else goes to botocore's."""
    from botocore.utils import parse_timestamp

    if not isinstance(value, str):
        return parse_timestamp(value)
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        try:
            parsed = parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return parse_timestamp(value)
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def fast_botocore():
    """A botocore session whose responses parse timestamps with ``fast_timestamp``."""
    import botocore.session

    session = botocore.session.get_session()
    session.get_component("response_parser_factory").set_parser_defaults(
        timestamp_parser=fast_timestamp
    )
    return session


def error_code(error) -> str:
    response = getattr(error, "response", None) or {}
    return str(response.get("Error", {}).get("Code", ""))


DENIED = {
    "AccessDenied",
    "403",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "AllAccessDisabled",
    "AccountProblem",
    "InvalidToken",
    "ExpiredToken",
    "InvalidObjectState",  # archived (Glacier) objects: readable only after a restore
}
THROTTLED = {
    "SlowDown",
    "503",
    "ServiceUnavailable",
    "Throttling",
    "ThrottlingException",
    "RequestLimitExceeded",
    "TooManyRequests",
    "429",
}


def store_error(url: str, error, key: str = "") -> StoreFailed:
    """One line for an S3 ClientError the caller did not expect, by kind: throttled
    (SlowDown after botocore's retries), denied (credentials, policies, KMS keys), or failed
    (a 500, or any other code), each naming the request, the key and the fix."""
    response = getattr(error, "response", None) or {}
    code = error_code(error)
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    detail = str(response.get("Error", {}).get("Message") or "").strip().splitlines()
    detail = detail[0][:200] if detail else ""
    facts = (url, getattr(error, "operation_name", "request"), key, status, code, detail)
    if code.startswith("KMS.") or "kms" in detail.lower():
        return StoreAccessDenied(
            *facts,
            hint="the credentials may not use the bucket's KMS key: allow kms:Decrypt and "
            "kms:GenerateDataKey for them in the key policy",
        )
    if code in DENIED or status == 403:
        return StoreAccessDenied(
            *facts,
            hint="access denied: check the AWS credentials and the bucket policy "
            "(s3:GetObject, s3:PutObject, s3:DeleteObject, s3:ListBucket on the prefix)",
        )
    if code in THROTTLED or status in (429, 503):
        attempts = response.get("ResponseMetadata", {}).get("RetryAttempts", 0)
        return StoreThrottled(
            *facts,
            hint=f"the store is rate limiting (still after {attempts} retries): retry later, "
            "spread the requests, or raise AWS_MAX_ATTEMPTS",
        )
    if isinstance(status, int) and status >= 500:
        return StoreFailed(
            *facts, hint="the store failed the request: retry; if it persists, check the S3 service"
        )
    return StoreFailed(*facts, hint="the store refused the request; check the bucket's settings")


class S3Store:
    concurrent_reads = 16  # manifests are read in parallel when many are needed
    remote = True  # the registry keeps copies of (immutable) manifests on this machine

    def __init__(self, bucket: str, prefix: str = ""):
        import boto3
        from botocore.config import Config

        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.url = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        self.endpoint = os.environ.get("LORABAY_S3_ENDPOINT") or None
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        self.client = boto3.session.Session(botocore_session=fast_botocore()).client(
            "s3",
            endpoint_url=self.endpoint,
            region_name=region or "us-east-1",
            config=Config(
                retries={"max_attempts": 3, "mode": "standard"},
                connect_timeout=3,
                read_timeout=60,
                max_pool_connections=32,
            ),
        )
        self._exists = False

    def key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    @contextlib.contextmanager
    def _reachable(self, key: str = "") -> Iterator[None]:
        """Turn every transport and S3 failure into one line: RegistryUnavailable, or the
        StoreFailed family for errors the code around it did not handle (see store_error)."""
        from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

        try:
            yield
        except NoCredentialsError:
            raise RegistryUnavailable(
                self.url, "no AWS credentials (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)"
            ) from None
        except ClientError as error:
            if error_code(error) == "NoSuchBucket":
                raise RegistryUnavailable(
                    self.url, f"bucket {self.bucket} does not exist"
                ) from None
            raise store_error(self.url, error, key) from None
        except BotoCoreError as error:
            where = self.endpoint or "AWS S3"
            raise RegistryUnavailable(self.url, f"cannot reach {where}: {error}") from None

    # -- the registry itself --------------------------------------------------------
    def check_reachable(self) -> None:
        from botocore.exceptions import ClientError

        with self._reachable():
            try:
                self.client.head_bucket(Bucket=self.bucket)
            except ClientError as error:
                if error_code(error) in ("404", "NoSuchBucket", "NotFound"):
                    raise RegistryUnavailable(
                        self.url, f"bucket {self.bucket} does not exist (create it first)"
                    ) from None
                raise

    def exists(self) -> bool:
        if not self._exists:
            self._exists = self.has(MARKER)
        return self._exists

    def initialize(self) -> None:
        if not self.exists():
            self.create(MARKER, MARKER_CONTENT)
            self._exists = True

    # -- small objects ---------------------------------------------------------------
    def read_tagged(self, key: str) -> tuple[bytes, str] | None:
        from botocore.exceptions import ClientError

        with self._reachable(key):
            try:
                response = self.client.get_object(Bucket=self.bucket, Key=self.key(key))
            except ClientError as error:
                if error_code(error) in ("NoSuchKey", "404"):
                    return None
                raise
            return response["Body"].read(), response["ETag"]

    def read(self, key: str) -> bytes | None:
        tagged = self.read_tagged(key)
        return None if tagged is None else tagged[0]

    def has(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        with self._reachable(key):
            try:
                self.client.head_object(Bucket=self.bucket, Key=self.key(key))
                return True
            except ClientError as error:
                if error_code(error) in ("404", "NoSuchKey", "NotFound"):
                    return False
                raise

    def _put(self, key: str, data: bytes, **conditions) -> str:
        """PutObject with conditions; PreconditionFailed on 412 (or 409 conflict)."""
        from botocore.exceptions import ClientError

        with self._reachable(key):
            try:
                response = self.client.put_object(
                    Bucket=self.bucket, Key=self.key(key), Body=data, **conditions
                )
            except ClientError as error:
                code = error_code(error)
                if code in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409"):
                    raise PreconditionFailed(key) from None
                if code in ("NoSuchKey", "404") and "IfMatch" in conditions:
                    raise PreconditionFailed(key) from None  # it was deleted meanwhile
                raise
            return response["ETag"]

    def create(self, key: str, data: bytes) -> bool:
        try:
            self._put(key, data, IfNoneMatch="*")
            return True
        except PreconditionFailed:
            return False

    def swap(self, key: str, data: bytes, etag: str | None) -> str:
        if etag is None:
            return self._put(key, data, IfNoneMatch="*")
        return self._put(key, data, IfMatch=etag)

    def delete(self, key: str, etag: str | None = None) -> None:
        from botocore.exceptions import ClientError

        conditions = {} if etag is None else {"IfMatch": etag}
        with self._reachable(key):
            try:
                self.client.delete_object(Bucket=self.bucket, Key=self.key(key), **conditions)
            except ClientError as error:
                if etag is not None and error_code(error) in (
                    "PreconditionFailed",
                    "412",
                    "NoSuchKey",
                    "404",
                ):
                    raise PreconditionFailed(key) from None
                raise

    def list(self, prefix: str) -> list[ObjectInfo]:
        found: list[ObjectInfo] = []
        strip = len(self.key(""))
        with self._reachable(prefix):
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self.key(prefix)
            )
            for page in pages:
                for item in page.get("Contents", []):
                    found.append(
                        ObjectInfo(
                            item["Key"][strip:],
                            item["Size"],
                            item["LastModified"].timestamp(),
                            item.get("ETag", "").strip('"') or None,
                        )
                    )
        return found

    # -- blobs -----------------------------------------------------------------------
    def put_file(self, key: str, source: Path, sha256: str) -> bool:
        if self.touch(key):
            return False
        size = source.stat().st_size
        if size <= multipart_threshold():
            data = source.read_bytes()
            if hashlib.sha256(data).hexdigest() != sha256:
                raise changed_while_pushing(source)
            try:
                self._put(key, data, IfNoneMatch="*")
                return True
            except PreconditionFailed:
                return False  # a concurrent push stored the same bytes
        return self._put_parts(key, source, sha256)

    def touch(self, key: str) -> bool:
        """A copy of the object onto itself (new metadata: S3 refuses a copy that changes
        nothing), which gives it a new LastModified; one request, as the HEAD it replaces.
        An object over CopyObject's 5 GB limit keeps its age (the push's protection does not
        rest on it: upkeep.py)."""
        from botocore.exceptions import ClientError

        with self._reachable(key):
            try:
                self.client.copy_object(
                    Bucket=self.bucket,
                    Key=self.key(key),
                    CopySource={"Bucket": self.bucket, "Key": self.key(key)},
                    MetadataDirective="REPLACE",
                    Metadata={"lorabay-touched": str(int(time.time()))},
                )
                return True
            except ClientError as error:
                if error_code(error) in ("NoSuchKey", "404", "NotFound"):
                    return False
                if error_code(error) in ("InvalidRequest", "EntityTooLarge"):
                    return self.has(key)
                raise

    def _put_parts(self, key: str, source: Path, sha256: str) -> bool:
        """A multipart upload, hashing the parts as they go up; completed only when the
        whole file matched ``sha256`` (else aborted). One killed midway leaves an upload
        that ``gc`` aborts."""
        part_size = max(5 << 20, multipart_threshold())
        with self._reachable(key):
            upload = self.client.create_multipart_upload(Bucket=self.bucket, Key=self.key(key))
            upload_id = upload["UploadId"]
            try:
                digest = hashlib.sha256()
                parts = []
                with open(source, "rb") as handle:
                    while data := handle.read(part_size):
                        digest.update(data)
                        number = len(parts) + 1
                        response = self.client.upload_part(
                            Bucket=self.bucket,
                            Key=self.key(key),
                            UploadId=upload_id,
                            PartNumber=number,
                            Body=data,
                        )
                        parts.append({"PartNumber": number, "ETag": response["ETag"]})
                        faults.checkpoint("s3:part-uploaded")
                if digest.hexdigest() != sha256:
                    raise changed_while_pushing(source)
                self.client.complete_multipart_upload(
                    Bucket=self.bucket,
                    Key=self.key(key),
                    UploadId=upload_id,
                    MultipartUpload={"Parts": parts},
                )
            except BaseException:
                with contextlib.suppress(Exception):
                    self.client.abort_multipart_upload(
                        Bucket=self.bucket, Key=self.key(key), UploadId=upload_id
                    )
                raise
        return True

    def read_chunks(self, key: str) -> Iterator[bytes]:
        yield from self._get(key)

    def read_range(self, key: str, offset: int, length: int) -> Iterator[bytes]:
        yield from self._get(key, Range=f"bytes={offset}-{offset + length - 1}")

    def _get(self, key: str, **extra) -> Iterator[bytes]:
        from botocore.exceptions import ClientError

        with self._reachable(key):
            try:
                response = self.client.get_object(Bucket=self.bucket, Key=self.key(key), **extra)
            except ClientError as error:
                if error_code(error) in ("NoSuchKey", "404"):
                    raise FileNotFoundError(key) from None
                if error_code(error) in ("InvalidRange", "416"):
                    return  # the object is shorter than the range: nothing there
                raise
            yield from response["Body"].iter_chunks(CHUNK)

    # -- leftovers -------------------------------------------------------------------
    def list_temporary(self) -> list[ObjectInfo]:
        """Unfinished multipart uploads under the prefix (a push killed mid-upload)."""
        found = []
        strip = len(self.key(""))
        with self._reachable():
            pages = self.client.get_paginator("list_multipart_uploads").paginate(
                Bucket=self.bucket, Prefix=self.key("")
            )
            for page in pages:
                for upload in page.get("Uploads", []):
                    key = f"{upload['Key'][strip:]}?uploadId={upload['UploadId']}"
                    found.append(ObjectInfo(key, 0, upload["Initiated"].timestamp()))
        return found

    def delete_temporary(self, key: str) -> None:
        name, _, upload_id = key.partition("?uploadId=")
        with self._reachable():
            self.client.abort_multipart_upload(
                Bucket=self.bucket, Key=self.key(name), UploadId=upload_id
            )


def changed_while_pushing(source: Path) -> InvalidAdapter:
    return InvalidAdapter(
        str(source), "changed while it was being pushed", "push again once nothing writes to it"
    )
