"""AdaFace-style training augmentation.

All functions take RGB uint8 images `[H, W, 3]` (112x112 faces in practice) and a
`np.random.Generator`, so they can be used directly from a Grain `random_map` (they are
module-level and therefore picklable). The augmentations follow the semantics of AdaFace's
training augmenter, applied in this order, each with its own probability:

1. horizontal flip (`flip_prob`);
2. random resized crop padded back to the input size (`crop_prob`, `crop_scale`): a crop
   window is drawn like torchvision's `RandomResizedCrop` (area fraction in `crop_scale`,
   aspect ratio in [3/4, 4/3]) and the crop is kept at its original location in an
   otherwise black canvas, so the face is never rescaled, only partially blanked;
3. low resolution (`lowres_prob`): down-sampling to a random square side `int(u * H)`,
   u uniform in [0.2, 1), and back up, each resize with its own random OpenCV
   interpolation (nearest, linear, area, cubic, Lanczos);
4. photometric jitter (`photometric_prob`): brightness, contrast and saturation factors in
   [0.5, 1.5] applied in a random order, clipping to [0, 255] after each step.
"""

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import cv2
import numpy as np

AUGMENT_KEYS = ("flip_prob", "crop_prob", "crop_scale", "lowres_prob", "photometric_prob")

_CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)
_CROP_ATTEMPTS = 10
_LOWRES_RATIO = (0.2, 1.0)
_INTERPOLATIONS = (
    cv2.INTER_NEAREST,
    cv2.INTER_LINEAR,
    cv2.INTER_AREA,
    cv2.INTER_CUBIC,
    cv2.INTER_LANCZOS4,
)
_JITTER = 0.5


def _cfg_value(cfg: Mapping[str, Any] | Any, key: str) -> Any:
    try:
        return cfg[key]
    except KeyError:
        raise KeyError(
            f"augmentation config is missing '{key}' (data.augment.{key}); "
            f"expected keys {AUGMENT_KEYS}") from None


def _check_image(image: np.ndarray) -> None:
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(
            f"expected an RGB uint8 image [H, W, 3], got dtype {image.dtype} shape {image.shape}")


def check_config(cfg: Mapping[str, Any] | Any) -> None:
    """Validates an augmentation config before any data is read.

    Args:
      cfg: mapping or ConfigDict (`config.data.augment`) with the keys of `AUGMENT_KEYS`.

    Raises:
      KeyError: a key is missing (the message names it).
      ValueError: a probability is outside [0, 1] or `crop_scale` is not 0 < lo <= hi <= 1.
    """
    for key in ("flip_prob", "crop_prob", "lowres_prob", "photometric_prob"):
        value = float(_cfg_value(cfg, key))
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"data.augment.{key} must be in [0, 1], got {value}")
    lo, hi = (float(v) for v in _cfg_value(cfg, "crop_scale"))
    if not 0.0 < lo <= hi <= 1.0:
        raise ValueError(f"data.augment.crop_scale must satisfy 0 < lo <= hi <= 1, got {(lo, hi)}")


def crop_window(height: int, width: int, rng: np.random.Generator,
                scale: tuple[float, float]) -> tuple[int, int, int, int]:
    """Draws a `RandomResizedCrop`-style window.

    Args:
      height: image height in pixels.
      width: image width in pixels.
      rng: random generator.
      scale: (lo, hi) range of the crop area as a fraction of the image area.

    Returns:
      (top, left, crop_height, crop_width); the whole image when no valid window was drawn
      in 10 attempts.
    """
    area = height * width
    log_lo, log_hi = math.log(_CROP_RATIO[0]), math.log(_CROP_RATIO[1])
    for _ in range(_CROP_ATTEMPTS):
        area_frac, log_ratio, u_top, u_left = rng.random(4).tolist()
        target = area * (scale[0] + (scale[1] - scale[0]) * area_frac)
        ratio = math.exp(log_lo + (log_hi - log_lo) * log_ratio)
        crop_w = int(round(math.sqrt(target * ratio)))
        crop_h = int(round(math.sqrt(target / ratio)))
        if 0 < crop_w <= width and 0 < crop_h <= height:
            top = int(u_top * (height - crop_h + 1))
            left = int(u_left * (width - crop_w + 1))
            return top, left, crop_h, crop_w
    return 0, 0, height, width


