"""A fake Google Cloud Storage for tests: the real gs:// client code, objects held in a server's memory.

    with fake_gcs.fake_gcs() as gcs:        # or the `gcs` pytest fixture below (tests/conftest.py
                                            # gives it to every test file)
        train.train_and_evaluate(config, gcs.url("run"))         # "gs://<bucket>/run"

No client library is patched. Each is pointed at the server the way it would be pointed at any GCS
endpoint, by environment variables, which subprocesses inherit:

- TensorFlow's GCS filesystem (`tf.io.gfile`, hence `etils.epath` for gs:// when TensorFlow is installed,
  Grain's iterator checkpoints, Orbax's directories and metadata, clu's metric writers through
  `tf.summary`) has its endpoints https://www.googleapis.com and https://storage.googleapis.com compiled
  in. Its libcurl honours `https_proxy`, and TensorFlow trusts the CA bundle named by `CURL_CA_BUNDLE`.
  The server is that proxy: it accepts CONNECT to the hosts of TLS_HOSTS only, ends TLS with a
  certificate for them signed by a CA made at start, and answers the GCS requests itself.
  TensorFlow authenticates with `GOOGLE_AUTH_TOKEN_FOR_TESTING`.
- TensorStore (Orbax's array data, the `gcs` kvstore driver) takes its endpoint from
  `TENSORSTORE_GCS_HTTP_URL` and talks to the server in plain HTTP, with the same token.
- google-cloud-storage (Orbax asks it whether a bucket has a hierarchical namespace, before listing
  steps and when deleting old ones) uses its default endpoint through the same proxy (`requests` honours
  `https_proxy` and `REQUESTS_CA_BUNDLE`) and the default credentials: an `authorized_user` file named by
  `GOOGLE_APPLICATION_CREDENTIALS`, whose token the server issues at https://oauth2.googleapis.com/token.
- google-cloud-cpp (ArrayRecord's gs:// reads, hence TFDS and Grain over ArrayRecord files) neither
  honours a CA bundle variable nor sends a token to an emulator: it takes the server as its emulator
  (`CLOUD_STORAGE_EMULATOR_ENDPOINT`, plain HTTP) and calls anonymously.
The server answers 401 to a request without the token, except a plain-HTTP one from google-cloud-cpp
(user agent "gl-cpp/...", which only the emulator variable sends here).

It implements the part of the GCS JSON API (and the XML API's object GET that TensorFlow reads with)
that these clients use, with GCS's semantics: generations, the `ifGenerationMatch` /
`ifGenerationNotMatch` / metageneration preconditions (412, 304), byte ranges (206, 416), listing by
prefix, delimiter, `startOffset` / `endOffset` and page tokens, simple and resumable uploads,
`rewriteTo` / `copyTo`, deletion. `FakeGcs.read_only()` makes the bucket refuse every write (403), as
GCS does to a caller with read access only. Not implemented: object versions, ACLs and IAM, compose,
multipart uploads, bucket creation and changes, CRC32C checksums (answers carry MD5 only). A request outside the
subset, or with a query parameter that would change the answer, gets 501; `fake_gcs` fails on exit if
any did, so a client feature the fake lacks cannot pass unnoticed. Objects live in the server process's
memory; its temporary folder (outside the working directory) holds only the CA, the certificate and key,
the credentials file and the server log.

The server runs in its own process (a client in the test process may hold the GIL while it waits for
the answer) and exits when the process that started it closes its stdin or dies.
"""

import base64
import bisect
import contextlib
import dataclasses
import datetime
import hashlib
import http.client
import http.server
import json
import os
import secrets
import select
import shutil
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from typing import Iterator

import pytest
from absl import logging

