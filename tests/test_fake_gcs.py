"""The fake GCS (tests/fake_gcs.py, gcs_server.py, gcs_store.py): its GCS semantics, and the real gs:// clients running
against it."""

import http.client
import json
import os
import ssl
import subprocess
import sys
import urllib.parse

import pytest

import fake_gcs
import gcs_server


@pytest.fixture(scope="module")
def server():
    with fake_gcs.fake_gcs(allow_unsupported=True) as gcs:
        yield gcs


def call(gcs, method, path, body=b"", headers=None, token=gcs_server.TOKEN):
    """One plain-HTTP request to the server; returns (status, headers, body bytes)."""
    conn = http.client.HTTPConnection("127.0.0.1", gcs.port, timeout=30)
    try:
        headers = dict(headers or {})
        if token:
            headers["Authorization"] = f"Bearer {token}"
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        return response.status, response.headers, response.read()
    finally:
        conn.close()


def o(gcs, name, query=""):
    """The JSON API path of an object (name percent-encoded whole, as the clients send it)."""
    path = f"/storage/v1/b/{gcs.bucket}/o/{urllib.parse.quote(name, safe='')}"
    return f"{path}?{query}" if query else path


def upload(gcs, name, data, query=""):
    path = f"/upload/storage/v1/b/{gcs.bucket}/o?uploadType=media&name={urllib.parse.quote(name, safe='')}"
    return call(gcs, "POST", path + (f"&{query}" if query else ""), data)


def test_upload_then_read_whole_and_by_byte_range(server):
    status, _, body = upload(server, "range/ten", b"0123456789")
    resource = json.loads(body)
    assert status == 200 and resource["name"] == "range/ten" and resource["size"] == "10"
    status, headers, body = call(server, "GET", o(server, "range/ten", "alt=media"))
    assert (status, body, headers["x-goog-generation"]) == (200, b"0123456789", resource["generation"])
    for header, expected_body, content_range in (("bytes=2-4", b"234", "bytes 2-4/10"),
                                                 ("bytes=7-", b"789", "bytes 7-9/10"),
                                                 ("bytes=-3", b"789", "bytes 7-9/10"),
                                                 ("bytes=8-100", b"89", "bytes 8-9/10")):
        status, headers, body = call(server, "GET", o(server, "range/ten", "alt=media"), headers={"Range": header})
        assert (status, body, headers["Content-Range"]) == (206, expected_body, content_range), header
    assert call(server, "GET", o(server, "range/ten", "alt=media"), headers={"Range": "bytes=10-"})[0] == 416
    status, _, metadata = call(server, "GET", o(server, "range/ten"))
    assert status == 200 and json.loads(metadata)["md5Hash"] == "eB5eJF1ptWaXm4bijSPyxw=="  # md5("0123456789")


def test_generation_preconditions(server):
    first = json.loads(upload(server, "gen/x", b"v1")[2])["generation"]
    assert upload(server, "gen/x", b"again", "ifGenerationMatch=0")[0] == 412  # 0: "must not exist"
    assert upload(server, "gen/x", b"v2", "ifGenerationMatch=1")[0] == 412
    second = json.loads(upload(server, "gen/x", b"v2", f"ifGenerationMatch={first}")[2])["generation"]
    assert int(second) > int(first)
    assert call(server, "GET", o(server, "gen/x", f"alt=media&ifGenerationNotMatch={second}"))[0] == 304
    assert call(server, "GET", o(server, "gen/x", f"alt=media&ifGenerationMatch={first}"))[0] == 412
    assert call(server, "GET", o(server, "gen/x", f"alt=media&ifGenerationNotMatch={first}"))[2] == b"v2"
    assert call(server, "GET", o(server, "gen/missing", "alt=media"))[0] == 404
    assert call(server, "GET", o(server, "gen/missing", "alt=media&ifGenerationMatch=5"))[0] == 412
    assert call(server, "DELETE", o(server, "gen/x", f"ifGenerationMatch={first}"))[0] == 412
    assert call(server, "DELETE", o(server, "gen/x", f"ifGenerationMatch={second}"))[0] == 204
    assert call(server, "GET", o(server, "gen/x"))[0] == 404
    assert call(server, "DELETE", o(server, "gen/x"))[0] == 404
    assert upload(server, "gen/x", b"v3", "ifGenerationMatch=0")[0] == 200


