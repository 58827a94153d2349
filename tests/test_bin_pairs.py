"""Tests for data_pipelines.bin_pairs."""

import os
import pickle
import shlex
import struct

import numpy as np
import pytest

from data_pipelines import bin_pairs, images


def _images(n, seed=0, size=112):
    rng = np.random.default_rng(seed)
    colours = rng.integers(0, 256, (n, 1, 1, 3))
    return np.broadcast_to(colours, (n, size, size, 3)).astype(np.uint8)


def test_round_trip_png_exact(tmp_path):
    imgs, issame = _images(6), [True, False, True]
    path = tmp_path / "lfw.bin"
    bin_pairs.write_bin(str(path), imgs, issame, encoding="png")
    loaded = bin_pairs.load_bin(str(path))
    out, same = loaded
    np.testing.assert_array_equal(out, imgs)
    assert out.dtype == np.uint8 and out.shape == (6, 112, 112, 3)
    np.testing.assert_array_equal(same, issame)
    assert same.dtype == bool
    assert loaded.num_pairs == 3 and bin_pairs.count_pairs(path) == 3


def test_round_trip_jpg_close(tmp_path):
    imgs = _images(4, seed=1)
    bin_pairs.write_bin(str(tmp_path / "a.bin"), imgs, [False, True])
    out, same = bin_pairs.load_bin(str(tmp_path / "a.bin"))
    assert np.abs(out.astype(int) - imgs).max() <= 3
    assert same.tolist() == [False, True]


@pytest.mark.parametrize("protocol", [2, 4, 5])
@pytest.mark.parametrize("variant", ["bytearray", "encoded_array", "decoded_array"])
def test_image_variants(tmp_path, variant, protocol):
    imgs = _images(2, seed=2)
    encoded = [images.encode_png(im) for im in imgs]
    items = {
        "bytearray": [bytearray(e) for e in encoded],
        "encoded_array": [np.frombuffer(e, np.uint8) for e in encoded],
        "decoded_array": list(imgs),
    }[variant]
    path = tmp_path / "v.bin"
    path.write_bytes(pickle.dumps((items, np.array([True])), protocol=protocol))
    out, same = bin_pairs.load_bin(str(path))
    np.testing.assert_array_equal(out, imgs)
    assert same.tolist() == [True]