TOKEN = "fake-gcs-token"
# The hosts the clients call by default: TensorFlow the first two, google-cloud-storage and google-auth
# the last two. CONNECT to any other host is refused (403).
TLS_HOSTS = ("www.googleapis.com", "storage.googleapis.com", "oauth2.googleapis.com")
START_TIMEOUT_S = 30
PAGE_SIZE = 1000  # GCS's largest page of a listing
# Query parameters that change nothing in this server's answers: field masks (answers carry every
# field), billing, pretty printing, and TensorStore's cache-busting nonce.
IGNORED_PARAMS = frozenset({"fields", "prettyPrint", "userProject", "tensorstore", "projection"})
PRECONDITIONS = ("ifGenerationMatch", "ifGenerationNotMatch", "ifMetagenerationMatch", "ifMetagenerationNotMatch")
SOURCE_PRECONDITIONS = tuple(p.replace("if", "ifSource", 1) for p in PRECONDITIONS)
CONTROL_PREFIX = "/_fake/"  # never a bucket: GCS bucket names start with a letter or a digit


@dataclasses.dataclass(frozen=True)
class FakeGcs:
    """A running fake GCS server holding one bucket.

    Attributes:
        bucket: the bucket's name, unique per server (TensorFlow caches stat results by path for a few
            seconds, and Orbax caches bucket metadata by name: two servers must not share names).
        port: the server's port on 127.0.0.1 (plain HTTP, and the CONNECT proxy for TLS).
        env: the environment variables that point the clients at the server. `fake_gcs` sets them in
            `os.environ`; a subprocess given an environment of its own needs them too.
    """

    bucket: str
    port: int
    env: dict

    @property
    def root(self) -> str:
        """The bucket as a URL, "gs://<bucket>"."""
        return f"gs://{self.bucket}"

    def url(self, *parts: str) -> str:
        """Returns "gs://<bucket>/<parts joined by '/'>"."""
        return "/".join([self.root, *parts])

    def _control(self, name: str):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)  # never through a proxy
        try:
            conn.request("GET", f"{CONTROL_PREFIX}{name}")
            return json.load(conn.getresponse())
        finally:
            conn.close()

    def put(self, name: str, data: bytes) -> None:
        """Stores an object directly (a simple upload in plain HTTP, no client library): for seeding the
        bucket with files that the code under test then reads.

        Raises:
            RuntimeError: the server refused the upload (its answer is included).
        """
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            conn.request("POST", f"/upload/storage/v1/b/{self.bucket}/o?uploadType=media&name="
                                 f"{urllib.parse.quote(name, safe='')}", body=data,
                         headers={"Authorization": f"Bearer {TOKEN}"})
            response = conn.getresponse()
            answer = response.read()
            if response.status != 200:
                raise RuntimeError(f"fake GCS: uploading {name} got {response.status}: {answer[:500]!r}")
        finally:
            conn.close()

    def get(self, name: str) -> bytes:
        """An object's content, read directly (plain HTTP, no client library).

        Raises:
            KeyError: no such object.
        """
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            conn.request("GET", f"/storage/v1/b/{self.bucket}/o/{urllib.parse.quote(name, safe='')}?alt=media",
                         headers={"Authorization": f"Bearer {TOKEN}"})
            response = conn.getresponse()
            data = response.read()
            if response.status == 404:
                raise KeyError(name)
            if response.status != 200:
                raise RuntimeError(f"fake GCS: reading {name} got {response.status}: {data[:500]!r}")
            return data
        finally:
            conn.close()

    def put_tree(self, folder: str, prefix: str) -> list[str]:
        """Stores every file under the local `folder` as "<prefix>/<path relative to folder>" (see `put`);
        returns the object names, sorted."""
        names = []
        for parent, _, files in os.walk(folder):
            for file in files:
                path = os.path.join(parent, file)
                names.append(f"{prefix}/{os.path.relpath(path, folder)}")
                with open(path, "rb") as fh:
                    self.put(names[-1], fh.read())
        return sorted(names)

    def objects(self) -> dict[str, int]:
        """The bucket's content as the server holds it: {object name: size in bytes}, sorted by name."""
        return self._control("objects")

    def requests(self) -> list[dict]:
        """Every GCS request served so far, in order, as dicts: `time` (seconds since the epoch),
        `method`, `host` (the CONNECT host for TLS, "" for plain HTTP), `path` and `query` as sent,
        `status`, `range` (the Range header, "" without one) and `user_agent`. The control requests of
        this class are not included."""
        return self._control("requests")

    def reads(self) -> list[tuple[str, int, str]]:
        """The object downloads served so far, in order, by any client and API (the XML API's GET, the
        JSON API's alt=media and /download): (object name, status, Range header or "")."""
        found = []
        for r in self.requests():
            if r["method"] != "GET":
                continue
            path, params = r["path"], urllib.parse.parse_qs(r["query"])
            json_prefix = f"/storage/v1/b/{self.bucket}/o/"
            for prefix in (f"/download{json_prefix}", json_prefix):
                if path.startswith(prefix) and (prefix.startswith("/download") or params.get("alt") == ["media"]):
                    found.append((urllib.parse.unquote(path[len(prefix):]), r["status"], r["range"]))
                    break
            else:
                if r["host"] == "storage.googleapis.com" and path.startswith(f"/{self.bucket}/"):
                    found.append((urllib.parse.unquote(path[len(self.bucket) + 2:]), r["status"], r["range"]))
        return found

    @contextlib.contextmanager
    def read_only(self) -> Iterator[None]:
        """Within the block every write (upload, copy, deletion) gets 403 Forbidden, as from a bucket the
        caller may only read; reads are unaffected."""
        self._control("read_only/on")
        try:
            yield
        finally:
            self._control("read_only/off")