def _list(gcs, **params):
    query = urllib.parse.urlencode(params)
    status, _, body = call(gcs, "GET", f"/storage/v1/b/{gcs.bucket}/o?{query}")
    assert status == 200, body
    page = json.loads(body)
    return [item["name"] for item in page.get("items", [])], page.get("prefixes", []), page.get("nextPageToken")


def _list_all(gcs, **params):
    items, prefixes, token, pages = [], [], None, 0
    while True:
        page_items, page_prefixes, token = _list(gcs, **params, **({"pageToken": token} if token else {}))
        items, prefixes, pages = items + page_items, prefixes + page_prefixes, pages + 1
        if not token:
            return items, prefixes, pages


def test_list_by_prefix_delimiter_offsets_and_pages(server):
    names = ["ls/a/1", "ls/a/2", "ls/a/b/3", "ls/a/b/4", "ls/c", "ls/d/", "ls/e"]
    for name in names:
        upload(server, name, b"x")
    assert _list(server, prefix="ls/") == (names, [], None)
    assert _list(server, prefix="ls/", delimiter="/") == (["ls/c", "ls/e"], ["ls/a/", "ls/d/"], None)
    assert _list(server, prefix="ls/a/", delimiter="/") == (["ls/a/1", "ls/a/2"], ["ls/a/b/"], None)
    assert _list(server, prefix="ls/d/", delimiter="/") == (["ls/d/"], [], None)  # the directory marker itself
    # TensorStore lists key ranges: startOffset inclusive, endOffset exclusive.
    assert _list(server, startOffset="ls/a/2", endOffset="ls/d/")[0] == ["ls/a/2", "ls/a/b/3", "ls/a/b/4", "ls/c"]
    # One entry per page gives the same answer; a page ending on a common prefix skips the names under it.
    assert _list_all(server, prefix="ls/", maxResults=1) == (names, [], len(names))
    assert _list_all(server, prefix="ls/", delimiter="/", maxResults=1) == (["ls/c", "ls/e"], ["ls/a/", "ls/d/"], 4)
    assert _list_all(server, prefix="ls/a/", delimiter="/", maxResults=2) == (["ls/a/1", "ls/a/2"], ["ls/a/b/"], 2)


def test_resumable_upload_in_chunks(server):
    path = f"/upload/storage/v1/b/{server.bucket}/o?uploadType=resumable&name=resumable%2Fobj"
    status, headers, _ = call(server, "POST", path, headers={"X-Upload-Content-Length": "6"})
    session = urllib.parse.urlsplit(headers["Location"])
    assert status == 200 and session.netloc == f"127.0.0.1:{server.port}"
    session = f"{session.path}?{session.query}"
    status, headers, _ = call(server, "PUT", session, b"abc", {"Content-Range": "bytes 0-2/6"})
    assert (status, headers["Range"]) == (308, "bytes=0-2")
    status, headers, _ = call(server, "PUT", session, b"", {"Content-Range": "bytes */6"})  # a status query
    assert (status, headers["Range"]) == (308, "bytes=0-2")
    assert call(server, "PUT", session, b"zz", {"Content-Range": "bytes 1-2/6"})[0] == 400  # not where it left off
    status, _, body = call(server, "PUT", session, b"def", {"Content-Range": "bytes 3-5/6"})
    assert status == 200 and json.loads(body)["size"] == "6"
    assert call(server, "GET", o(server, "resumable/obj", "alt=media"))[2] == b"abcdef"


def test_rewrite_and_copy_keep_the_source(server):
    upload(server, "cp/src", b"payload")
    status, _, body = call(server, "POST", o(server, "cp/src") + "/rewriteTo/b/" + server.bucket + "/o/cp%2Fdst")
    answer = json.loads(body)
    assert status == 200 and answer["done"] is True and answer["resource"]["name"] == "cp/dst"
    status, _, body = call(server, "POST", o(server, "cp/src") + "/copyTo/b/" + server.bucket + "/o/cp%2Fdst2")
    assert status == 200 and json.loads(body)["name"] == "cp/dst2"
    for name in ("cp/src", "cp/dst", "cp/dst2"):
        assert call(server, "GET", o(server, name, "alt=media"))[2] == b"payload"
    assert call(server, "POST", o(server, "cp/none") + "/rewriteTo/b/" + server.bucket + "/o/cp%2Fx")[0] == 404


