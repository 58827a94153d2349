"""The fake GCS's HTTP server (tests/fake_gcs.py starts it: `python tests/gcs_server.py <folder> <bucket>`).

It answers the part of the GCS JSON API (and the XML API's object GET that TensorFlow reads with) that
the clients use, over the buckets of a `gcs_store.Store`: object GETs with byte ranges (206, 416),
listings, simple and resumable uploads, `rewriteTo` / `copyTo`, deletion. A request outside the subset,
or with a query parameter that would change the answer, gets 501. It is also the clients' `https_proxy`:
it accepts CONNECT to the hosts of TLS_HOSTS only, ends TLS with a certificate for them signed by a CA
made at start (written to <folder> with the key), and answers the GCS requests and google-auth's token
requests itself. A request without TOKEN gets 401, except google-cloud-cpp's (tests/fake_gcs.py says
why). Paths under CONTROL_PREFIX let the harness read what the server holds and was asked, and switch
the bucket to read-only.

The server exits when the process that started it closes its stdin or dies.
"""

import datetime
import http.server
import json
import os
import ssl
import sys
import threading
import time
import urllib.parse

from absl import logging

from gcs_store import PRECONDITIONS, SOURCE_PRECONDITIONS, GcsError, Store, Upload

TOKEN = "fake-gcs-token"
# The hosts the clients call by default: TensorFlow the first two, google-cloud-storage and google-auth
# the last two. CONNECT to any other host is refused (403).
TLS_HOSTS = ("www.googleapis.com", "storage.googleapis.com", "oauth2.googleapis.com")
PAGE_SIZE = 1000  # GCS's largest page of a listing
# Query parameters that change nothing in this server's answers: field masks (answers carry every
# field), billing, pretty printing, and TensorStore's cache-busting nonce.
IGNORED_PARAMS = frozenset({"fields", "prettyPrint", "userProject", "tensorstore", "projection"})
CONTROL_PREFIX = "/_fake/"  # never a bucket: GCS bucket names start with a letter or a digit


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


def _not_implemented(what: str) -> GcsError:
    return GcsError(501, f"not implemented by the fake GCS: {what}")


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
            upload_id = self.store.start_upload(Upload(
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
