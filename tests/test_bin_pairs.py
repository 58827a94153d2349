"""Tests for data_pipelines.bin_pairs."""

import pickle

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
    out, same = bin_pairs.load_bin(str(path))
    np.testing.assert_array_equal(out, imgs)
    assert out.dtype == np.uint8 and out.shape == (6, 112, 112, 3)
    np.testing.assert_array_equal(same, issame)
    assert same.dtype == bool


def test_round_trip_jpg_close(tmp_path):
    imgs = _images(4, seed=1)
    bin_pairs.write_bin(str(tmp_path / "a.bin"), imgs, [False, True])
    out, same = bin_pairs.load_bin(str(tmp_path / "a.bin"))
    assert np.abs(out.astype(int) - imgs).max() <= 3
    assert same.tolist() == [False, True]


@pytest.mark.parametrize("variant", ["bytearray", "encoded_array", "decoded_array"])
def test_image_variants(tmp_path, variant):
    imgs = _images(2, seed=2)
    encoded = [images.encode_png(im) for im in imgs]
    items = {
        "bytearray": [bytearray(e) for e in encoded],
        "encoded_array": [np.frombuffer(e, np.uint8) for e in encoded],
        "decoded_array": list(imgs),
    }[variant]
    path = tmp_path / "v.bin"
    path.write_bytes(pickle.dumps((items, [True]), protocol=2))
    out, same = bin_pairs.load_bin(str(path))
    np.testing.assert_array_equal(out, imgs)
    assert same.tolist() == [True]


def _dump(path, obj):
    path.write_bytes(pickle.dumps(obj))
    return str(path)


def test_wrong_structure_errors(tmp_path):
    enc = [images.encode_png(im) for im in _images(4)]
    p = _dump(tmp_path / "three.bin", (enc, [True, False], "extra"))
    with pytest.raises(ValueError, match=rf"{p}: expected a pickled 2-tuple \(images, issame\), got tuple of length 3"):
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
    with pytest.raises(ValueError, match=r"junk\.bin: not a readable pickle"):
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
    found = bin_pairs.find_bin_sets(str(tmp_path))
    assert list(found) == ["lfw", "agedb_30"]
    assert found["lfw"] == str(tmp_path / "lfw.bin")
    assert bin_pairs.find_bin_sets(str(tmp_path), names=("other",)) == {"other": str(tmp_path / "other.bin")}
