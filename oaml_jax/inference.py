"""The `align`, `embed` and `verify` command line (console script `oaml-inference`).

Photos are detected and aligned (`oaml_jax.photos`, `align.detect_and_align`) unless they are 112x112
(taken as aligned) or `--aligned` is given:
    python -m oaml_jax.inference align --images=PHOTOS --out=CROPS [--mode=largest|all]
    python -m oaml_jax.inference embed --workdir=W --images=PHOTOS --out=feats.npy
    python -m oaml_jax.inference verify --workdir=W A.jpg B.jpg [--far=1e-3] [--out=pair.png]
Photos are read as a viewer shows them (EXIF orientation applied). Folders are listed by
`data_pipelines.folders.scan_images` (the extensions the decoder reads; hidden and AppleDouble files, other
files and subfolders are counted and named); a photo without a face (or an undecodable one) is reported by
name and counted in the summary line that ends every command, never fatal. No command writes over an input:
an `--out` that is the `--images` folder, or an output path that is an input photo, is refused before
anything is written.
- `align` writes `<stem>.png` per photo (`<stem>_<k>.png`, k = 0 for the largest face, with `--mode=all`).
- `embed` writes `[F, E]` float32 flip-fused embeddings of the F faces to `--out` and `<out>.txt`, one
  line per row: `<photo name>\\t<face index>` (faces of a photo largest first).
- `verify` compares the largest face of each photo: prints each score with its threshold and decision at
  `--far` (1e-2, 1e-3 or 1e-4), the overall verdict, or says that the workdir has no calibration yet; with
  `--out` it writes a PNG of both faces, their occlusion maps, the scores and the verdict
  (`oaml_jax.evaluation.verdict`).
Exit status 0, except 1 when there is nothing to do (no face to embed, no face in a photo to verify) and for a
refusal, which is one line `error: ...`.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from absl import app, flags, logging
from etils import epath

from data_pipelines.folders import scan_images
from data_pipelines.images import encode_png
from oaml_jax import align
from oaml_jax import checkpoint as checkpoint_lib
from oaml_jax import logs
from oaml_jax.evaluation import calibration as calibration_lib
from oaml_jax.evaluation.verdict import (DEFAULT_FAR, CalibratedFaceModel, calibration_path, describe_calibration,
                                         plot_verdict, verify_faces)
from oaml_jax.paths import real_path, user_path
from oaml_jax.photos import PhotoFaces, faces_from_folder, faces_from_photos

COMMANDS = ("align", "embed", "verify")


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """Defines the command line's flags (in `flag_values`; `cli()` uses the global ones)."""
    fv = {"flag_values": flag_values}
    flags.DEFINE_string("workdir", None, "embed, verify: training workdir or checkpoint directory (any epath).", **fv)
    flags.DEFINE_integer("step", None, "Checkpoint step; default the latest.", **fv)
    flags.DEFINE_integer("batch_size", None, "Images per forward pass.", **fv)
    flags.DEFINE_string("images", None, "align, embed: folder of photos (or aligned 112x112 crops).", **fv)
    flags.DEFINE_string("out", None, "align: folder of aligned crops; embed: .npy file (+ .txt row names); "
                        "verify: optional pair PNG.", **fv)
    flags.DEFINE_bool("aligned", False, "The inputs are aligned 112x112 crops: no detection (other sizes are "
                      "reported). Without it 112x112 inputs are taken as aligned and the others detected.", **fv)
    flags.DEFINE_enum("mode", "largest", align.DETECTION_MODES, "Faces kept per photo: the largest, or all "
                      "(align, embed).", **fv)
    flags.DEFINE_float("min_face_size", align.DEFAULT_MIN_FACE_SIZE, "Smallest face box side kept, in photo "
                       "pixels.", lower_bound=1.0, **fv)
    flags.DEFINE_float("min_score", align.DEFAULT_MIN_SCORE, "Smallest MTCNN face probability kept.",
                       lower_bound=0.0, upper_bound=1.0, **fv)
    flags.DEFINE_string("masks", None, "align: folder of the photos' occlusion masks (NAME_mask.png or NAME.png): "
                        "writes an aligned occlusion set, OUT/kept_faces + OUT/masks warped with each face.", **fv)
    flags.DEFINE_float("far", DEFAULT_FAR, "verify: false accept rate of the decision (one of "
                       f"{', '.join(f'{f:g}' for f in calibration_lib.FARS)}).", lower_bound=0.0, upper_bound=1.0,
                       **fv)