@contextlib.contextmanager
def fake_gcs(allow_unsupported: bool = False) -> Iterator[FakeGcs]:
    """Starts a fake GCS server in a subprocess and points this process's GCS clients at it.

    The variables of `FakeGcs.env` are set in `os.environ` for the duration (subprocesses started inside
    inherit them) and restored on exit; then the server stops and its temporary folder is removed.

    Args:
        allow_unsupported: when False, leaving the block without an exception raises AssertionError if
            any request got 501 (a GCS feature the fake does not implement).

    Yields:
        The running `FakeGcs`; its bucket exists and is empty.

    Raises:
        RuntimeError: the server did not start within START_TIMEOUT_S seconds (its log is included).
        AssertionError: see `allow_unsupported`.
    """
    folder = tempfile.mkdtemp(prefix="fake_gcs_")
    bucket = f"oaml-test-{secrets.token_hex(4)}"
    log_path = os.path.join(folder, "server.log")
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), folder, bucket],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True)
    try:
        ready, _, _ = select.select([proc.stdout], [], [], START_TIMEOUT_S)
        line = proc.stdout.readline() if ready else ""
        if not line:
            proc.kill()
            proc.wait()
            with open(log_path) as fh:
                raise RuntimeError(f"the fake GCS server did not start within {START_TIMEOUT_S} s:\n{fh.read()}")
        port = json.loads(line)["port"]
        credentials = os.path.join(folder, "application_default_credentials.json")
        with open(credentials, "w") as fh:
            json.dump({"type": "authorized_user", "client_id": "fake-gcs", "client_secret": "fake-gcs",
                       "refresh_token": "fake-gcs"}, fh)
        ca_file = os.path.join(folder, "ca.pem")
        no_proxy = "127.0.0.1,localhost,::1"
        env = {
            "https_proxy": f"http://127.0.0.1:{port}", "HTTPS_PROXY": f"http://127.0.0.1:{port}",
            "no_proxy": no_proxy, "NO_PROXY": no_proxy,
            "CURL_CA_BUNDLE": ca_file, "REQUESTS_CA_BUNDLE": ca_file,
            "GOOGLE_AUTH_TOKEN_FOR_TESTING": TOKEN,
            "GOOGLE_APPLICATION_CREDENTIALS": credentials, "GOOGLE_CLOUD_PROJECT": "fake-gcs-project",
            "TENSORSTORE_GCS_HTTP_URL": f"http://127.0.0.1:{port}",
            "CLOUD_STORAGE_EMULATOR_ENDPOINT": f"http://127.0.0.1:{port}",
        }
        server = FakeGcs(bucket=bucket, port=port, env=env)
        saved = {name: os.environ.get(name) for name in env}
        os.environ.update(env)
        try:
            yield server
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
        unsupported = [r for r in server.requests() if r["status"] == 501]
        if unsupported and not allow_unsupported:
            raise AssertionError("the clients sent requests that the fake GCS does not implement:\n" +
                                 "\n".join(f"{r['method']} {r['path']}?{r['query']} ({r['user_agent']})"
                                           for r in unsupported))
    finally:
        proc.stdin.close()  # the server exits when its stdin closes
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def gcs() -> Iterator[FakeGcs]:
    """A fake GCS server with an empty bucket for one test (see `fake_gcs`)."""
    with fake_gcs() as server:
        yield server


