"""The inference command line (align, embed, verify) on real photos in a folder with junk files."""

import os
import shutil
import subprocess
import sys

import cv2
import matplotlib.cbook as cbook
import numpy as np
import pytest
from absl import app, flags
from PIL import Image
from test_inference import ATOL, REPO, faces
from tiny_checkpoint import STEP

from data_pipelines.images import decode_image, encode_jpeg, encode_png
from oaml_jax import align, inference
from oaml_jax.evaluation import calibration, fusion
from oaml_jax.evaluation import verdict as verdict_lib

_DATA = os.path.join(os.path.dirname(__file__), "data")
PHOTOS = ("aligned.png", "astronaut_head.jpg", "broken.jpg", "grace_hopper.jpg", "uniform.jpg")
JUNK = (".DS_Store", "._grace_hopper.jpg", "notes.txt")


def _rgb(path):
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


@pytest.fixture(scope="module")
def portraits():
    return {"grace_hopper.jpg": _rgb(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)),
            "astronaut_head.jpg": _rgb(os.path.join(_DATA, "astronaut_head.jpg"))}


@pytest.fixture(scope="module")
def photos(tmp_path_factory, portraits):
    """Two portraits, an aligned 112x112 crop, a photo without a face, a damaged JPEG, and macOS/other junk."""
    folder = tmp_path_factory.mktemp("photos")
    shutil.copy(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False), folder / "grace_hopper.jpg")
    shutil.copy(os.path.join(_DATA, "astronaut_head.jpg"), folder / "astronaut_head.jpg")
    (folder / "aligned.png").write_bytes(encode_png(faces(1, seed=7)[0]))
    # Below Hopper's chin: uniform, ribbons and flag, no face (tests/test_align.py).
    (folder / "uniform.jpg").write_bytes(encode_jpeg(np.ascontiguousarray(portraits["grace_hopper.jpg"][400:])))
    (folder / "broken.jpg").write_bytes(encode_jpeg(faces(1)[0])[:300])
    (folder / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1" + bytes(100))
    (folder / "._grace_hopper.jpg").write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X" + bytes(60))
    (folder / "notes.txt").write_text("not a photo\n")
    assert sorted(os.listdir(folder)) == sorted(PHOTOS + JUNK)
    return folder


@pytest.fixture(scope="module")
def expected_faces(portraits):
    """What the folder should give, by name: MTCNN's largest face of each portrait, the crop as it is."""
    found = {name: align.detect_and_align(image)[0].face for name, image in portraits.items()}
    return {"aligned.png": faces(1, seed=7)[0], **found}




SUMMARY = ("5 photos, 3 faces, 1 without a face (uniform.jpg), 1 unreadable (broken.jpg: ")
SKIPPED = "3 other entries skipped (.DS_Store, ._grace_hopper.jpg, notes.txt)"


def run_main(*args):
    """`inference.main` with its flags parsed from `args`, as `python -m oaml_jax.inference ARGS` runs it."""
    flag_values = flags.FlagValues()
    inference.define_flags(flag_values)
    inference.main(flag_values(["oaml-inference", *args]), flag_values)


def test_align_writes_one_crop_per_face_and_reports_the_rest(photos, expected_faces, tmp_path, capsys):
    out = tmp_path / "crops"
    run_main("align", f"--images={photos}", f"--out={out}")
    summary = capsys.readouterr().out
    assert summary.startswith(SUMMARY) and summary.rstrip().endswith(SKIPPED)
    assert sorted(os.listdir(out)) == ["aligned.png", "astronaut_head.png", "grace_hopper.png"]
    for name, face in expected_faces.items():
        crop = decode_image((out / (os.path.splitext(name)[0] + ".png")).read_bytes())
        np.testing.assert_array_equal(crop, face)  # PNG: exactly the aligned face


def test_align_all_faces_of_a_group_photo(portraits, tmp_path, capsys):
    """A 480x900 photo with Hopper (large) and the astronaut (small): two crops, largest first."""
    canvas = np.full((480, 900, 3), 96, np.uint8)
    canvas[:, 20:430] = cv2.resize(portraits["grace_hopper.jpg"], (410, 480), interpolation=cv2.INTER_AREA)
    canvas[200:354, 600:754] = cv2.resize(portraits["astronaut_head.jpg"], (154, 154), interpolation=cv2.INTER_AREA)
    folder = tmp_path / "group"
    folder.mkdir()
    (folder / "group.png").write_bytes(encode_png(canvas))
    run_main("align", f"--images={folder}", f"--out={tmp_path / 'crops'}", "--mode=all")
    assert capsys.readouterr().out.strip() == "1 photo, 2 faces, 0 without a face"
    expected = align.detect_and_align(canvas, mode="all")
    for k in range(2):
        np.testing.assert_array_equal(decode_image((tmp_path / "crops" / f"group_{k}.png").read_bytes()),
                                      expected[k].face)
    # A larger minimum face size keeps Hopper only.
    run_main("align", f"--images={folder}", f"--out={tmp_path / 'big'}", "--mode=all", "--min_face_size=100")
    assert capsys.readouterr().out.strip() == "1 photo, 1 face, 0 without a face"
    assert os.listdir(tmp_path / "big") == ["group_0.png"]


def test_embed_writes_embeddings_and_row_names(photos, workdir, face_model, expected_faces, tmp_path, capsys):
    out = tmp_path / "feats.npy"
    run_main("embed", f"--workdir={workdir}", f"--images={photos}", f"--out={out}", "--batch_size=4")
    assert capsys.readouterr().out.startswith(SUMMARY)
    names = ["aligned.png", "astronaut_head.jpg", "grace_hopper.jpg"]
    assert (tmp_path / "feats.txt").read_text() == "".join(f"{n}\t0\n" for n in names)
    embeddings = np.load(out)
    assert embeddings.shape == (3, 32) and embeddings.dtype == np.float32
    expected, _ = face_model.embed(np.stack([expected_faces[n] for n in names]))
    np.testing.assert_allclose(embeddings, expected, atol=ATOL)
    # --aligned: no detection; the photos that are not 112x112 crops are reported, not embedded.
    run_main("embed", f"--workdir={workdir}", f"--images={photos}", f"--out={out}", "--aligned")
    summary = capsys.readouterr().out
    assert summary.startswith("5 photos, 1 face, 0 without a face, 4 unreadable (")
    assert "grace_hopper.jpg: 512x600, not a 112x112 aligned face (--aligned)" in summary
    np.testing.assert_allclose(np.load(out), expected[:1], atol=ATOL)


def test_embed_without_any_face_writes_nothing(photos, workdir, tmp_path, capsys):
    folder = tmp_path / "none"
    folder.mkdir()
    for name in ("uniform.jpg", "notes.txt", ".DS_Store"):
        shutil.copy(photos / name, folder / name)
    with pytest.raises(SystemExit, match=r"embed: no face in .*none; nothing written"):
        run_main("embed", f"--workdir={workdir}", f"--images={folder}", f"--out={tmp_path / 'f.npy'}")
    assert capsys.readouterr().out.startswith("1 photo, 0 faces, 1 without a face (uniform.jpg)")
    assert not os.path.exists(tmp_path / "f.npy")
    with pytest.raises(app.UsageError, match=r"--images=.*empty: no image files \(.*\.jpg/.*\.webp\) in it"):
        (tmp_path / "empty").mkdir()
        run_main("embed", f"--workdir={workdir}", f"--images={tmp_path / 'empty'}", f"--out={tmp_path / 'f.npy'}")


def _two_faces_scores(face_model, expected_faces, stats):
    pair = face_model.match(expected_faces["grace_hopper.jpg"][None], expected_faces["astronaut_head.jpg"][None],
                            stats=stats)
    return {name: float(value[0, 0]) for name, value in pair.items()}


def test_verify_prints_the_verdict_at_the_chosen_far(photos, workdir, face_model, expected_faces, tmp_path,
                                                     capsys):
    run = str(tmp_path / "run")
    shutil.copytree(workdir, run)
    hopper, astronaut = str(photos / "grace_hopper.jpg"), str(photos / "astronaut_head.jpg")
    # No calibration yet: said plainly, with the command that makes one; raw scores, no verdict.
    run_main("verify", f"--workdir={run}", hopper, astronaut, f"--out={tmp_path / 'raw.png'}")
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "2 photos, 2 faces, 0 without a face"
    assert lines[1].startswith(f"no calibration for step {STEP} ({run}/eval/calibration.json absent")
    assert f"python eval.py --config=<the run's config> --workdir={run}` writes one" in lines[1]
    assert [line.split()[0] for line in lines[2:5]] == ["adaface", "qaconv", "fused"]
    assert lines[4].split() == ["fused", "-"] and lines[5] == "verdict: no verdict: no calibration, scores only"
    assert os.path.getsize(tmp_path / "raw.png") > 0
    # A calibration whose thresholds sit just below each score at FAR 1e-2 and above at 1e-3 (test_inference.py
    # checks that verdict); --far picks 1e-2.
    stats = fusion.FusionStats(mean={"adaface": 0.1, "qaconv": 0.2}, std={"adaface": 0.3, "qaconv": 0.4})
    scores = _two_faces_scores(face_model, expected_faces, stats)
    thresholds = {name: {1e-2: value - 0.01, 1e-3: value + 0.01, 1e-4: value + 0.02} for name, value in scores.items()}
    calibration.save(calibration.Calibration(
        step=STEP, checkpoint="c", fitted_on=("lfw", "cfp_fp"), num_pairs=12000, num_impostors=6000,
        thresholds=thresholds, fusion_stats=stats, fusion_weights=fusion.DEFAULT_WEIGHTS),
        verdict_lib.calibration_path(run))
    run_main("verify", f"--workdir={run}", hopper, astronaut, "--far=0.01", f"--out={tmp_path / 'pair.png'}")
    lines = capsys.readouterr().out.splitlines()
    assert lines[1] == ("thresholds at FAR 0.01 fitted on the clean pairs of lfw, cfp_fp (12000 pairs, 6000 impostors) "
                        f"at step {STEP}; same when the score is above its threshold")
    for line, name in zip(lines[2:5], ("adaface", "qaconv", "fused")):
        assert line.split() == [name, f"{scores[name]:.4f}", ">", f"{scores[name] - 0.01:.4f}:", "same"]
    assert lines[5] == "verdict: same person (fused score at FAR 0.01)"
    png = decode_image((tmp_path / "pair.png").read_bytes())
    assert png.shape[:2] == (610, 430)  # title, two rows of faces, verdict and three score lines


def test_describe_calibration_warns_below_the_measurable_far():
    cal = calibration.Calibration(step=1, checkpoint="c", fitted_on=("lfw",), num_pairs=6000, num_impostors=3000,
                                  thresholds={"adaface": {1e-3: 0.3, 1e-4: 0.4}})
    verdict = verdict_lib.Verdict(scores={"adaface": 0.5}, far=1e-3, thresholds={"adaface": 0.3}, calibration=cal)
    assert verdict_lib.describe_calibration(verdict) == (
        "thresholds at FAR 0.001 fitted on the clean pairs of lfw (6000 pairs, 3000 impostors) at step 1; same when "
        "the score is above its threshold")
    verdict = verdict_lib.Verdict(scores={"adaface": 0.5}, far=1e-4, thresholds={"adaface": 0.4}, calibration=cal)
    assert verdict_lib.describe_calibration(verdict).splitlines()[1] == (
        "note: 3000 impostor pairs measure FAR down to 3.3e-04 only; at 0.0001 each threshold is the highest "
        "impostor score")


def test_verify_reports_a_photo_without_a_face_and_bad_flags(photos, workdir, capsys):
    hopper, uniform = str(photos / "grace_hopper.jpg"), str(photos / "uniform.jpg")
    with pytest.raises(SystemExit, match="verify: no verdict, no face in uniform.jpg"):
        run_main("verify", f"--workdir={workdir}", hopper, uniform)
    assert capsys.readouterr().out.strip() == "2 photos, 1 face, 1 without a face (uniform.jpg)"
    with pytest.raises(app.UsageError, match="verify compares the largest face of each photo; --mode=all is for"):
        run_main("verify", f"--workdir={workdir}", hopper, uniform, "--mode=all")
    with pytest.raises(app.UsageError, match=r"verify: expected two photos, got \[.*grace_hopper.jpg'\]"):
        run_main("verify", f"--workdir={workdir}", hopper)
    with pytest.raises(FileNotFoundError, match=r"verify: no photo file .*nope\.jpg"):
        run_main("verify", "--workdir=/nonexistent/run", hopper, str(photos / "nope.jpg"))  # before loading a model
    with pytest.raises(app.UsageError, match="embed: --images and --out required"):
        run_main("embed", f"--workdir={workdir}")
    with pytest.raises(app.UsageError, match="usage:"):
        run_main("identify", f"--workdir={workdir}")
    with pytest.raises(flags.IllegalFlagValueError, match="min_score"):
        run_main("align", "--min_score=1.5")


def test_command_line_exits_zero(photos, workdir, tmp_path):
    """`python -m oaml_jax.inference` (the `oaml-inference` script's `cli()`) exits 0 after writing its files."""
    folder = tmp_path / "crops"
    folder.mkdir()
    for name in ("aligned.png", "broken.jpg") + JUNK:
        shutil.copy(photos / name, folder / name)
    proc = subprocess.run(
        [sys.executable, "-m", "oaml_jax.inference", "embed", f"--workdir={workdir}", f"--images={folder}",
         f"--out={tmp_path / 'feats.npy'}"], cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO),
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("2 photos, 1 face, 0 without a face, 1 unreadable (broken.jpg: ")
    assert np.load(tmp_path / "feats.npy").shape == (1, 32)
    assert (tmp_path / "feats.txt").read_text() == "aligned.png\t0\n"


# Photos as phones and users make them (issue 21): orientation tags, other formats, large photos, outputs
# that would replace inputs.


def _phone_jpeg(upright, orientation=6):
    """What a phone writes: the pixels stored sideways, and the EXIF tag that turns them upright."""
    import io
    stored = np.ascontiguousarray(np.rot90(upright, 1))  # a viewer turns it back by 90 degrees clockwise (6)
    pil = Image.fromarray(stored)
    exif = pil.getexif()
    exif[0x0112] = orientation
    out = io.BytesIO()
    pil.save(out, "JPEG", quality=95, exif=exif)
    return out.getvalue()


def test_a_phone_portrait_stored_sideways_is_read_upright(portraits, expected_faces, tmp_path, capsys):
    folder = tmp_path / "phone"
    folder.mkdir()
    (folder / "portrait.jpg").write_bytes(_phone_jpeg(portraits["grace_hopper.jpg"]))
    assert decode_image((folder / "portrait.jpg").read_bytes()).shape[:2] == (512, 600)  # stored sideways
    run_main("align", f"--images={folder}", f"--out={tmp_path / 'crops'}")
    assert capsys.readouterr().out.strip() == "1 photo, 1 face, 0 without a face"
    crop = decode_image((tmp_path / "crops" / "portrait.png").read_bytes())
    # The upright portrait's face, up to the detail a JPEG re-encoding and sub-pixel landmark shifts change.
    blur = lambda face: cv2.GaussianBlur(face, (0, 0), 2).astype(int)
    assert np.abs(blur(crop) - blur(expected_faces["grace_hopper.jpg"])).mean() < 3


def test_every_readable_format_in_a_folder_is_read_and_the_rest_named(portraits, expected_faces, tmp_path, capsys):
    folder = tmp_path / "formats"
    (folder / "album").mkdir(parents=True)
    Image.fromarray(portraits["grace_hopper.jpg"]).save(folder / "hopper.webp", lossless=True)
    (folder / "aligned.png").write_bytes(encode_png(faces(1, seed=7)[0]))
    for name in ("clip.mov", "notes.txt", "thumbs.db", ".DS_Store", "x.psd", "y.heic"):
        (folder / name).write_bytes(b"junk")
    run_main("align", f"--images={folder}", f"--out={tmp_path / 'crops'}")
    assert capsys.readouterr().out.strip() == (
        "2 photos, 2 faces, 0 without a face, 7 other entries skipped (.DS_Store, album/, clip.mov, notes.txt, "
        "thumbs.db and 2 more)")
    np.testing.assert_array_equal(decode_image((tmp_path / "crops" / "hopper.png").read_bytes()),
                                  expected_faces["grace_hopper.jpg"])


def _tree_bytes(folder):
    return {name: (folder / name).read_bytes() for name in sorted(os.listdir(folder))}


def test_no_command_writes_over_its_input(photos, workdir, tmp_path, monkeypatch):
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("aligned.png", "grace_hopper.jpg", "notes.txt"):
        shutil.copy(photos / name, folder / name)
    before = _tree_bytes(folder)
    # --out equal to --images (also through a link or "..") is refused before detection, nothing written.
    os.symlink(folder, tmp_path / "link")
    for out in (folder, tmp_path / "link", folder / ".." / "photos"):
        with pytest.raises(app.UsageError, match=r"align: --out=.* is the --images folder: the crops would be "
                                                 r"written among the photos"):
            run_main("align", f"--images={folder}", f"--out={out}")
    # A crop whose path is an input file (here a link to it in --out) is refused before any crop is written.
    crops = tmp_path / "crops"
    crops.mkdir()
    os.symlink(folder / "aligned.png", crops / "aligned.png")
    with pytest.raises(app.UsageError, match=r"align: .*crops/aligned.png would be written over the input "
                                             r".*photos/aligned.png; nothing written"):
        run_main("align", f"--images={folder}", f"--out={crops}")
    assert os.listdir(crops) == ["aligned.png"]
    # embed's .npy / .txt and verify's PNG: not over a photo either (embed: before detection; verify: before the
    # model loads).
    monkeypatch.setattr(inference.CalibratedFaceModel, "from_workdir", lambda *a, **k: pytest.fail("model loaded"))
    monkeypatch.setattr(inference, "faces_from_folder", lambda *a, **k: pytest.fail("faces detected"))
    with pytest.raises(app.UsageError, match=r"embed: .*photos/grace_hopper.jpg would be written over the input"):
        run_main("embed", f"--workdir={workdir}", f"--images={folder}", f"--out={folder / 'grace_hopper.jpg'}")
    with pytest.raises(app.UsageError, match=r"verify: .*grace_hopper.jpg would be written over the input"):
        run_main("verify", f"--workdir={workdir}", str(folder / "aligned.png"), str(folder / "grace_hopper.jpg"),
                 f"--out={folder / 'grace_hopper.jpg'}")
    assert _tree_bytes(folder) == before


def test_no_command_writes_a_non_finite_embedding_or_score(photos, workdir, tmp_path, monkeypatch):
    # Restore refuses NaN weights (test_checkpoint); this is the last guard, at the outputs themselves.
    nan_embed = lambda self, faces: (np.full((len(faces), 4), np.nan, np.float32), np.ones(len(faces), np.float32))
    monkeypatch.setattr(inference.CalibratedFaceModel, "embed", nan_embed)
    out = tmp_path / "emb.npy"
    with pytest.raises(ValueError, match=r"^the embeddings of .*photos\d* \(nothing written\) holds NaN or Inf in "
                                         r"value \(12 of 12 values\); refusing to use it$"):
        run_main("embed", f"--workdir={workdir}", f"--images={photos}", f"--out={out}", "--mode=largest")
    assert not out.exists() and not out.with_suffix(".txt").exists()
    nan_match = lambda self, a, b, stats=None: {"adaface": np.array([[np.inf]]), "qaconv": None, "fused": None}
    monkeypatch.setattr(inference.CalibratedFaceModel, "match", nan_match)
    with pytest.raises(ValueError, match=r"^the pair's scores holds NaN or Inf in \['adaface'\]"):
        run_main("verify", f"--workdir={workdir}", str(photos / "grace_hopper.jpg"), str(photos / "aligned.png"))


def test_an_uncalibrated_far_is_refused_before_the_model_loads(photos, workdir, tmp_path, monkeypatch):
    monkeypatch.setattr(inference.CalibratedFaceModel, "from_workdir", lambda *a, **k: pytest.fail("model loaded"))
    hopper, astronaut = str(photos / "grace_hopper.jpg"), str(photos / "astronaut_head.jpg")
    with pytest.raises(app.UsageError, match=r"^--far: far=0.05: eval.py calibrates at 0.01, 0.001, 0.0001 only$"):
        run_main("verify", f"--workdir={workdir}", hopper, astronaut, "--far=0.05")
    run = tmp_path / "run"
    shutil.copytree(workdir, run)
    calibration.save(calibration.Calibration(step=STEP, checkpoint="c", fitted_on=("lfw",), num_pairs=10,
                                             num_impostors=5, thresholds={"adaface": {1e-2: 0.3}}),
                     verdict_lib.calibration_path(run))
    with pytest.raises(app.UsageError, match=r"^--far: far=0.001: no threshold at that FAR; calibrated at 0.01$"):
        run_main("verify", f"--workdir={run}", hopper, astronaut, "--far=0.001")


def _cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "oaml_jax.inference", *args], cwd=REPO,
                          env=dict(os.environ, PYTHONPATH=REPO), capture_output=True, text=True, timeout=timeout)