_USAGE = """usage:
  python -m oaml_jax.inference align --images=PHOTOS --out=CROPS [--mode=largest|all] [--aligned]
  python -m oaml_jax.inference align --images=PHOTOS --masks=MASKS --out=SET
  python -m oaml_jax.inference embed --workdir=W --images=PHOTOS --out=F.npy [--mode=largest|all] [--aligned]
  python -m oaml_jax.inference verify --workdir=W A.jpg B.jpg [--far=0.001] [--out=P.png] [--aligned]"""


def _require(flag_values: flags.FlagValues, command: str, *names: str) -> None:
    missing = [f"--{n}" for n in names if not flag_values[n].value]
    if missing:
        raise app.UsageError(f"{command}: {' and '.join(missing)} required (see --help)")


def _refuse_overwrite(command: str, outputs: Sequence[epath.Path], inputs: Sequence[epath.Path]) -> None:
    """Refuses to write any of `outputs` when it is one of the `inputs` (no command writes over its input).

    Raises:
        app.UsageError: naming the output and the input it would replace.
    """
    real_inputs = {real_path(p): p for p in inputs}
    for out in outputs:
        if real_path(out) in real_inputs:
            raise app.UsageError(f"{command}: {out} would be written over the input {real_inputs[real_path(out)]}; "
                                 "nothing written, choose another --out")


def _photo_names(faces: PhotoFaces) -> list[str]:
    """The names of every photo read: with faces, without, and unreadable."""
    return sorted({name for name, _ in faces.sources} | set(faces.without_face) | {n for n, _ in faces.unreadable})


def _check_far(f: flags.FlagValues) -> None:
    """Refuses a `--far` the workdir's calibration (or, without one, eval.py) has no threshold at; reads
    `calibration.json` only, before any model is loaded.

    Raises:
        app.UsageError: naming the calibrated rates.
    """
    _, step = checkpoint_lib.locate(f.workdir, f.step)
    calibration = calibration_lib.load(calibration_path(f.workdir), step)
    if calibration is not None:
        try:
            calibration.far_key(f.far)
        except ValueError as e:
            raise app.UsageError(f"--far: {e}") from e
    elif not any(math.isclose(f.far, far, rel_tol=1e-6) for far in calibration_lib.FARS):
        raise app.UsageError(f"--far: far={f.far:g}: eval.py calibrates at "
                             f"{', '.join(f'{far:g}' for far in calibration_lib.FARS)} only")


def _crop_names(faces: PhotoFaces, mode: str) -> list[str]:
    names = [f"{epath.Path(name).stem}{f'_{k}' if mode == 'all' else ''}.png" for name, k in faces.sources]
    clashes = sorted({n for n in names if names.count(n) > 1})
    if clashes:
        raise app.UsageError(f"align: photos with the same name but another extension would both be written as "
                             f"{', '.join(clashes)}; rename one of them")
    return names