def test_put_get_and_put_tree(server, tmp_path):
    server.put("seed/x", b"\x00seed")
    assert server.get("seed/x") == b"\x00seed"
    with pytest.raises(KeyError, match="seed/none"):
        server.get("seed/none")
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "c.txt").write_bytes(b"c")
    (tmp_path / "d.txt").write_bytes(b"dd")
    assert server.put_tree(str(tmp_path), "tree") == ["tree/a/b/c.txt", "tree/d.txt"]
    tree = {n: s for n, s in server.objects().items() if n.startswith("tree/")}
    assert tree == {"tree/a/b/c.txt": 1, "tree/d.txt": 2}
    with server.read_only(), pytest.raises(RuntimeError, match="uploading seed/y got 403"):
        server.put("seed/y", b"y")


def test_read_only_refuses_every_write_and_serves_reads(server):
    upload(server, "ro/kept", b"kept")
    with server.read_only():
        assert upload(server, "ro/new", b"x")[0] == 403
        assert upload(server, "ro/kept", b"overwritten")[0] == 403
        resumable = f"/upload/storage/v1/b/{server.bucket}/o?uploadType=resumable&name=ro%2Fnew"
        assert call(server, "POST", resumable)[0] == 403
        assert call(server, "POST", o(server, "ro/kept") + "/rewriteTo/b/" + server.bucket + "/o/ro%2Fcopy")[0] == 403
        status, _, body = call(server, "DELETE", o(server, "ro/kept"))
        assert status == 403 and "storage.objects.delete" in json.loads(body)["error"]["message"]
        assert call(server, "GET", o(server, "ro/kept", "alt=media"))[2] == b"kept"
    assert {n: s for n, s in server.objects().items() if n.startswith("ro/")} == {"ro/kept": 4}
    assert upload(server, "ro/new", b"x")[0] == 200


def test_reads_lists_downloads_by_every_api(server):
    upload(server, "rd/a b", b"0123456789")
    before = len(server.reads())
    call(server, "GET", o(server, "rd/a b", "alt=media"), headers={"Range": "bytes=2-4"})
    call(server, "GET", o(server, "rd/a b"))  # metadata: not a download
    call(server, "GET", f"/download/storage/v1/b/{server.bucket}/o/rd%2Fa%20b?alt=media")
    call(server, "GET", o(server, "rd/none", "alt=media"))
    assert server.reads()[before:] == [("rd/a b", 206, "bytes=2-4"), ("rd/a b", 200, ""), ("rd/none", 404, "")]
    assert server.requests()[-1]["range"] == ""


def test_answers_401_to_other_tokens_and_404_to_other_buckets(server):
    assert call(server, "GET", o(server, "any"), token=None)[0] == 401
    assert call(server, "GET", o(server, "any"), token="another")[0] == 401
    assert call(server, "GET", "/storage/v1/b/no-such-bucket/o")[0] == 404
    assert call(server, "GET", f"/storage/v1/b/{server.bucket}")[0] == 200


def test_tls_tunnel_to_google_hosts_only(server):
    upload(server, "tls/obj", b"through the tunnel")
    context = ssl.create_default_context(cafile=server.env["CURL_CA_BUNDLE"])
    conn = http.client.HTTPSConnection("127.0.0.1", server.port, context=context, timeout=30)
    conn.set_tunnel("storage.googleapis.com", 443)  # the certificate must match the host name
    # The XML API's object GET, with which TensorFlow reads.
    conn.request("GET", f"/{server.bucket}/tls%2Fobj", headers={"Authorization": f"Bearer {gcs_server.TOKEN}",
                                                                "Range": "bytes=4-10"})
    response = conn.getresponse()
    assert (response.status, response.read()) == (206, b"ugh the")
    conn.close()
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.set_tunnel("example.com", 443)
    with pytest.raises(OSError, match="403"):
        conn.request("GET", "/")
    conn.close()
    assert [(r["method"], r["host"], r["path"], r["status"]) for r in server.requests()[-2:]] == [
        ("GET", "storage.googleapis.com", f"/{server.bucket}/tls%2Fobj", 206), ("CONNECT", "", "example.com:443", 403)]
    assert server.reads()[-1] == ("tls/obj", 206, "bytes=4-10")


