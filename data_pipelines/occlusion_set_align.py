"""Aligns an unaligned occlusion set once, offline, and writes it in OAML's layout (`oaml-inference align --masks`).

The offline counterpart of opening a set with `aligned=False` (`occlusion_sets.OcclusionSet`): each photo and
its mask go through the same `occlusion_sets.align_pair` (a 112x112 photo is taken as an aligned face with its
mask kept; the others are detected and their masks warped by the face's similarity), and the result is written
as `out/kept_faces/{name}.png` + `out/masks/{name}_mask.png`, which trains as an aligned set.
"""

from typing import Any

import cv2
import numpy as np
from absl import logging
from etils import epath

from data_pipelines.images import decode_photo, encode_png
from data_pipelines.occlusion_sets import IMAGE_DIRS, MASK_DIR, MASK_SUFFIX, align_pair, pair_folders, read_mask
from oaml_jax.paths import real_path, user_path

_SHOWN = 5  # names shown in a warning


def align_set(images: epath.PathLike, masks: epath.PathLike, out: epath.PathLike, **detection: Any) -> dict:
    """Aligns an unaligned set once, offline: `out/kept_faces/{name}.png` + `out/masks/{name}_mask.png`.

    A 112x112 photo is taken as aligned and its mask written as it is (grayscale); the others' masks are
    warped by each face's similarity (`align_pair`) and written at 4x the face's side, so the targets keep
    their detail. Nothing is written over an input.

    Args:
        images: folder of photos. masks: folder of their masks (either naming, see `pair_folders`).
        out: output set folder (local or any epath URI).
        **detection: `min_face_size`, `min_score`.

    Returns:
        {"written", "without_face", "unpaired_images", "unpaired_masks"}: counts.

    Raises:
        ValueError: `out` would write into an input folder, or no photo has a mask.
    """
    images, masks, out = (user_path(images, "--images"), user_path(masks, "--masks"), user_path(out, "--out"))
    outputs = (out / IMAGE_DIRS[0], out / MASK_DIR)
    if {real_path(p) for p in outputs} & {real_path(images), real_path(masks)}:
        raise ValueError(f"--out={out}: its {IMAGE_DIRS[0]}/ or {MASK_DIR}/ folder is an input folder; "
                         "choose a new folder (inputs are never written over)")
    listing = pair_folders(images, masks)
    if not listing.names:
        raise ValueError(f"--images={images} --masks={masks}: no photo has a mask "
                         f"({len(listing.unpaired_images)} photos, {len(listing.unpaired_masks)} masks unpaired)")
    for folder in outputs:
        folder.mkdir(parents=True, exist_ok=True)
    written, without = 0, []
    for name, image_path, mask_path in zip(listing.names, listing.images, listing.masks):
        aligned = align_pair(decode_photo(image_path.read_bytes(), str(image_path)),
                             read_mask(mask_path.read_bytes(), str(mask_path)), **detection)
        if aligned is None:
            without.append(name)
            continue
        face, mask = aligned
        (outputs[0] / f"{name}.png").write_bytes(encode_png(face))
        grey = np.clip(np.rint(mask * 255.0), 0, 255).astype(np.uint8)
        (outputs[1] / f"{name}{MASK_SUFFIX}.png").write_bytes(cv2.imencode(".png", grey)[1].tobytes())
        written += 1
    if without:
        logging.warning("%d photos without a detected face, e.g. %s", len(without), without[:_SHOWN])
    return {"written": written, "without_face": len(without), "unpaired_images": len(listing.unpaired_images),
            "unpaired_masks": len(listing.unpaired_masks)}