def test_refusals_are_one_line_not_the_help(photos, workdir):
    """What a user sees: `error: <the problem>` as the last and only line of the command's own, exit 1."""
    hopper, astronaut = str(photos / "grace_hopper.jpg"), str(photos / "astronaut_head.jpg")
    for args, line in [
            (("verify", f"--workdir={workdir}", hopper),
             f"error: verify: expected two photos, got ['{hopper}'] (see --help)"),
            (("verify", f"--workdir={workdir}", hopper, astronaut, "--far=0.05"),
             "error: --far: far=0.05: eval.py calibrates at 0.01, 0.001, 0.0001 only")]:  # flags: test_logs.py
        proc = _cli(*args)
        assert proc.returncode == 1, proc.stderr[-2000:]
        own = [text for text in proc.stderr.splitlines() if not _library_startup(text)]
        assert own == [line], proc.stderr[-2000:]


def _library_startup(line):
    """TensorFlow's C++ start-up lines, printed before any Python code can filter them (see oaml_jax/logs.py)."""
    return "absl::InitializeLog()" in line or "oneDNN custom operations" in line


def test_photos_of_48_megapixels_peak_under_1_5_gib(portraits, tmp_path):
    """An 8000x6000 photo with Hopper's portrait (1024x1200) in it: the face found, the process's peak
    resident memory (TensorFlow and JAX loaded included) under 1.5 GiB (7 GiB detecting at full size)."""
    photo = np.full((6000, 8000, 3), 128, np.uint8)
    face = cv2.resize(portraits["grace_hopper.jpg"], (1024, 1200), interpolation=cv2.INTER_CUBIC)
    photo[2000:3200, 3000:4024] = face
    (tmp_path / "big").mkdir()
    (tmp_path / "big" / "big.jpg").write_bytes(encode_jpeg(photo, quality=90))
    del photo
    # VmHWM: the peak resident set of this process's own memory since its exec (ru_maxrss would carry the
    # parent's peak over the fork).
    code = (f"from oaml_jax import photos\n"
            f"found = photos.faces_from_folder({str(tmp_path / 'big')!r})\n"
            f"print(found.summary())\n"
            f"print(next(line.split()[1] for line in open('/proc/self/status') if line.startswith('VmHWM:')))\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary, peak_kib = proc.stdout.splitlines()
    assert summary == "1 photo, 1 face, 0 without a face"
    assert int(peak_kib) < 1.5 * 2 ** 20, f"peak {int(peak_kib) / 2 ** 20:.2f} GiB"
