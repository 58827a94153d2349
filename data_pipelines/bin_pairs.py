"""insightface validation pair files (`lfw.bin`, `cfp_fp.bin`, ...).

A `.bin` file is a pickle of (list of 2N encoded images, list of N same-pair flags); images 2i and 2i+1
form pair i. Images may be bytes, bytearray, 1-D uint8 arrays of encoded bytes, or decoded `[H, W, 3]`
uint8 arrays; flags are bools (or 0/1), as a list or a numpy array.

Validation sets come from third-party mirrors, and unpickling can run any code a file names, so `.bin`
files are read with an unpickler that resolves only the globals this format needs (numpy array and
scalar reconstruction limited to bool and integer dtypes, bytearray, and the latin-1 `_codecs.encode`
Python 3 uses for bytes in protocol 0-2 pickles) and refuses every other global before anything is
called. Python 2 files load too: their `str` images are read as bytes (`encoding="bytes"`), and their
`__builtin__` / `numpy.core` names map like Python 3's.
"""

from __future__ import annotations

import io
import pickle
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np
from etils import epath

from data_pipelines.images import check_size, decode_image, encode_jpeg, encode_png
from oaml_jax.models.face_input import FACE_SHAPE, FACE_SIZE

BIN_NAMES = ("lfw", "cfp_fp", "agedb_30", "calfw", "cplfw")

# numpy dtypes a .bin may hold: uint8 images, bool or 0/1 integer flags.
_ALLOWED_DTYPE_KINDS = "bui"


class BinSet(NamedTuple):
    """A loaded validation pair set; unpacks as `images, issame = load_bin(path)`.

    Attributes:
        images: uint8 `[2N, 112, 112, 3]` RGB; pair i is images (2i, 2i+1).
        issame: bool `[N]`, True where pair i shows one identity.
    """

    images: np.ndarray
    issame: np.ndarray

    @property
    def num_pairs(self) -> int:
        """N, the number of pairs."""
        return int(self.issame.size)


class _RefusedGlobal(pickle.UnpicklingError):
    def __init__(self, module: str, name: str):
        self.module, self.name = module, name
        super().__init__(f"{module}.{name}")


def _checked_dtype(dtype: Any) -> np.dtype:
    dtype = np.dtype(dtype)
    if dtype.kind not in _ALLOWED_DTYPE_KINDS:
        raise pickle.UnpicklingError(f"numpy dtype {dtype} (a .bin holds only uint8 images and bool or "
                                     "0/1 integer flags)")
    return dtype


def _dtype(spec: Any, align: Any = False, copy: Any = True) -> np.dtype:
    if isinstance(spec, bytes):  # Python 2 `str` read with encoding="bytes".
        spec = spec.decode("ascii")
    _checked_dtype(spec)
    return np.dtype(spec, bool(align), bool(copy))


def _restricted(fn: Callable, *dtype_args: int) -> Callable:
    """Wraps a numpy reconstructor so that the dtypes among its positional arguments are checked."""

    def call(*args):
        for i in dtype_args:
            if i < len(args):
                _checked_dtype(args[i])
        return fn(*args)

    return call


def _reconstruct(cls: Any, shape: Any, typecode: Any):
    if cls is not np.ndarray:
        raise pickle.UnpicklingError(f"array subclass {cls!r}")
    if isinstance(typecode, bytes):
        typecode = typecode.decode("ascii")
    return np.ndarray(shape, dtype=typecode)


def _is_latin1(encoding: Any) -> bool:
    # Python 2 files spell it as a `str`, read as bytes.
    return encoding in ("latin1", "latin-1", b"latin1", b"latin-1")


def _codecs_encode(text: Any, encoding: Any = "utf-8") -> bytes:
    # Python 3 writes bytes as _codecs.encode(<latin-1 text>, "latin1") in protocols 0-2.
    if not isinstance(text, str) or not _is_latin1(encoding):
        raise pickle.UnpicklingError(f"_codecs.encode of a {type(text).__name__} with encoding {encoding!r}")
    return text.encode("latin1")


def _bytearray(*args: Any) -> bytearray:
    # Protocols 0-2 write bytearray(<latin-1 text>, "latin-1"); Python 3's protocols 3-4 bytearray(bytes).
    if not args:
        return bytearray()
    if len(args) == 1 and isinstance(args[0], bytes):
        return bytearray(args[0])
    if len(args) == 2 and isinstance(args[0], str) and _is_latin1(args[1]):
        return bytearray(args[0], "latin1")
    raise pickle.UnpicklingError(f"bytearray{tuple(type(a).__name__ for a in args)}")


def _allowed_globals() -> dict[tuple[str, str], Any]:
    """(module, name) as pickles spell them -> what the unpickler gets instead."""
    # numpy's own reconstructors, taken from the objects that use them rather than private modules.
    scalar = _restricted(np.bool_(True).__reduce__()[0], 0)  # (dtype, bytes)
    frombuffer = _restricted(np.zeros(1, np.uint8).__reduce_ex__(5)[0], 1)  # (buffer, dtype, shape, order)
    allowed: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): _dtype,
        ("_codecs", "encode"): _codecs_encode,
        ("builtins", "bytearray"): _bytearray,
        ("__builtin__", "bytearray"): _bytearray,
    }
    for core in ("numpy.core", "numpy._core"):  # numpy 1.x and 2.x spellings
        allowed[(f"{core}.multiarray", "_reconstruct")] = _reconstruct
        allowed[(f"{core}.multiarray", "scalar")] = scalar
        allowed[(f"{core}.numeric", "_frombuffer")] = frombuffer
    return allowed


_ALLOWED_GLOBALS = _allowed_globals()