def test_unimplemented_requests_get_501_and_fail_the_block():
    with pytest.raises(AssertionError, match=r"does not implement:\nGET /storage/v1/b/.*/o\?versions=true"):
        with fake_gcs.fake_gcs() as gcs:
            assert call(gcs, "GET", f"/storage/v1/b/{gcs.bucket}/o?versions=true")[0] == 501
            assert call(gcs, "POST", f"/storage/v1/b/{gcs.bucket}/o/x/compose")[0] == 501


def test_environment_is_set_inside_and_restored_after():
    before = dict(os.environ)
    with fake_gcs.fake_gcs() as gcs:
        assert all(os.environ[k] == v for k, v in gcs.env.items())
        assert gcs.env["TENSORSTORE_GCS_HTTP_URL"] == f"http://127.0.0.1:{gcs.port}"
        assert os.path.isfile(gcs.env["CURL_CA_BUNDLE"]) and gcs.objects() == {}
    assert dict(os.environ) == before
    with pytest.raises(OSError):
        http.client.HTTPConnection("127.0.0.1", gcs.port, timeout=5).request("GET", "/")
    assert not os.path.exists(gcs.env["CURL_CA_BUNDLE"])


# The clients, in a fresh process that inherits the fixture's environment. It prints its findings as
# JSON; the test checks them against known answers and against what the server holds and was asked.
CLIENTS_SCRIPT = r"""
import json
import sys

import grain
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
import tensorflow as tf
from clu import metric_writers
from etils import epath

root = epath.Path(sys.argv[1])
out = {}

# etils.epath (tf.io.gfile underneath).
base = root / "epath"
(base / "sub" / "deep").mkdir(parents=True)
(base / "sub" / "a.txt").write_text("hello")
(base / "sub" / "b.bin").write_bytes(bytes(range(256)) * 4)
with (base / "sub" / "b.bin").open("rb") as f:  # random access, as the RecordIO reader does
    f.seek(300)
    seek_read = list(f.read(4))
listing = sorted(p.name for p in (base / "sub").iterdir())
(base / "sub" / "a.txt").rename(base / "sub" / "c.txt")
out["epath"] = {
    "read_text": (base / "sub" / "c.txt").read_text(),
    "bytes_equal": (base / "sub" / "b.bin").read_bytes() == bytes(range(256)) * 4,
    "seek_read": seek_read,
    "exists": [(base / "sub" / "c.txt").exists(), (base / "sub" / "a.txt").exists(), (base / "none").exists()],
    "is_dir": [(base / "sub").is_dir(), (base / "sub" / "deep").is_dir(), (base / "sub" / "c.txt").is_dir()],
    "listdir": listing,
    "glob": sorted(str(p) for p in base.glob("sub/*.bin")),
}

# Orbax: async CheckpointManager, StandardSave of a jax pytree and JsonSave, max_to_keep.
tree = {"w": jnp.arange(12, dtype=jnp.float32).reshape(3, 4), "b": {"c": jnp.arange(5, dtype=jnp.int32)}}
options = ocp.CheckpointManagerOptions(max_to_keep=2, enable_async_checkpointing=True)
with ocp.CheckpointManager(root / "ckpt", options=options) as manager:
    for step in range(3):
        manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(jax.tree.map(lambda x: x + step, tree)),
            meta=ocp.args.JsonSave({"step": step, "epoch": 10 + step})))
    manager.wait_until_finished()
with ocp.CheckpointManager(root / "ckpt") as manager:
    restored = manager.restore(manager.latest_step(), args=ocp.args.Composite(
        state=ocp.args.StandardRestore(jax.tree.map(jnp.zeros_like, tree)), meta=ocp.args.JsonRestore()))
    out["orbax"] = {"steps": list(manager.all_steps()), "w": restored.state["w"].tolist(),
                    "c": restored.state["b"]["c"].tolist(), "meta": restored.meta}

# Grain: a MapDataset iterator checkpointed with grain.checkpoint.CheckpointSave, resumed in a new iterator.
dataset = grain.MapDataset.range(100).shuffle(seed=3).map(lambda x: 2 * x)
iterator = iter(dataset)
head = [int(next(iterator)) for _ in range(7)]
with ocp.CheckpointManager(root / "data") as manager:
    manager.save(7, args=grain.checkpoint.CheckpointSave(iterator))
    manager.wait_until_finished()
expected = [int(next(iterator)) for _ in range(5)]
resumed = iter(dataset)
with ocp.CheckpointManager(root / "data") as manager:
    manager.restore(7, args=grain.checkpoint.CheckpointRestore(resumed))
out["grain"] = {"head": head, "expected": expected, "resumed": [int(next(resumed)) for _ in range(5)]}

# clu's metric writer (tf.summary event files), read back with TensorFlow.
writer = metric_writers.create_default_writer(str(root / "train"))
for step in range(3):
    writer.write_scalars(step, {"loss": 1.0 / (step + 1)})
writer.flush()
writer.close()
scalars = []
for name in tf.io.gfile.glob(str(root / "train" / "events.out.tfevents.*")):
    for record in tf.data.TFRecordDataset(name):
        event = tf.compat.v1.Event.FromString(record.numpy())
        scalars += [[int(event.step), v.tag, float(tf.make_ndarray(v.tensor))] for v in event.summary.value]
out["clu"] = scalars

print(json.dumps(out))
"""