def random_crop_pad(image: np.ndarray, rng: np.random.Generator,
                    scale: tuple[float, float]) -> np.ndarray:
    """Keeps a random crop window in place and blanks everything outside it.

    Args:
      image: `[H, W, C]` uint8.
      rng: random generator.
      scale: (lo, hi) range of the crop area fraction.

    Returns:
      `[H, W, C]` uint8, zero outside the crop window.
    """
    top, left, crop_h, crop_w = crop_window(image.shape[0], image.shape[1], rng, scale)
    out = np.zeros_like(image)
    out[top:top + crop_h, left:left + crop_w] = image[top:top + crop_h, left:left + crop_w]
    return out


def low_resolution(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Down-samples to a random square side `int(u * H)`, u in [0.2, 1), and back up.

    The two resizes draw their interpolations independently, as AdaFace's augmenter does.

    Args:
      image: `[H, W, 3]` uint8.
      rng: random generator.

    Returns:
      `[H, W, 3]` uint8 blurred/pixelated image.
    """
    ratio, down, up = rng.random(3).tolist()
    lo, hi = _LOWRES_RATIO
    side = max(1, int((lo + (hi - lo) * ratio) * image.shape[0]))
    n = len(_INTERPOLATIONS)
    small = cv2.resize(image, (side, side), interpolation=_INTERPOLATIONS[int(down * n)])
    return cv2.resize(small, (image.shape[1], image.shape[0]), interpolation=_INTERPOLATIONS[int(up * n)])


def photometric(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Brightness, contrast and saturation jitter (factors in [0.5, 1.5], random order).

    Like torchvision's `ColorJitter` on uint8 images, every step saturates back to uint8.

    Args:
      image: `[H, W, 3]` uint8 RGB.
      rng: random generator.

    Returns:
      `[H, W, 3]` uint8 RGB.
    """
    draws = rng.random(6).tolist()
    factors = [1.0 + _JITTER * (2.0 * u - 1.0) for u in draws[:3]]
    out = image
    # A random order: the ops sorted by three more uniforms.
    for op in sorted(range(3), key=draws[3:].__getitem__):
        factor = factors[op]
        if op == 0:
            out = cv2.addWeighted(out, factor, out, 0.0, 0.0)
        elif op == 1:
            mean = cv2.mean(cv2.cvtColor(out, cv2.COLOR_RGB2GRAY))[0]
            out = cv2.addWeighted(out, factor, out, 0.0, (1.0 - factor) * mean)
        else:
            gray = cv2.cvtColor(cv2.cvtColor(out, cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB)
            out = cv2.addWeighted(out, factor, gray, 1.0 - factor, 0.0)
    return out


@dataclasses.dataclass(frozen=True)
class Augmentation:
    """A checked augmentation config, applied per image without re-reading the config.

    Attributes:
      flip_prob: probability of a horizontal flip.
      crop_prob: probability of a random crop padded back to the input size.
      crop_scale: (lo, hi) crop area fraction.
      lowres_prob: probability of the low-resolution down/up sampling.
      photometric_prob: probability of the brightness/contrast/saturation jitter.
    """

    flip_prob: float
    crop_prob: float
    crop_scale: tuple[float, float]
    lowres_prob: float
    photometric_prob: float

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | Any) -> "Augmentation":
        """Keeps the values of `config.data.augment`, taken as given: `check_config` checked it, once, before.

        Raises:
          KeyError: a key is missing (the message names it).
        """
        return cls(flip_prob=float(_cfg_value(cfg, "flip_prob")), crop_prob=float(_cfg_value(cfg, "crop_prob")),
                   crop_scale=tuple(float(v) for v in _cfg_value(cfg, "crop_scale")),
                   lowres_prob=float(_cfg_value(cfg, "lowres_prob")),
                   photometric_prob=float(_cfg_value(cfg, "photometric_prob")))

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Applies each augmentation with its probability.

        Args:
          image: `[H, W, 3]` uint8 RGB (112x112 aligned face).
          rng: random generator.

        Returns:
          `[H, W, 3]` uint8 RGB. When no augmentation fires the input array itself is returned (not a
          copy).

        Raises:
          ValueError: the image is not `[H, W, 3]` uint8.
        """
        _check_image(image)
        flip, crop, lowres, jitter = rng.random(4).tolist()
        out = image
        if flip < self.flip_prob:
            out = cv2.flip(out, 1)
        if crop < self.crop_prob:
            out = random_crop_pad(out, rng, self.crop_scale)
        if lowres < self.lowres_prob:
            out = low_resolution(out, rng)
        if jitter < self.photometric_prob:
            out = photometric(out, rng)
        return out