def main(argv: Sequence[str], flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """Runs `argv[1]` (align, embed or verify) with the parsed `flag_values`; see the module docstring.

    Raises:
        app.UsageError: an unknown command, missing or conflicting flags.
        SystemExit: status 1 when there is nothing to do (no face to embed, no face in a photo to verify).
    """
    if len(argv) < 2 or argv[1] not in COMMANDS:
        got = f"got {argv[1]!r}" if len(argv) > 1 else "got none"
        raise app.UsageError(f"expected a command: align, embed or verify ({got}); {_USAGE}")
    command, args, f = argv[1], list(argv[2:]), flag_values
    detection = {"aligned": f.aligned, "mode": f.mode, "min_face_size": f.min_face_size, "min_score": f.min_score}
    if command == "verify":
        if len(args) != 2:
            raise app.UsageError(f"verify: expected two photos, got {args} (see --help)")
        if f.mode != "largest":
            raise app.UsageError("verify compares the largest face of each photo; --mode=all is for align and embed")
        _require(f, command, "workdir")
        _verify(f, args, detection)
        return
    if args:
        raise app.UsageError(f"{command}: unexpected arguments {args} (see --help)")
    if command == "align" and f.masks:
        _require(f, command, "images", "out")
        from data_pipelines import occlusion_set_align  # aligns an occlusion set; only this command needs it
        counts = occlusion_set_align.align_set(f.images, f.masks, f.out, min_face_size=f.min_face_size,
                                               min_score=f.min_score)
        print(", ".join(f"{v} {k.replace('_', ' ')}" for k, v in counts.items()))
        return
    _require(f, command, "images", "out", *(("workdir",) if command == "embed" else ()))
    if command == "embed":
        checkpoint_lib.locate(f.workdir, f.step)  # a wrong --workdir is refused before detection runs
    images, out = user_path(f.images, "--images"), user_path(f.out, "--out")
    if command == "align" and real_path(out) == real_path(images):
        raise app.UsageError(f"align: --out={f.out} is the --images folder: the crops would be written among the "
                             "photos, over any of the same name; choose another folder")
    if command == "embed" and images.is_dir():  # before detection, which takes a while (align's crop names need it)
        _refuse_overwrite(command, [out, out.with_suffix(".txt")], scan_images(images)[0])
    try:
        photo_faces = faces_from_folder(images, **detection)
    except FileNotFoundError as e:
        raise app.UsageError(str(e)) from e
    if command == "align":
        names = _crop_names(photo_faces, f.mode)
        _refuse_overwrite(command, [out / name for name in names], [images / n for n in _photo_names(photo_faces)])
        out.mkdir(parents=True, exist_ok=True)
        for name, face in zip(names, photo_faces.faces):
            (out / name).write_bytes(encode_png(face))
        logging.info("wrote %d aligned faces to %s", len(names), out)
        print(photo_faces.summary())
        return
    print(photo_faces.summary())
    if not photo_faces.sources:
        sys.exit(f"embed: no face in {f.images}; nothing written")
    model = CalibratedFaceModel.from_workdir(f.workdir, f.step, batch_size=f.batch_size)
    embeddings, _ = model.embed(photo_faces.faces)
    checkpoint_lib.check_finite(embeddings, f"the embeddings of {f.images} (nothing written)")
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("wb") as fh:
        np.save(fh, embeddings)
    out.with_suffix(".txt").write_text("".join(f"{name}\t{k}\n" for name, k in photo_faces.sources))
    logging.info("wrote %s embeddings to %s (row names in %s)", embeddings.shape, out, out.with_suffix(".txt"))


def _verify(f: flags.FlagValues, photos: Sequence[str], detection: Mapping[str, Any]) -> None:
    paths = [user_path(p, "photo") for p in photos]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"verify: no photo file {', '.join(missing)}")
    if f.out:
        _refuse_overwrite("verify", [user_path(f.out, "--out")], paths)
    _check_far(f)
    model = CalibratedFaceModel.from_workdir(f.workdir, f.step, batch_size=f.batch_size)
    photo_faces = faces_from_photos(paths, **detection)
    print(photo_faces.summary())
    if len(photo_faces.sources) != 2:
        problems = [f"no face in {name}" for name in photo_faces.without_face]
        problems += [f"{name} unreadable" for name, _ in photo_faces.unreadable]
        sys.exit(f"verify: no verdict, {', '.join(problems)}")
    face_a, face_b = photo_faces.faces
    verdict = verify_faces(model, face_a, face_b, f.far)
    if verdict.calibration is None:
        print(f"no calibration for step {model.step} ({calibration_path(f.workdir)} absent or fitted for another "
              f"step): raw scores only, higher = more alike; `python eval.py --config=<the run's config> "
              f"--workdir={f.workdir}` writes one")
    else:
        print(describe_calibration(verdict))
    for line in verdict.lines():
        print(f"  {line}")
    print(f"verdict: {verdict.headline()}")
    if f.out:
        maps = model.occlusion_maps(photo_faces.faces) if model.has_qaconv else None
        written = plot_verdict(verdict, face_a, face_b, maps, f.out, title=f"{paths[0].name} vs {paths[1].name}")
        logging.info("wrote %s", written)


def cli() -> None:
    """The `oaml-inference` console script: defines the flags and runs `main`."""
    define_flags()
    logs.run(main)


if __name__ == "__main__":
    cli()
