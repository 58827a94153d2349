"""Synthetic occlusion with ground-truth visibility maps.

Every occlusion kind (`KINDS`, drawn by `data_pipelines.occluders`) returns the occluded image and a pixel
mask (`True` = visible). The training target is the visibility map at feature-map resolution: each cell
holds the visible fraction of its image area (the area average of the pixel mask, not a bounding box), so a
16x16 cell half covered by a block gets 0.5. `Occlusion` draws at most one kind per training image with the
probabilities of `config.data.occlusion`; `occlude_deterministic` applies one given kind reproducibly for
evaluation.
"""

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import cv2
import numpy as np

from data_pipelines.occluders import load_rgba, medical_mask, random_blocks, rgba_overlay, sunglasses

KINDS = ("blocks", "mask", "sunglasses", "rgba")
PROB_KEYS = ("prob_blocks", "prob_mask", "prob_sunglasses", "prob_rgba")


def _cfg_value(cfg: Mapping[str, Any] | Any, key: str) -> Any:
    try:
        return cfg[key]
    except KeyError:
        raise KeyError(f"occlusion config is missing '{key}' (data.occlusion.{key})") from None


@functools.lru_cache(maxsize=32)
def _area_weights(size: int, grid: int) -> np.ndarray:
    """`[grid, size]` float32: share of each pixel's extent inside each cell, rows sum to 1."""
    edges = np.arange(grid + 1, dtype=np.float64) * (size / grid)
    pixels = np.arange(size, dtype=np.float64)
    overlap = (np.minimum(pixels[None, :] + 1.0, edges[1:, None])
               - np.maximum(pixels[None, :], edges[:-1, None]))
    weights = (np.clip(overlap, 0.0, None) / (size / grid)).astype(np.float32)
    weights.setflags(write=False)
    return weights


def visibility_map(pixel_mask: np.ndarray, grid: int = 7) -> np.ndarray:
    """Area-averages a pixel visibility mask onto a `grid x grid` map.

    Cells cover `H / grid` x `W / grid` pixels; when the side is not divisible by `grid` the
    boundary pixels are split between cells with exact area weights (the semantics of
    `cv2.resize(..., interpolation=cv2.INTER_AREA)`).

    Args:
      pixel_mask: `[H, W]` bool or float in [0, 1], 1 = visible.
      grid: output side (7 for the stage-4 feature map of a 112x112 input).

    Returns:
      `[grid, grid]` float32, each cell the visible fraction of its area.
    """
    mask = np.asarray(pixel_mask, dtype=np.float32)
    if mask.ndim != 2:
        raise ValueError(f"pixel_mask must be [H, W], got shape {mask.shape}")
    if grid < 1:
        raise ValueError(f"grid must be >= 1, got {grid}")
    height, width = mask.shape
    if height % grid == 0 and width % grid == 0:
        # Whole-pixel cells: OpenCV's area resize is the exact box mean, and much cheaper than
        # the weight matmuls for a 112x112 mask.
        return cv2.resize(mask, (grid, grid), interpolation=cv2.INTER_AREA)
    return _area_weights(height, grid) @ mask @ _area_weights(width, grid).T


def check_config(cfg: Mapping[str, Any] | Any) -> None:
    """Validates an occlusion config (`config.data.occlusion`) before any data is read.

    Args:
      cfg: mapping or ConfigDict with the keys `occlude` reads.

    Raises:
      KeyError: a key is missing (the message names it).
      ValueError: a probability outside [0, 1], probabilities summing over 1, a bad block
        range, or `prob_rgba > 0` without `rgba_path` (each message names the fields).
      FileNotFoundError: `rgba_path` does not exist (when `prob_rgba > 0`).
    """
    probs = _probabilities(cfg)
    if probs[3] > 0.0:
        load_rgba(str(_rgba_path(cfg)))
    lo, hi = (int(v) for v in _cfg_value(cfg, "blocks_count"))
    if not 0 <= lo <= hi:
        raise ValueError(f"data.occlusion.blocks_count must satisfy 0 <= lo <= hi, got {(lo, hi)}")
    lo, hi = (float(v) for v in _cfg_value(cfg, "blocks_size"))
    if not 0.0 < lo <= hi <= 1.0:
        raise ValueError(
            f"data.occlusion.blocks_size must satisfy 0 < lo <= hi <= 1, got {(lo, hi)}")


def _probabilities(cfg: Mapping[str, Any] | Any) -> tuple[float, float, float, float]:
    probs = tuple(float(_cfg_value(cfg, key)) for key in PROB_KEYS)
    for key, value in zip(PROB_KEYS, probs):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"data.occlusion.{key} must be in [0, 1], got {value}")
    total = sum(probs)
    if total > 1.0 + 1e-9:
        raise ValueError(
            "data.occlusion.prob_blocks + prob_mask + prob_sunglasses + prob_rgba must be <= 1 "
            f"(at most one occlusion per image), got {' + '.join(map(str, probs))} = {total:g}")
    return probs


