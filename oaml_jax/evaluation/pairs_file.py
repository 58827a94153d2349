"""Type "pairs_file": an LFW-format `pairs.txt` on an image root (LFW, MFR2, MLFW, CALFW/CPLFW originals).

File format (whitespace-separated, blank lines ignored):
    10 300                  optional header: folds and pairs of each kind per fold ("S P": S x 2P rows follow),
                            or one number N (the rows that follow: N, or N of each kind), or none at all
    Aaron_Peirsol 1 2       a genuine pair: <root>/Aaron_Peirsol/Aaron_Peirsol_0001.<ext> and ..._0002.<ext>
    AJ_Cook 1 Marsha_Thomason 1     an impostor pair (the same name twice counts as genuine)
The folds are the file's own: contiguous, S of them with an "S P" header, else 10; each must hold both kinds of
pair (LFW's layout: each fold's same rows, then its different rows), else the file is refused. Images: any extension of
`data_pipelines.images.READABLE_EXTENSIONS` (either case), aligned 112x112 crops or photos to detect and align
(unless `aligned`). A pair whose image gives no face is dropped and counted (the folds are then split over the
remaining pairs); an image the file names that does not exist is an error naming the file and line.

Protocol: `pairs.PairSetEvaluator` (10-fold accuracy, TAR@1e-3, AUC; AdaFace, QAConv, fused, gated; variants).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import tqdm
from etils import epath

from data_pipelines.images import READABLE_EXTENSIONS
from oaml_jax.evaluation import base, pairs, verification
from oaml_jax.paths import user_path
from oaml_jax.photos import faces_from_photos


@dataclasses.dataclass(frozen=True)
class PairsFile:
    """Parsed pairs file: `rows` (name1, n1, name2, n2, line number), `issame` `[N]` bool, `n_folds`."""

    rows: list[tuple[str, int, str, int, int]]
    issame: np.ndarray
    n_folds: int


def _is_int(text: str) -> bool:
    return text.isdigit()


def parse_pairs_file(text: str, where: str) -> PairsFile:
    """Parses the text of a pairs file (see the module docstring).

    Raises:
        ValueError: a malformed line, or rows that disagree with the header, naming `where` and the line.
    """
    lines = [(k, line.split()) for k, line in enumerate(text.splitlines(), start=1) if line.split()]
    if not lines:
        raise ValueError(f"{where}: no pairs")
    header, header_line = None, lines[0][0]
    if 1 <= len(lines[0][1]) <= 2 and all(_is_int(f) for f in lines[0][1]):
        header = tuple(int(f) for f in lines[0][1])
        lines = lines[1:]
    rows = []
    for k, fields in lines:
        if len(fields) == 3 and _is_int(fields[1]) and _is_int(fields[2]):
            rows.append((fields[0], int(fields[1]), fields[0], int(fields[2]), k))
        elif len(fields) == 4 and _is_int(fields[1]) and _is_int(fields[3]):
            rows.append((fields[0], int(fields[1]), fields[2], int(fields[3]), k))
        else:
            raise ValueError(f"{where}:{k}: expected 'name n1 n2' (same) or 'name1 n1 name2 n2' (different), got "
                             f"{' '.join(fields)!r}")
    n_folds = pairs.N_FOLDS
    if header is not None and len(header) == 2:
        n_folds, per_fold = header
        if n_folds < 2:
            raise ValueError(f"{where}:{header_line}: header '{n_folds} {per_fold}': {n_folds} "
                             f"fold{'' if n_folds == 1 else 's'}; the 10-fold protocol needs at least 2")
        if len(rows) != n_folds * 2 * per_fold:
            raise ValueError(f"{where}:{header_line}: header '{n_folds} {per_fold}' means {n_folds} folds of "
                             f"2 x {per_fold} pairs ({n_folds * 2 * per_fold} rows); the file has {len(rows)} rows")
    elif header is not None and len(rows) not in (header[0], 2 * header[0]):
        raise ValueError(f"{where}:{header_line}: header '{header[0]}' announces {header[0]} rows (or {header[0]} "
                         f"of each kind); the file has {len(rows)}")
    if len(rows) < n_folds:
        per = max(len(rows) // 4, 1)
        raise ValueError(f"{where}: {len(rows)} pairs cannot be split into {n_folds} folds; for fewer folds, start "
                         f"the file with LFW's header line '<folds> <pairs per fold>' (e.g. '2 {per}': 2 folds, each "
                         f"{per} same then {per} different pairs)")
    issame = np.array([r[0] == r[2] for r in rows])
    check_folds(issame, n_folds, [r[4] for r in rows], where)
    return PairsFile(rows=rows, issame=issame, n_folds=n_folds)


def check_folds(issame: np.ndarray, n_folds: int, lines: Sequence[int], where: str) -> None:
    """Refuses folds without both kinds of pair: their accuracy and threshold mean nothing (0.00 or arbitrary).

    Args:
        issame: `[N]` bool, the pairs in file order.
        n_folds: the contiguous folds they are split into (`verification.fold_indices`).
        lines: `[N]` the line of each pair in the file.
        where: the file, named in the message.

    Raises:
        ValueError: naming the first such fold, its lines and its counts, and the layout the protocol expects.
    """
    for k, idx in enumerate(verification.fold_indices(issame.size, n_folds), start=1):
        same = int(issame[idx].sum())
        if same in (0, idx.size):
            first, last = lines[idx[0]], lines[idx[-1]]
            span = f"line {first}" if first == last else f"lines {first}-{last}"
            raise ValueError(
                f"{where}: fold {k} of {n_folds} ({span}) holds {same} same and "
                f"{idx.size - same} different pairs; the folds are the file's own, in file order, and each must hold "
                "both kinds (LFW's layout: each fold lists its same pairs, then its different pairs)")


def image_path(root: epath.Path, name: str, number: int, listing: dict[str, dict[str, epath.Path]]) -> epath.Path:
    """`<root>/<name>/<name>_<number:04d>.<ext>`, the extension found by listing the folder once.

    Raises:
        FileNotFoundError: no such image, naming the path looked for.
    """
    if name not in listing:
        folder = root / name
        listing[name] = ({p.stem: p for p in folder.iterdir() if p.suffix.lower() in READABLE_EXTENSIONS}
                         if folder.is_dir() else {})
    stem = f"{name}_{number:04d}"
    if stem not in listing[name]:
        raise FileNotFoundError(f"{root / name / stem}.<{'|'.join(e[1:] for e in READABLE_EXTENSIONS)}>: no such image")
    return listing[name][stem]


class PairsFileEvaluator(pairs.PairSetEvaluator):
    """Type "pairs_file". Settings: `pairs` (the file), `images` (the root), `aligned` (False), `variants`
    (default `eval.occlusion_variants`), `validation` (clean only)."""

    def __init__(self, name: str, settings: Mapping[str, Any], common: base.Common):
        self.grid_name = f"occlusion_grid_{name}"
        if not settings.get("pairs") or not settings.get("images"):
            raise ValueError(f"eval.evaluators.{name}: expected `pairs` (an LFW-format pairs.txt) and `images` (its "
                             "image root)")
        pairs_field = base.setting_field(name, settings, "pairs")
        path = user_path(settings["pairs"], pairs_field)
        root = user_path(settings["images"], base.setting_field(name, settings, "images"))
        if not path.is_file():
            raise FileNotFoundError(f"{pairs_field}={path}: no such file")
        parsed = parse_pairs_file(path.read_text(), str(path))
        listing: dict[str, dict[str, epath.Path]] = {}
        try:
            paths = [(image_path(root, a, i, listing), image_path(root, b, j, listing))
                     for a, i, b, j, _ in parsed.rows]
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{path}: {e}") from None
        faces = {}
        unique = list(dict.fromkeys(p for pair in paths for p in pair))
        for p in tqdm.tqdm(unique, desc=f"{name} photos", unit="photo", mininterval=5.0, disable=len(unique) <= 20):
            found = faces_from_photos([p], aligned=bool(settings.get("aligned", False)))
            faces[p] = found.faces[0] if found.sources else None
        keep = [k for k, (a, b) in enumerate(paths) if faces[a] is not None and faces[b] is not None]
        kept = set(keep)
        self.dropped = [f"{path.name}:{parsed.rows[k][4]}" for k in range(len(paths)) if k not in kept]
        if len(keep) < parsed.n_folds:
            raise ValueError(f"{path}: {len(keep)} of {len(paths)} pairs have a face in both images; the protocol "
                             f"needs at least {parsed.n_folds}")
        if len(keep) < len(paths):
            check_folds(parsed.issame[keep], parsed.n_folds, [parsed.rows[k][4] for k in keep],
                        f"{path} (without the {len(paths) - len(keep)} pairs that have no face)")
        images = np.stack([faces[p] for k in keep for p in paths[k]])
        self.counts = (len(keep), int(parsed.issame[keep].sum()), parsed.n_folds)
        pair_set = pairs.PairSet(name=name, path=path, images=images, issame=parsed.issame[keep],
                                 n_folds=parsed.n_folds)
        super().__init__(name, settings, common, {name: pair_set})

    def tables(self, result: Any) -> list[base.Table]:
        kept, same, folds = self.counts
        note = f"{self.name}: {kept} pairs ({same} genuine, {kept - same} impostor), {folds} folds"
        if self.dropped:
            note += f"; {len(self.dropped)} pairs dropped, no face in an image (lines {', '.join(self.dropped[:5])}" + (
                ", ...)" if len(self.dropped) > 5 else ")")
        return [dataclasses.replace(t, notes=(note,)) for t in super().tables(result)]
