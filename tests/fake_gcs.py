"""A fake Google Cloud Storage for tests: the real gs:// client code, objects held in a server's memory.

    with fake_gcs.fake_gcs() as gcs:        # or the `gcs` pytest fixture below (tests/conftest.py
                                            # gives it to every test file)
        train.train_and_evaluate(config, gcs.url("run"))         # "gs://<bucket>/run"

This module is the tests' side: it starts the server (tests/gcs_server.py, over the storage semantics
of tests/gcs_store.py) and points the clients at it. No client library is patched. Each is pointed at
the server the way it would be pointed at any GCS endpoint, by environment variables, which subprocesses
inherit:

- TensorFlow's GCS filesystem (`tf.io.gfile`, hence `etils.epath` for gs:// when TensorFlow is installed,
  Grain's iterator checkpoints, Orbax's directories and metadata, clu's metric writers through
  `tf.summary`) has its endpoints https://www.googleapis.com and https://storage.googleapis.com compiled
  in. Its libcurl honours `https_proxy`, and TensorFlow trusts the CA bundle named by `CURL_CA_BUNDLE`.
  The server is that proxy: it accepts CONNECT to the hosts of `gcs_server.TLS_HOSTS` only, ends TLS with a
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

The server implements the part of the GCS API that these clients use, with GCS's semantics (see
tests/gcs_store.py for what is and is not implemented). `FakeGcs.read_only()` makes the bucket refuse
every write (403), as GCS does to a caller with read access only. A request outside the subset gets 501;
`fake_gcs` fails on exit if any did, so a client feature the fake lacks cannot pass unnoticed. The
server's temporary folder (outside the working directory) holds only the CA, the certificate and key,
the credentials file and the server log.

The server runs in its own process (a client in the test process may hold the GIL while it waits for
the answer) and exits when the process that started it closes its stdin or dies.
"""

import contextlib
import dataclasses
import http.client
import json
import os
import secrets
import select
import shutil
import subprocess
import sys
import tempfile
import urllib.parse
from typing import Iterator

import pytest

import gcs_server

START_TIMEOUT_S = 30


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
            conn.request("GET", f"{gcs_server.CONTROL_PREFIX}{name}")
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
                         headers={"Authorization": f"Bearer {gcs_server.TOKEN}"})
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
                         headers={"Authorization": f"Bearer {gcs_server.TOKEN}"})
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
        proc = subprocess.Popen([sys.executable, os.path.abspath(gcs_server.__file__), folder, bucket],
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
            "GOOGLE_AUTH_TOKEN_FOR_TESTING": gcs_server.TOKEN,
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
