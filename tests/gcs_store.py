"""The storage semantics of the fake GCS (tests/fake_gcs.py): buckets and objects held in memory, with GCS's rules.

`Store` gives the HTTP server (tests/gcs_server.py) GCS's semantics: generations, the `ifGenerationMatch` /
`ifGenerationNotMatch` / metageneration preconditions (412, 304), listing by prefix, delimiter,
`startOffset` / `endOffset` and page tokens, simple and resumable uploads, `rewriteTo` / `copyTo`, deletion.
`Store.read_only` (`FakeGcs.read_only()` sets it) makes the bucket refuse every write (403), as GCS does
to a caller with read access only. Not implemented: object versions, ACLs and IAM, compose, multipart
uploads, bucket creation and changes, CRC32C checksums (answers carry MD5 only). Objects live in the
server process's memory.
"""

import base64
import bisect
import dataclasses
import datetime
import hashlib
import json
import secrets
import threading
import time
import urllib.parse

PRECONDITIONS = ("ifGenerationMatch", "ifGenerationNotMatch", "ifMetagenerationMatch", "ifMetagenerationNotMatch")
SOURCE_PRECONDITIONS = tuple(p.replace("if", "ifSource", 1) for p in PRECONDITIONS)


class GcsError(Exception):
    """An error answer: its HTTP status and message (sent as GCS's JSON error body)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


@dataclasses.dataclass
class _Object:
    data: bytes
    generation: int
    content_type: str
    created: float
    metageneration: int = 1


@dataclasses.dataclass
class Upload:
    """A resumable upload: the server starts it with `Store.start_upload`, `Store.continue_upload` adds to it."""

    bucket: str
    name: str
    content_type: str
    preconditions: dict
    total: int | None  # bytes announced by X-Upload-Content-Length or a Content-Range, if any
    data: bytearray = dataclasses.field(default_factory=bytearray)
    resource: dict | None = None  # the object's resource once the upload is complete


def _rfc3339(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _check_preconditions(obj: _Object | None, preconditions: dict, *, read: bool) -> None:
    """GCS's generation preconditions (generation 0 stands for "no live object").

    Raises:
        GcsError: 412 when one fails; 304 instead for a read whose "not match" condition fails.
    """
    generation = obj.generation if obj else 0
    if "ifGenerationMatch" in preconditions and preconditions["ifGenerationMatch"] != generation:
        raise GcsError(412, "Precondition Failed: ifGenerationMatch")
    if "ifGenerationNotMatch" in preconditions and preconditions["ifGenerationNotMatch"] == generation:
        raise GcsError(304 if read else 412, "Precondition Failed: ifGenerationNotMatch")
    if obj is None:
        return
    if "ifMetagenerationMatch" in preconditions and preconditions["ifMetagenerationMatch"] != obj.metageneration:
        raise GcsError(412, "Precondition Failed: ifMetagenerationMatch")
    if "ifMetagenerationNotMatch" in preconditions and \
            preconditions["ifMetagenerationNotMatch"] == obj.metageneration:
        raise GcsError(304 if read else 412, "Precondition Failed: ifMetagenerationNotMatch")


class Store:
    """The buckets and their objects, with the JSON API's semantics over them. Thread safe."""

    def __init__(self, buckets):
        self.lock = threading.RLock()
        self.buckets = set(buckets)
        self.objects: dict[tuple[str, str], _Object] = {}
        self.uploads: dict[str, Upload] = {}
        self.last_generation = 0
        self.read_only = False

    def _check_writable(self, bucket: str, name: str, permission: str) -> None:
        if self.read_only:
            raise GcsError(403, f"fake-gcs does not have storage.objects.{permission} access to the Google Cloud "
                                f"Storage object {bucket}/{name} (the fake's bucket is read-only).")

    def _check_bucket(self, bucket: str) -> None:
        if bucket not in self.buckets:
            raise GcsError(404, f"The specified bucket does not exist: {bucket}")

    def bucket(self, bucket: str) -> dict:
        with self.lock:
            self._check_bucket(bucket)
        return {"kind": "storage#bucket", "id": bucket, "name": bucket, "location": "US",
                "storageClass": "STANDARD", "metageneration": "1"}

    @staticmethod
    def resource(bucket: str, name: str, obj: _Object) -> dict:
        quoted = urllib.parse.quote(name, safe="")
        return {
            "kind": "storage#object", "id": f"{bucket}/{name}/{obj.generation}",
            "selfLink": f"https://www.googleapis.com/storage/v1/b/{bucket}/o/{quoted}",
            "mediaLink": f"https://storage.googleapis.com/download/storage/v1/b/{bucket}/o/{quoted}"
                         f"?generation={obj.generation}&alt=media",
            "name": name, "bucket": bucket, "generation": str(obj.generation),
            "metageneration": str(obj.metageneration), "contentType": obj.content_type,
            "storageClass": "STANDARD", "size": str(len(obj.data)),
            "md5Hash": base64.b64encode(hashlib.md5(obj.data).digest()).decode(),
            "etag": base64.b64encode(str(obj.generation).encode()).decode(),
            "timeCreated": _rfc3339(obj.created), "updated": _rfc3339(obj.created),
        }

    def get(self, bucket: str, name: str, preconditions: dict) -> _Object:
        with self.lock:
            self._check_bucket(bucket)
            obj = self.objects.get((bucket, name))
            if obj is None:
                if preconditions.get("ifGenerationMatch", 0) != 0:
                    raise GcsError(412, "Precondition Failed: ifGenerationMatch")
                raise GcsError(404, f"No such object: {bucket}/{name}")
            _check_preconditions(obj, preconditions, read=True)
            return obj

    def put(self, bucket: str, name: str, data: bytes, content_type: str, preconditions: dict) -> dict:
        if not name:
            raise GcsError(400, "Required: an object name")
        with self.lock:
            self._check_bucket(bucket)
            self._check_writable(bucket, name, "create")
            _check_preconditions(self.objects.get((bucket, name)), preconditions, read=False)
            # Generations are increasing microsecond timestamps, as GCS's are.
            self.last_generation = max(self.last_generation + 1, time.time_ns() // 1000)
            obj = _Object(bytes(data), self.last_generation, content_type or "application/octet-stream", time.time())
            self.objects[(bucket, name)] = obj
            return self.resource(bucket, name, obj)

    def delete(self, bucket: str, name: str, preconditions: dict) -> None:
        with self.lock:
            self._check_bucket(bucket)
            self._check_writable(bucket, name, "delete")
            obj = self.objects.get((bucket, name))
            if obj is None:
                raise GcsError(404, f"No such object: {bucket}/{name}")
            _check_preconditions(obj, preconditions, read=False)
            del self.objects[(bucket, name)]

    def copy(self, source: tuple[str, str], destination: tuple[str, str], preconditions: dict) -> dict:
        with self.lock:
            source_preconditions = {p: preconditions[s] for p, s in zip(PRECONDITIONS, SOURCE_PRECONDITIONS)
                                    if s in preconditions}
            obj = self.get(*source, {})
            _check_preconditions(obj, source_preconditions, read=False)
            return self.put(*destination, obj.data, obj.content_type,
                            {p: v for p, v in preconditions.items() if p in PRECONDITIONS})

    def list(self, bucket: str, prefix: str, delimiter: str, start: str, end: str, max_results: int,
             page_token: str) -> dict:
        """One page of objects.list: items and common prefixes in name order, at most max_results."""
        with self.lock:
            self._check_bucket(bucket)
            names = sorted(n for b, n in self.objects if b == bucket)
            after, after_is_prefix = json.loads(base64.urlsafe_b64decode(page_token)) if page_token else ("", False)
            items, prefixes, last = [], [], None
            for name in names[bisect.bisect_left(names, max(prefix, start)):]:
                if not name.startswith(prefix) or (end and name >= end):
                    break
                if after and (name <= after or (after_is_prefix and name.startswith(after))):
                    continue
                cut = name.find(delimiter, len(prefix)) if delimiter else -1
                entry = name[:cut + len(delimiter)] if cut >= 0 else name
                if cut >= 0 and last == (entry, True):
                    continue
                if len(items) + len(prefixes) == max_results:
                    token = base64.urlsafe_b64encode(json.dumps(last).encode()).decode()
                    return self._page(bucket, items, prefixes, token)
                (prefixes if cut >= 0 else items).append(entry)
                last = (entry, cut >= 0)
            return self._page(bucket, items, prefixes, None)

    def _page(self, bucket: str, items: list, prefixes: list, token: str | None) -> dict:
        page = {"kind": "storage#objects"}
        if items:
            page["items"] = [self.resource(bucket, n, self.objects[(bucket, n)]) for n in items]
        if prefixes:
            page["prefixes"] = prefixes
        if token:
            page["nextPageToken"] = token
        return page

    def start_upload(self, upload: Upload) -> str:
        with self.lock:
            self._check_bucket(upload.bucket)
            self._check_writable(upload.bucket, upload.name, "create")
            upload_id = secrets.token_urlsafe(12)
            self.uploads[upload_id] = upload
            return upload_id

    def continue_upload(self, upload_id: str, content_range: str | None, body: bytes) -> dict | int:
        """Adds a chunk to a resumable upload; returns the object's resource when the upload is
        complete, else the number of bytes received so far."""
        with self.lock:
            upload = self.uploads.get(upload_id)
            if upload is None:
                raise GcsError(404, f"No such upload session: {upload_id}")
            if upload.resource is not None:
                return upload.resource
            if content_range:  # "bytes FIRST-LAST/TOTAL", "bytes FIRST-LAST/*", or a query "bytes */TOTAL"
                unit, _, spec = content_range.partition(" ")
                span, _, size = spec.partition("/")
                if unit != "bytes" or not span or not size:
                    raise GcsError(400, f"Malformed Content-Range: {content_range}")
                if size != "*":
                    upload.total = int(size)
                if span != "*":
                    first = int(span.split("-")[0])
                    if first != len(upload.data):
                        raise GcsError(400, f"Content-Range starts at {first}; the upload has {len(upload.data)}"
                                            " bytes")
                    upload.data += body
            else:
                upload.data += body
                upload.total = len(upload.data)
            if upload.total is not None and len(upload.data) > upload.total:
                raise GcsError(400, f"The upload has {len(upload.data)} bytes, more than {upload.total}")
            if len(upload.data) == upload.total:
                upload.resource = self.put(upload.bucket, upload.name, bytes(upload.data), upload.content_type,
                                           upload.preconditions)
                return upload.resource
            return len(upload.data)