def _rgba_path(cfg: Mapping[str, Any] | Any) -> str:
    try:
        path = cfg["rgba_path"]
    except KeyError:
        path = ""
    if not path:
        raise ValueError(
            "data.occlusion.prob_rgba > 0 needs an RGBA occluder image: "
            "data.occlusion.rgba_path is empty or missing")
    return str(path)


def _occlude_kind(kind: str, image: np.ndarray, rng: np.random.Generator, grid: int,
                  blocks_count: tuple[int, int], blocks_size: tuple[float, float],
                  rgba_path: str) -> tuple[np.ndarray, np.ndarray]:
    """Occludes `image` with `kind` (one of `KINDS`): (image, visibility `[grid, grid]` float32)."""
    if kind == "blocks":
        out, visible = random_blocks(image, rng, blocks_count, blocks_size)
    elif kind == "mask":
        out, visible = medical_mask(image, rng)
    elif kind == "sunglasses":
        out, visible = sunglasses(image, rng)
    else:
        out, visible = rgba_overlay(image, rng, rgba_path)
    return out, visibility_map(visible, grid)


@dataclasses.dataclass(frozen=True)
class Occlusion:
    """A checked occlusion config, applied per image without re-reading the config.

    Attributes:
      probs: probability of each kind of `KINDS` (sum <= 1); the rest is left unoccluded.
      blocks_count: inclusive (lo, hi) number of blocks for kind "blocks".
      blocks_size: (lo, hi) block side fractions for kind "blocks".
      rgba_path: occluder image for kind "rgba" ("" when its probability is 0).
    """

    probs: tuple[float, float, float, float]
    blocks_count: tuple[int, int]
    blocks_size: tuple[float, float]
    rgba_path: str

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | Any) -> "Occlusion":
        """Keeps the values of `config.data.occlusion`, taken as given: `check_config` checked it, once, before.

        Raises:
          KeyError: a key is missing (the message names it).
        """
        probs = tuple(float(_cfg_value(cfg, key)) for key in PROB_KEYS)
        return cls(probs=probs,
                   blocks_count=tuple(int(v) for v in _cfg_value(cfg, "blocks_count")),
                   blocks_size=tuple(float(v) for v in _cfg_value(cfg, "blocks_size")),
                   rgba_path=str(_cfg_value(cfg, "rgba_path")) if probs[3] > 0.0 else "")

    def __call__(self, image: np.ndarray, rng: np.random.Generator,
                 grid: int = 7) -> tuple[np.ndarray, np.ndarray]:
        """Applies at most one occlusion, kind drawn by `probs` (none with probability 1 - sum(probs)).

        Args:
          image: `[H, W, 3]` uint8 RGB aligned face.
          rng: random generator.
          grid: visibility map side.

        Returns:
          (image `[H, W, 3]` uint8, visibility `[grid, grid]` float32 with 1 = visible). Without
          occlusion the input array itself and an all-ones map are returned.
        """
        draw = rng.random()
        cumulative = 0.0
        for kind, prob in zip(KINDS, self.probs):
            cumulative += prob
            if draw < cumulative:
                break
        else:
            return image, np.ones((grid, grid), np.float32)
        return _occlude_kind(kind, image, rng, grid, self.blocks_count, self.blocks_size, self.rgba_path)


def occlude_deterministic(image: np.ndarray, kind: str, seed: int, grid: int = 7, *,
                          rgba_path: str = "", blocks_count: tuple[int, int] = (1, 3),
                          blocks_size: tuple[float, float] = (0.1, 0.4)
                          ) -> tuple[np.ndarray, np.ndarray]:
    """Occludes with one given kind, reproducibly (the evaluation's occluded protocol).

    Args:
      image: `[H, W, 3]` uint8 RGB aligned face.
      kind: one of `KINDS` ("blocks", "mask", "sunglasses", "rgba").
      seed: the same (image, kind, seed) always gives the same output.
      grid: visibility map side.
      rgba_path: occluder image for kind "rgba".
      blocks_count: (lo, hi) number of blocks for kind "blocks".
      blocks_size: (lo, hi) block side fractions for kind "blocks".

    Returns:
      (image `[H, W, 3]` uint8, visibility `[grid, grid]` float32).
    """
    if kind not in KINDS:
        raise ValueError(f"unknown occlusion kind {kind!r}; expected one of {KINDS}")
    if kind == "rgba" and not rgba_path:
        raise ValueError("occlusion kind 'rgba' needs rgba_path (eval occluder image)")
    return _occlude_kind(kind, image, np.random.default_rng(seed), grid, blocks_count, blocks_size,
                         rgba_path)