class _BinUnpickler(pickle.Unpickler):
    """Unpickler that resolves only `_ALLOWED_GLOBALS` and refuses every other global."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise _RefusedGlobal(module, name) from None


def _unpickle(path: epath.Path) -> Any:
    with path.open("rb") as fh:
        data = fh.read()
    try:
        return _BinUnpickler(io.BytesIO(data), encoding="bytes").load()
    except _RefusedGlobal as e:
        raise ValueError(f"{path}: refused to unpickle global '{e.module}.{e.name}': a .bin file holds "
                         "only image bytes or uint8 arrays and same-pair flags; this file names other "
                         "code and may be crafted to run it") from None
    except Exception as e:  # pickle raises many types on garbage input.
        raise ValueError(f"{path}: not a readable .bin pickle ({type(e).__name__}: {e})") from None


def _flags(issame: Any, path: epath.Path) -> np.ndarray:
    """Same-pair flags as bool `[N]`; anything but 0, 1, True or False is refused naming the pair."""
    if isinstance(issame, np.ndarray):
        if issame.ndim != 1:
            raise ValueError(f"{path}: same-pair flags must be 1-D, got an array of shape "
                             f"{list(issame.shape)}")
        values = issame.tolist()
    elif isinstance(issame, (list, tuple)):
        values = list(issame)
    else:
        raise ValueError(f"{path}: expected (list of images, list of same-pair flags), got flags of type "
                         f"{type(issame).__name__}")
    for i, value in enumerate(values):
        ok = isinstance(value, (bool, int, np.bool_, np.integer)) and value in (0, 1)
        if not ok:
            raise ValueError(f"{path}: pair {i} has same-pair flag {value!r} ({type(value).__name__}), "
                             "expected 0, 1, True or False")
    return np.asarray(values, dtype=bool).reshape(-1)


def _read(path: epath.PathLike) -> tuple[epath.Path, Sequence[Any], np.ndarray]:
    """Unpickles and checks a `.bin`: (path, encoded or decoded images [2N], issame bool [N])."""
    path = epath.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: validation pair file not found")
    obj = _unpickle(path)
    if not isinstance(obj, (tuple, list)) or len(obj) != 2:
        raise ValueError(f"{path}: expected a pickled 2-tuple (images, issame), got {type(obj).__name__}"
                         + (f" of length {len(obj)}" if isinstance(obj, (tuple, list)) else ""))
    bins, issame = obj
    if not isinstance(bins, (list, tuple)):
        raise ValueError(f"{path}: expected (list of images, list of same-pair flags), got images of type "
                         f"{type(bins).__name__}")
    issame = _flags(issame, path)
    if len(bins) != 2 * issame.size:
        raise ValueError(f"{path}: {len(bins)} images for {issame.size} pairs, expected "
                         f"{2 * issame.size} (2 per pair)")
    return path, bins, issame


def _decode_one(item: Any, where: str) -> np.ndarray:
    if isinstance(item, np.ndarray) and item.ndim == 3:
        if item.dtype != np.uint8 or item.shape[-1] != 3:
            raise ValueError(f"{where}: decoded image must be uint8 [H, W, 3], got "
                             f"{item.dtype}{list(item.shape)}")
        img = item
    else:
        img = decode_image(item, where)
    return check_size(img, (FACE_SIZE, FACE_SIZE), where)


def load_bin(path: epath.PathLike) -> BinSet:
    """Loads a validation pair file without running any code it might name.

    Args:
        path: the `.bin` file (any path `etils.epath` opens: local, gs://, ...).

    Returns:
        BinSet(images uint8 `[2N, 112, 112, 3]` RGB, issame bool `[N]`); `num_pairs` is N.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file names a global outside the `.bin` format (message names the file and the
            global; nothing was called), is not a readable pickle, does not have the expected structure,
            or has a same-pair flag other than 0, 1, True or False (names the pair index).
        CorruptImageError: an image is undecodable or not 112x112 (names the file and image index).
    """
    path, bins, issame = _read(path)
    images = np.empty((len(bins),) + FACE_SHAPE, dtype=np.uint8)
    for i, item in enumerate(bins):
        images[i] = _decode_one(item, f"{path} image {i}")
    return BinSet(images, issame)


def count_pairs(path: epath.PathLike) -> int:
    """Number of pairs N in a validation pair file, without decoding its images.

    Reads and checks the file as `load_bin` does (safe unpickling, structure, same-pair flags), so a set
    too small for the 10-fold protocol can be refused at start-up for the cost of reading the file.

    Args:
        path: the `.bin` file.

    Returns:
        N (the file holds 2N images).

    Raises:
        FileNotFoundError, ValueError: as `load_bin`.
    """
    return int(_read(path)[2].size)


def write_bin(path: epath.PathLike, images: np.ndarray, issame: Sequence[bool],
              encoding: str = "jpg") -> None:
    """Writes a validation pair file readable by insightface and `load_bin`.

    Args:
        path: output `.bin` file (any path `etils.epath` writes); its folder is created if missing.
        images: uint8 `[2N, H, W, 3]` RGB, pairs at (2i, 2i+1).
        issame: bool `[N]`.
        encoding: "jpg" (quality 95) or "png".

    Raises:
        ValueError: wrong image array, image count or encoding (names the path).
    """
    path = epath.Path(path)
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
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as fh:
        pickle.dump((bins, issame), fh, protocol=pickle.HIGHEST_PROTOCOL)


def find_bin_sets(folder: epath.PathLike, names: Sequence[str] = BIN_NAMES) -> dict[str, epath.Path]:
    """Returns {name: path} for each `<folder>/<name>.bin` present, in the order of `names`."""
    folder = epath.Path(folder)
    found = {}
    for name in names:
        path = folder / f"{name}.bin"
        if path.is_file():
            found[name] = path
    return found