@pytest.mark.slow
def test_clients_in_a_fresh_process_write_only_to_the_fake(gcs, tmp_path):
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    proc = subprocess.run([sys.executable, "-c", CLIENTS_SCRIPT, gcs.root], cwd=workdir, env=dict(os.environ),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-6000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])

    assert out["epath"] == {
        "read_text": "hello", "bytes_equal": True, "seek_read": [44, 45, 46, 47],  # bytes 300..303 = 300 % 256..
        "exists": [True, False, False], "is_dir": [True, True, False], "listdir": ["a.txt", "b.bin", "deep"],
        "glob": [gcs.url("epath/sub/b.bin")]}
    assert out["orbax"] == {"steps": [1, 2], "w": [[2.0 + 4 * i + j for j in range(4)] for i in range(3)],
                            "c": [2, 3, 4, 5, 6], "meta": {"step": 2, "epoch": 12}}
    assert out["grain"]["resumed"] == out["grain"]["expected"] != out["grain"]["head"][:5]
    assert len(set(out["grain"]["head"] + out["grain"]["expected"])) == 12
    assert [s[:2] for s in out["clu"]] == [[0, "loss"], [1, "loss"], [2, "loss"]]
    assert [s[2] for s in out["clu"]] == pytest.approx([1.0, 0.5, 1 / 3])

    # Everything went to the bucket; nothing to local disk ("./gs:/..." was the old failure).
    assert list(workdir.iterdir()) == []
    objects = gcs.objects()
    assert {"epath/sub/c.txt", "epath/sub/b.bin", "epath/sub/deep/", "data/7/default/process_0-of-1.json",
            "ckpt/2/meta/metadata", "ckpt/2/state/manifest.ocdbt"} <= set(objects)
    assert "epath/sub/a.txt" not in objects and not any(name.startswith("ckpt/0/") for name in objects)
    assert any(name.startswith("ckpt/1/state/ocdbt.process_0/d/") for name in objects)
    assert sum(name.startswith("train/events.out.tfevents.") for name in objects) == 1

    # Each client took its real gs:// path: TensorFlow through the TLS proxy, TensorStore in plain HTTP,
    # google-cloud-storage (Orbax's bucket check) through the proxy after fetching a token with google-auth.
    requests = gcs.requests()
    assert not [r for r in requests if r["status"] == 401 or r["status"] >= 500]
    clients = {(r["user_agent"].split("/")[0].split(" ")[0], r["host"], r["method"]) for r in requests}
    assert {("TSL", "www.googleapis.com", "POST"), ("TSL", "www.googleapis.com", "PUT"),
            ("TSL", "storage.googleapis.com", "GET"), ("tensorstore", "", "POST"), ("tensorstore", "", "GET"),
            ("python-requests", "oauth2.googleapis.com", "POST")} <= clients
    assert any("gcloud-python" in r["user_agent"] and r["host"] == "storage.googleapis.com" for r in requests)