class _RunsCommand:
    """Pickles as a call of os.system, as a crafted .bin would."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def _touch(path):
    return f"touch {shlex.quote(str(path))}"


@pytest.mark.parametrize("protocol", [2, 5])
def test_crafted_pickle_does_not_run(tmp_path, protocol):
    marker = tmp_path / "marker"
    path = tmp_path / "lfw.bin"
    path.write_bytes(pickle.dumps(([_RunsCommand(_touch(marker))], [True]), protocol=protocol))
    with pytest.raises(ValueError, match=rf"{path}: refused to unpickle global 'posix\.system'"):
        bin_pairs.load_bin(path)
    with pytest.raises(ValueError, match=r"refused to unpickle global 'posix\.system'"):
        bin_pairs.count_pairs(path)
    assert not marker.exists()
    pickle.loads(path.read_bytes())  # the plain unpickler runs it: the file really is an attack
    assert marker.exists()


def test_crafted_pickle_returning_clean_data_is_refused(tmp_path):
    encoded = [images.encode_png(im) for im in _images(2)]
    clean = pickle.dumps((encoded, [True]), protocol=2)
    marker, control = tmp_path / "marker", tmp_path / "control"

    def attack(command):
        # os.system(command), its result popped, then the clean pickle's body (after its PROTO 2 header).
        text = command.encode()
        return (b"\x80\x02cposix\nsystem\nX" + struct.pack("<I", len(text)) + text + b"\x85R0"
                + clean[2:])

    (tmp_path / "lfw.bin").write_bytes(attack(_touch(marker)))
    with pytest.raises(ValueError, match=r"lfw\.bin: refused to unpickle global 'posix\.system'"):
        bin_pairs.load_bin(tmp_path / "lfw.bin")
    assert not marker.exists()
    images_, issame = pickle.loads(attack(_touch(control)))
    assert control.exists() and images_ == encoded and issame == [True]


def _py2_str(data):
    """A Python 2 `str` as cPickle protocol 2 writes it (SHORT_BINSTRING / BINSTRING)."""
    if len(data) < 256:
        return b"U" + bytes([len(data)]) + data
    return b"T" + struct.pack("<i", len(data)) + data


# A Python 2 numpy bool array [True, False] (numpy.core names, py2 `str` typecodes and data).
_PY2_BOOL_ARRAY = (b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85" + _py2_str(b"b")
                   + b"\x87R(K\x01K\x02\x85cnumpy\ndtype\n" + _py2_str(b"b1") + b"K\x00K\x01\x87R(K\x03"
                   + _py2_str(b"|") + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb\x89"
                   + _py2_str(b"\x01\x00") + b"tb")


def test_python2_bin_loads(tmp_path):
    import cv2
    imgs = _images(4, seed=3).copy()
    encoded = [images.encode_png(im) for im in imgs]
    imgs[0] = 0
    encoded[0] = cv2.imencode(".png", imgs[0], [cv2.IMWRITE_PNG_COMPRESSION, 9])[1].tobytes()
    assert len(encoded[0]) < 256 <= len(encoded[1])  # both of Python 2's string opcodes
    # (images, issame) as Python 2's cPickle.dump(..., protocol=2) writes it: `str` images, bool flags.
    plain = (b"\x80\x02]q\x00(" + b"".join(_py2_str(e) for e in encoded) + b"e]q\x01(\x88\x89e\x86q\x02.")
    (tmp_path / "py2.bin").write_bytes(plain)
    out, same = bin_pairs.load_bin(tmp_path / "py2.bin")
    np.testing.assert_array_equal(out, imgs)
    assert same.tolist() == [True, False]
    # Python 2 bytearray images (__builtin__ names, latin-1 unicode) and a numpy bool array of flags.
    py2_bytearray = [b"c__builtin__\nbytearray\nX" + struct.pack("<I", len(u)) + u + _py2_str(b"latin-1")
                     + b"\x86R" for u in (e.decode("latin1").encode("utf-8") for e in encoded)]
    numpy_flags = b"\x80\x02]q\x00(" + b"".join(py2_bytearray) + b"e" + _PY2_BOOL_ARRAY + b"\x86."
    (tmp_path / "py2_numpy.bin").write_bytes(numpy_flags)
    out, same = bin_pairs.load_bin(tmp_path / "py2_numpy.bin")
    np.testing.assert_array_equal(out, imgs)
    assert same.tolist() == [True, False]


def test_same_pair_flags_other_than_0_1_are_refused(tmp_path):
    enc = [images.encode_png(im) for im in _images(4)]
    for flags, ok in (([1, 0], [True, False]), (np.array([0, 1], np.int64), [False, True]),
                      ((np.bool_(True), False), [True, False])):
        p = _dump(tmp_path / "ok.bin", (enc, flags))
        assert bin_pairs.load_bin(p).issame.tolist() == ok
    for flags, shown in (([True, 2], r"2 \(int\)"), ([1, 0.0], r"0\.0 \(float\)"), ([1, "1"], r"'1' \(str\)"),
                         (np.array([1, -1]), r"-1 \(int\)")):
        p = _dump(tmp_path / "flags.bin", (enc, flags))
        expected = rf"flags\.bin: pair 1 has same-pair flag {shown}, expected 0, 1, True or False"
        with pytest.raises(ValueError, match=expected):
            bin_pairs.load_bin(p)
    p = _dump(tmp_path / "float_array.bin", (enc, np.array([1.0, 0.0])))
    with pytest.raises(ValueError, match=r"float_array\.bin: not a readable \.bin pickle .*dtype float64"):
        bin_pairs.load_bin(p)
    p = _dump(tmp_path / "object_array.bin", (enc, np.array([True, False], dtype=object)))
    with pytest.raises(ValueError, match=r"object_array\.bin: not a readable \.bin pickle .*dtype object"):
        bin_pairs.load_bin(p)


def test_count_pairs_reads_no_image(tmp_path):
    p = _dump(tmp_path / "undecodable.bin", ([b"not an image"] * 20, [True, False] * 5))
    assert bin_pairs.count_pairs(p) == 10
    with pytest.raises(images.CorruptImageError, match=r"undecodable\.bin image 0: undecodable image data"):
        bin_pairs.load_bin(p)


def _dump(path, obj):
    path.write_bytes(pickle.dumps(obj))
    return str(path)


def test_wrong_structure_errors(tmp_path):
    enc = [images.encode_png(im) for im in _images(4)]
    p = _dump(tmp_path / "three.bin", (enc, [True, False], "extra"))
    with pytest.raises(ValueError,
                       match=rf"{p}: expected a pickled 2-tuple \(images, issame\), got tuple of length 3"):
        bin_pairs.load_bin(p)
    p = _dump(tmp_path / "dict.bin", {"a": 1})
    with pytest.raises(ValueError, match=r"dict\.bin: expected a pickled 2-tuple .* got dict"):
        bin_pairs.load_bin(p)
    p = _dump(tmp_path / "count.bin", (enc[:3], [True, False]))
    with pytest.raises(ValueError, match=r"count\.bin: 3 images for 2 pairs, expected 4"):
        bin_pairs.load_bin(p)
    p = _dump(tmp_path / "bad.bin", (enc[:2] + [b"garbage", enc[3]], [True, False]))
    with pytest.raises(images.CorruptImageError, match=r"bad\.bin image 2: undecodable image data"):
        bin_pairs.load_bin(p)
    small = [images.encode_png(im) for im in _images(2, size=96)]
    p = _dump(tmp_path / "small.bin", (small, [True]))
    with pytest.raises(ValueError, match=r"small\.bin image 0: image is 96x96x3, expected 112x112x3"):
        bin_pairs.load_bin(p)
    (tmp_path / "junk.bin").write_bytes(b"\x00junk")
    with pytest.raises(ValueError, match=r"junk\.bin: not a readable \.bin pickle"):
        bin_pairs.load_bin(str(tmp_path / "junk.bin"))
    with pytest.raises(FileNotFoundError, match=r"nope\.bin: validation pair file not found"):
        bin_pairs.load_bin(str(tmp_path / "nope.bin"))


def test_write_bin_validates(tmp_path):
    with pytest.raises(ValueError, match=r"3 images for 2 pairs, expected 4"):
        bin_pairs.write_bin(str(tmp_path / "x.bin"), _images(3), [True, False])
    with pytest.raises(ValueError, match=r"unknown encoding 'gif'"):
        bin_pairs.write_bin(str(tmp_path / "x.bin"), _images(2), [True], encoding="gif")


def test_find_bin_sets(tmp_path):
    for name in ("agedb_30", "lfw", "other"):
        (tmp_path / f"{name}.bin").write_bytes(b"")
    (tmp_path / "cfp_fp.bin").mkdir()
    found = bin_pairs.find_bin_sets(str(tmp_path))
    assert list(found) == ["lfw", "agedb_30"]
    assert found["lfw"] == tmp_path / "lfw.bin"
    assert bin_pairs.find_bin_sets(str(tmp_path), names=("other",)) == {"other": tmp_path / "other.bin"}


def test_gcs_paths_go_through_epath(gcs, tmp_path, monkeypatch):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    imgs, issame = _images(4, seed=4), [False, True]
    bin_pairs.write_bin(gcs.url("val/lfw.bin"), imgs, issame, encoding="png")
    found = bin_pairs.find_bin_sets(gcs.url("val"))
    assert list(found) == ["lfw"] and os.fspath(found["lfw"]) == gcs.url("val/lfw.bin")
    out, same = bin_pairs.load_bin(found["lfw"])
    assert bin_pairs.count_pairs(gcs.url("val/lfw.bin")) == 2
    np.testing.assert_array_equal(out, imgs)
    assert same.tolist() == issame
    bin_pairs.write_bin(tmp_path / "lfw.bin", imgs, issame, encoding="png")
    assert gcs.objects()["val/lfw.bin"] == (tmp_path / "lfw.bin").stat().st_size
    # load_bin and count_pairs each downloaded the object (TensorFlow reads by byte range: 206).
    assert [(name, status) for name, status, _ in gcs.reads()] == [("val/lfw.bin", 206)] * 2
    assert os.listdir(cwd) == []  # nothing named "gs:" in the working directory
