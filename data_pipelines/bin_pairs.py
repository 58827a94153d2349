"""insightface validation pair files (`lfw.bin`, `cfp_fp.bin`, ...).

A `.bin` file is a pickle of (list of 2N encoded images, list of N bools issame); images 2i and 2i+1
form pair i. Files written by Python 2 need `encoding="bytes"`; images may be bytes, bytearray, 1-D
uint8 arrays of encoded bytes, or decoded `[H, W, 3]` arrays.
"""

from __future__ import annotations

import os
import pickle
from typing import Sequence

import numpy as np

from data_pipelines.images import check_size, decode_image, encode_jpeg, encode_png

BIN_NAMES = ("lfw", "cfp_fp", "agedb_30", "calfw", "cplfw")
IMAGE_SIZE = (112, 112)


def _decode_one(item, where: str) -> np.ndarray:
    if isinstance(item, np.ndarray) and item.ndim == 3:
        if item.dtype != np.uint8 or item.shape[-1] != 3:
            raise ValueError(f"{where}: decoded image must be uint8 [H, W, 3], got {item.dtype}{list(item.shape)}")
        img = item
    else:
        img = decode_image(item, where)
    return check_size(img, IMAGE_SIZE, where)


def load_bin(path: str) -> tuple[np.ndarray, np.ndarray]:
    """Loads a validation pair file.

    Args:
        path: the `.bin` file.

    Returns:
        (images uint8 `[2N, 112, 112, 3]` RGB, issame bool `[N]`).

    Raises:
        FileNotFoundError: no such file.
        ValueError: the pickle does not have the expected structure, or an image is undecodable
            (CorruptImageError) or not 112x112; the message names the file and the image index.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: validation pair file not found")
    with open(path, "rb") as fh:
        try:
            obj = pickle.load(fh, encoding="bytes")
        except Exception as e:  # pickle raises many types on garbage input.
            raise ValueError(f"{path}: not a readable pickle ({type(e).__name__}: {e})") from e
    if not isinstance(obj, (tuple, list)) or len(obj) != 2:
        raise ValueError(f"{path}: expected a pickled 2-tuple (images, issame), got {type(obj).__name__}"
                         + (f" of length {len(obj)}" if isinstance(obj, (tuple, list)) else ""))
    bins, issame = obj
    try:
        issame = np.asarray(issame, dtype=bool).reshape(-1)
        n_images = len(bins)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: expected (list of images, list of bool issame): {e}") from e
    if n_images != 2 * issame.size:
        raise ValueError(f"{path}: {n_images} images for {issame.size} pairs, expected "
                         f"{2 * issame.size} (2 per pair)")
    images = np.empty((n_images, *IMAGE_SIZE, 3), dtype=np.uint8)
    for i, item in enumerate(bins):
        images[i] = _decode_one(item, f"{path} image {i}")
    return images, issame


def write_bin(path: str, images: np.ndarray, issame: Sequence[bool], encoding: str = "jpg") -> None:
    """Writes a validation pair file readable by insightface and `load_bin`.

    Args:
        path: output `.bin` file.
        images: uint8 `[2N, H, W, 3]` RGB, pairs at (2i, 2i+1).
        issame: bool `[N]`.
        encoding: "jpg" (quality 95) or "png".
    """
    images = np.asarray(images)
    issame = [bool(s) for s in np.asarray(issame).reshape(-1)]
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"write_bin {path}: images must be uint8 [2N, H, W, 3], got "
                         f"{images.dtype}{list(images.shape)}")
    if images.shape[0] != 2 * len(issame):
        raise ValueError(f"write_bin {path}: {images.shape[0]} images for {len(issame)} pairs, "
                         f"expected {2 * len(issame)}")
    encoders = {"jpg": encode_jpeg, "jpeg": encode_jpeg, "png": encode_png}
    if encoding not in encoders:
        raise ValueError(f"write_bin {path}: unknown encoding {encoding!r}, expected 'jpg' or 'png'")
    bins = [encoders[encoding](img) for img in images]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "wb") as fh:
        pickle.dump((bins, issame), fh, protocol=pickle.HIGHEST_PROTOCOL)


def find_bin_sets(folder: str, names: Sequence[str] = BIN_NAMES) -> dict[str, str]:
    """Returns {name: path} for each `<folder>/<name>.bin` present, in the order of `names`."""
    found = {}
    for name in names:
        path = os.path.join(folder, f"{name}.bin")
        if os.path.isfile(path):
            found[name] = path
    return found