# ----------------------------------------------------------------------------------------------------
# The server (runs in the subprocess).


def _write_certificates(folder: str) -> tuple[str, str]:
    """Writes ca.pem (a new CA) to `folder`, and a certificate for TLS_HOSTS signed by it with its key;
    returns the paths of the certificate and the key."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def certificate(subject: str, issuer: str, key, signing_key, is_ca: bool):
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
                   .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(hours=1))
                   .not_valid_after(now + datetime.timedelta(days=2))
                   .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True))
        if is_ca:
            builder = builder.add_extension(
                x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                              data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                              encipher_only=False, decipher_only=False), critical=True)
        else:
            builder = (builder
                       .add_extension(x509.SubjectAlternativeName([x509.DNSName(h) for h in TLS_HOSTS]),
                                      critical=False)
                       .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False))
        return builder.sign(signing_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = "oaml_jax fake GCS test CA"
    files = {
        "ca.pem": certificate(ca_name, ca_name, ca_key, ca_key, is_ca=True),
        "cert.pem": certificate(TLS_HOSTS[0], ca_name, key, ca_key, is_ca=False),
        "key.pem": key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption()),
    }
    for name, data in files.items():
        with open(os.path.join(folder, name), "wb") as fh:
            fh.write(data)
    return os.path.join(folder, "cert.pem"), os.path.join(folder, "key.pem")


class GcsError(Exception):
    """An error answer: its HTTP status and message (sent as GCS's JSON error body)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def _not_implemented(what: str) -> GcsError:
    return GcsError(501, f"not implemented by the fake GCS: {what}")


@dataclasses.dataclass
class _Object:
    data: bytes
    generation: int
    content_type: str
    created: float
    metageneration: int = 1


@dataclasses.dataclass
class _Upload:
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
        self.uploads: dict[str, _Upload] = {}
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

    def start_upload(self, upload: _Upload) -> str:
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


def _preconditions(params: dict) -> dict:
    try:
        return {n: int(params[n]) for n in PRECONDITIONS + SOURCE_PRECONDITIONS if n in params}
    except ValueError as e:
        raise GcsError(400, f"Invalid precondition value: {e}") from None


def _byte_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The first and last byte of a `Range: bytes=...` header (RFC 9110), or None for no header.

    Raises:
        GcsError: 416 when the range starts past the end, 501 for several ranges or another unit.
    """
    if not header:
        return None
    unit, _, spec = header.partition("=")
    if unit.strip() != "bytes" or "," in spec:
        raise _not_implemented(f"Range: {header}")
    first, _, last = spec.strip().partition("-")
    if not first:  # the suffix form, bytes=-N
        if int(last) == 0:
            raise GcsError(416, "Requested range not satisfiable")
        return max(0, size - int(last)), size - 1
    first, last = int(first), min(int(last), size - 1) if last else size - 1
    if first >= size or last < first:
        raise GcsError(416, "Requested range not satisfiable")
    return first, last


class Handler(http.server.BaseHTTPRequestHandler):
    """One client connection: plain HTTP requests, or a CONNECT tunnel and then requests over TLS."""

    protocol_version = "HTTP/1.1"
    server_version = "FakeGcs/1"
    # Small writes (a CONNECT answer, TLS records) must not wait for the client's delayed ACK (40 ms).
    disable_nagle_algorithm = True
    # Set on the subclass that `serve` makes:
    store: Store
    tls_context: ssl.SSLContext
    log: list
    log_lock: threading.Lock
    tls_host = ""

    def log_message(self, format, *args):  # noqa: A002 (the base class's signature)
        logging.debug("%s %s", self.address_string(), format % args)

    def do_CONNECT(self):
        host, _, port = self.path.rpartition(":")
        if host not in TLS_HOSTS or port != "443":
            self._send_error(GcsError(403, f"the fake GCS proxies only {', '.join(TLS_HOSTS)} on port 443"))
            self.close_connection = True
            return
        self.send_response(200, "Connection established")
        self.end_headers()
        try:
            self.connection = self.tls_context.wrap_socket(self.connection, server_side=True)
        except (ssl.SSLError, OSError) as e:
            logging.warning("fake GCS: TLS handshake for %s failed (%s); a client that does not trust the CA of "
                            "CURL_CA_BUNDLE / REQUESTS_CA_BUNDLE?", host, e)
            self.close_connection = True
            return
        self.rfile = self.connection.makefile("rb", self.rbufsize)
        self.wfile = self.connection.makefile("wb")
        self.tls_host = host
        self.close_connection = False

    def handle_expect_100(self):
        # The base class writes "100 Continue" to wfile; in the TLS tunnel wfile is buffered, and curl
        # would wait a second before sending the body anyway.
        ok = super().handle_expect_100()
        self.wfile.flush()
        return ok

    def do_GET(self):
        self._serve()

    do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = do_GET

    # -- plumbing ----------------------------------------------------------------------------------------

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            data = bytearray()
            while size := int(self.rfile.readline().split(b";")[0], 16):
                data += self.rfile.read(size)
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                pass
            return bytes(data)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None,
              content_type: str = "application/json; charset=UTF-8") -> None:
        path, _, query = self.path.partition("?")  # CONNECT's "path" is host:port
        if not path.startswith(CONTROL_PREFIX):
            with self.log_lock:
                self.log.append({"time": time.time(), "method": self.command, "host": self.tls_host,
                                 "path": path, "query": query, "status": status,
                                 "range": self.headers.get("Range", ""),
                                 "user_agent": self.headers.get("User-Agent", "")})
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        if status not in (204, 304):
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD" and status not in (204, 304):
            self.wfile.write(body)

    def _json(self, status: int, obj) -> None:
        self._send(status, json.dumps(obj).encode())

    def _send_error(self, e: GcsError) -> None:
        if e.status == 501:
            logging.warning("fake GCS: %s (%s %s)", e.message, self.command, self.path)
        if e.status == 304:
            return self._send(304)
        self._json(e.status, {"error": {"code": e.status, "message": e.message, "errors": [{"message": e.message}]}})

    def _serve(self):
        url = urllib.parse.urlsplit(self.path)
        try:
            body = self._body()
            if url.path.startswith(CONTROL_PREFIX):
                return self._control(url.path[len(CONTROL_PREFIX):])
            if self.tls_host == "oauth2.googleapis.com":
                if (self.command, url.path) != ("POST", "/token"):
                    raise _not_implemented(f"{self.command} https://oauth2.googleapis.com{url.path}")
                # google-auth refreshing the authorized_user credentials of GOOGLE_APPLICATION_CREDENTIALS.
                return self._json(200, {"access_token": TOKEN, "expires_in": 3600, "token_type": "Bearer"})
            emulated = not self.tls_host and self.headers.get("User-Agent", "").startswith("gl-cpp/")
            if self.headers.get("Authorization") != f"Bearer {TOKEN}" and not emulated:
                raise GcsError(401, "Anonymous caller or unknown token (the fake GCS knows only its TOKEN)")
            params = dict(urllib.parse.parse_qsl(url.query, keep_blank_values=True))
            # Object names are percent-encoded whole in the JSON API, so "/" splits exactly.
            segments = [urllib.parse.unquote(s) for s in url.path.split("/")[1:]]
            if segments[:2] == ["storage", "v1"]:
                self._json_api(segments[2:], params)
            elif segments[:3] == ["upload", "storage", "v1"]:
                self._upload(segments[3:], params, body)
            elif segments[:3] == ["download", "storage", "v1"]:
                self._json_api(segments[3:], dict(params, alt="media"))
            elif self.tls_host == "storage.googleapis.com" and len(segments) >= 2 and self.command in ("GET", "HEAD"):
                # The XML API's object GET, TensorFlow's reads: /<bucket>/<object name, "/" as is or encoded>.
                self._check_params(params, ())
                self._media(segments[0], urllib.parse.unquote(url.path.split("/", 2)[2]), {})
            else:
                raise _not_implemented(f"{self.command} {url.path}")
        except GcsError as e:
            self._send_error(e)

    def _check_params(self, params: dict, supported) -> None:
        unknown = sorted(set(params) - set(supported) - IGNORED_PARAMS)
        if unknown:
            raise _not_implemented(f"query parameters {', '.join(unknown)} of {self.command} {self.path}")

    def _control(self, name: str) -> None:
        if name == "objects":
            with self.store.lock:
                answer = {n: len(o.data) for (_, n), o in sorted(self.store.objects.items())}
        elif name == "requests":
            with self.log_lock:
                answer = list(self.log)
        elif name in ("read_only/on", "read_only/off"):
            with self.store.lock:
                self.store.read_only = answer = name.endswith("on")
        else:
            raise GcsError(404, f"no control endpoint {name}")
        self._json(200, answer)

    # -- the JSON API ------------------------------------------------------------------------------------

    def _json_api(self, rest: list[str], params: dict) -> None:
        """Requests under /storage/v1/: rest is ["b", bucket, ...]."""
        if len(rest) < 2 or rest[0] != "b":
            raise _not_implemented(f"{self.command} {self.path}")
        bucket, rest = rest[1], rest[2:]
        preconditions = _preconditions(params)
        if not rest and self.command == "GET":
            self._check_params(params, ())
            return self._json(200, self.store.bucket(bucket))
        if rest == ["o"] and self.command == "GET":
            self._check_params(params, ("prefix", "delimiter", "startOffset", "endOffset", "maxResults", "pageToken"))
            max_results = min(int(params.get("maxResults") or PAGE_SIZE), PAGE_SIZE)
            return self._json(200, self.store.list(bucket, params.get("prefix", ""), params.get("delimiter", ""),
                                                   params.get("startOffset", ""), params.get("endOffset", ""),
                                                   max_results, params.get("pageToken", "")))
        if len(rest) == 7 and rest[0] == "o" and rest[2] in ("rewriteTo", "copyTo") and rest[3] == "b" and \
                rest[5] == "o" and self.command == "POST":
            self._check_params(params, PRECONDITIONS + SOURCE_PRECONDITIONS)
            resource = self.store.copy((bucket, rest[1]), (rest[4], rest[6]), preconditions)
            if rest[2] == "copyTo":
                return self._json(200, resource)
            return self._json(200, {"kind": "storage#rewriteResponse", "totalBytesRewritten": resource["size"],
                                    "objectSize": resource["size"], "done": True, "resource": resource})
        if len(rest) == 2 and rest[0] == "o" and self.command in ("GET", "HEAD"):
            self._check_params(params, PRECONDITIONS + ("alt",))
            alt = params.get("alt", "json")
            if alt == "media":
                return self._media(bucket, rest[1], preconditions)
            if alt != "json":
                raise _not_implemented(f"alt={alt}")
            obj = self.store.get(bucket, rest[1], preconditions)
            return self._json(200, self.store.resource(bucket, rest[1], obj))
        if len(rest) == 2 and rest[0] == "o" and self.command == "DELETE":
            self._check_params(params, PRECONDITIONS)
            self.store.delete(bucket, rest[1], preconditions)
            return self._send(204)
        raise _not_implemented(f"{self.command} {self.path}")

    def _media(self, bucket: str, name: str, preconditions: dict) -> None:
        obj = self.store.get(bucket, name, preconditions)
        resource = self.store.resource(bucket, name, obj)
        headers = {"x-goog-generation": resource["generation"], "x-goog-metageneration": resource["metageneration"],
                   "x-goog-stored-content-length": resource["size"], "x-goog-hash": f"md5={resource['md5Hash']}",
                   "ETag": f'"{resource["etag"]}"', "Last-Modified": self.date_time_string(obj.created),
                   "Accept-Ranges": "bytes"}
        span = _byte_range(self.headers.get("Range"), len(obj.data))
        if span is None:
            return self._send(200, obj.data, headers, obj.content_type)
        first, last = span
        headers["Content-Range"] = f"bytes {first}-{last}/{len(obj.data)}"
        self._send(206, obj.data[first:last + 1], headers, obj.content_type)

    def _upload(self, rest: list[str], params: dict, body: bytes) -> None:
        """Requests under /upload/storage/v1/: rest is ["b", bucket, "o"]."""
        if len(rest) != 3 or rest[0] != "b" or rest[2] != "o":
            raise _not_implemented(f"{self.command} {self.path}")
        bucket, kind = rest[1], params.get("uploadType")
        if self.command == "POST" and kind == "media":
            self._check_params(params, PRECONDITIONS + ("uploadType", "name"))
            return self._json(200, self.store.put(bucket, params.get("name", ""), body,
                                                  self.headers.get("Content-Type", ""), _preconditions(params)))
        if self.command == "POST" and kind == "resumable":
            self._check_params(params, PRECONDITIONS + ("uploadType", "name"))
            metadata = json.loads(body) if body.strip() else {}
            name = params.get("name") or metadata.get("name", "")
            if not name:
                raise GcsError(400, "Required: an object name")
            total = self.headers.get("X-Upload-Content-Length")
            upload_id = self.store.start_upload(_Upload(
                bucket, name, self.headers.get("X-Upload-Content-Type") or metadata.get("contentType", ""),
                _preconditions(params), int(total) if total else None))
            base = f"https://{self.tls_host}" if self.tls_host else f"http://{self.headers['Host']}"
            location = f"{base}/upload/storage/v1/b/{bucket}/o?uploadType=resumable&upload_id={upload_id}"
            return self._send(200, b"", {"Location": location})
        if self.command == "PUT" and kind == "resumable":
            self._check_params(params, ("uploadType", "upload_id"))
            result = self.store.continue_upload(params.get("upload_id", ""), self.headers.get("Content-Range"), body)
            if isinstance(result, dict):
                return self._json(200, result)
            # 308 "Resume Incomplete", with the bytes received so far.
            return self._send(308, b"", {"Range": f"bytes=0-{result - 1}"} if result else {})
        raise _not_implemented(f"{self.command} upload uploadType={kind}")


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128


def serve(folder: str, bucket: str) -> None:
    """Serves `bucket` on a free port of 127.0.0.1 until stdin closes; writes the CA, certificate and key
    to `folder` and prints {"port": port} once listening."""
    cert_file, key_file = _write_certificates(folder)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_file, key_file)
    context.set_alpn_protocols(["http/1.1"])
    handler = type("BoundHandler", (Handler,), {"store": Store([bucket]), "tls_context": context, "log": [],
                                                "log_lock": threading.Lock()})
    server = _Server(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    print(json.dumps({"port": server.server_address[1]}), flush=True)
    sys.stdin.read()  # returns when the parent closes the pipe or dies
    server.shutdown()


if __name__ == "__main__":
    serve(sys.argv[1], sys.argv[2])
