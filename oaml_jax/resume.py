"""What a resumed run must agree with: the config and the data its checkpoint was trained on.

A resume is refused when a config field that changes the model or the data order differs from the saved
config (`check_resumed_config`), or when the data differs from the record the checkpoint keeps
(`check_resumed_data`); each has a config flag that resumes anyway.

A class row of the AdaFace kernel belongs to one identity through its label. If identity folders are added,
removed or renamed between two runs of the same workdir, labels shift (folder labels are positions in
sorted order) and every later row silently trains another person. The record is cheap for MS1M-sized
sets: the record count, the class count, a SHA-256 of the int32 labels in record order (5.8M labels: 23 MB
hashed in well under a second), and, for folder sources, the identity names in label order (85k short
names: about 1 MB of JSON), so a refusal can name the identities that changed.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any, Optional

import ml_collections
import numpy as np
from absl import logging

from oaml_jax.configs import default as default_config

# How many identity names a message lists before it counts the rest.
_NAMED = 5


def describe_data(source: Any, labels: np.ndarray) -> dict:
    """The record of a training source (`pipeline.open_source`) and its labels `[N]` (integers).

    Returns:
        JSON-serializable {"records", "num_classes", "labels_sha256", "class_names" (list or None)}.
    """
    names = getattr(source, "class_names", None)
    return {"records": int(len(labels)), "num_classes": int(source.num_classes),
            "labels_sha256": hashlib.sha256(np.ascontiguousarray(labels, dtype="<i4").tobytes()).hexdigest(),
            "class_names": list(names) if names is not None else None}


def _listed(names: list[str]) -> str:
    more = f" and {len(names) - _NAMED} more" if len(names) > _NAMED else ""
    return ", ".join(repr(n) for n in names[:_NAMED]) + more


def differences(saved: dict, current: dict) -> list[str]:
    """What changed between two records (empty when the data is the same), each as a short phrase."""
    changes = []
    old_names, new_names = saved.get("class_names"), current.get("class_names")
    if old_names is not None and new_names is not None and old_names != new_names:
        added = sorted(set(new_names) - set(old_names))
        removed = sorted(set(old_names) - set(new_names))
        if added:
            changes.append(f"identities added: {_listed(added)}")
        if removed:
            changes.append(f"identities removed: {_listed(removed)}")
        old_label = {n: i for i, n in enumerate(old_names)}
        moved = [f"{n!r} was class {old_label[n]}, now {i}" for i, n in enumerate(new_names)
                 if n in old_label and old_label[n] != i]
        if moved:
            more = f" (and {len(moved) - _NAMED} more)" if len(moved) > _NAMED else ""
            changes.append(f"classes renumbered: {'; '.join(moved[:_NAMED])}{more}")
    for field, what in (("records", "records"), ("num_classes", "classes")):
        if saved.get(field) != current.get(field):
            changes.append(f"{what}: saved {saved.get(field)}, now {current.get(field)}")
    if not changes and saved.get("labels_sha256") != current.get("labels_sha256"):
        changes.append("the labels of the records differ (same counts; labels_sha256 differs)")
    return changes


def check_resumed_data(saved: Optional[dict], current: dict, *, data_path: str, allow: bool, step: int,
                       num_model_classes: int, max_label: int) -> None:
    """Refuses to resume on other data than the checkpoint's, and labels past its class kernel.

    Args:
        saved: the checkpoint's record (None for a checkpoint written before records existed: not compared).
        current: the record of this run's data.
        data_path: `data.path`, for messages.
        allow: `train.allow_data_change`: resume anyway (the class kernel is kept as it is: row i goes on
            training as class i of the new data; labels past its rows are still refused).
        step: the checkpoint's step, for messages.
        num_model_classes: the checkpoint's class-kernel rows.
        max_label: the largest label of this run's data.

    Raises:
        ValueError: naming what changed (unless allowed), or a label past the kernel (always).
    """
    changes = differences(saved, current) if saved is not None else []
    if changes:
        message = (f"data.path={data_path} is not the data the checkpoint of step {step} was trained on: "
                   + "; ".join(changes))
        if not allow:
            raise ValueError(message + ". Resume on that data, use another --workdir, or set "
                             "--config.train.allow_data_change=True (class kernel row i then trains class i of the "
                             "new data)")
    if max_label >= num_model_classes:
        raise ValueError(f"data.path={data_path} holds labels up to {max_label} but the checkpoint of step {step} "
                         f"has a class kernel of {num_model_classes} classes: resume on the data it was trained on, "
                         "or start a new run in another --workdir")
    if not changes:
        return
    logging.warning("%s (train.allow_data_change=True: class kernel row i now trains class i of this data)", message)


# Fields whose change between a checkpoint and its resumed run changes the model or the data order.
_RESUME_FIELDS = ("seed", "model", "data.source", "data.sampler", "data.k", "data.seed", "data.augment",
                  "data.occlusion", "train.batch_size")


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, Mapping):
        return {k: v for key, value in tree.items() for k, v in _flatten(value, f"{prefix}{key}.").items()}
    return {prefix[:-1]: tree}


def config_differences(saved: Mapping[str, Any], config: ml_collections.ConfigDict,
                       fields: Optional[tuple[str, ...]] = None, ignore: tuple[str, ...] = ()) -> list[str]:
    """Lists "field: saved X, now Y" for each leaf field where the two configs differ, of those under `fields` (all when
    None) and not under `ignore`.

    Both sides are compared as JSON (tuples and lists alike), as the checkpoint stores the config. A field the
    saved config lacks (one added to configs/default.py since it was saved) counts as its default value.
    """
    flat_json = lambda tree: _flatten(json.loads(json.dumps(tree)))
    current = flat_json(config.to_dict())
    saved = {**flat_json(default_config.get_config().to_dict()), **flat_json(saved)}
    under = lambda key, prefixes: any(key == f or key.startswith(f + ".") for f in prefixes)
    relevant = lambda key: (fields is None or under(key, fields)) and not under(key, ignore)
    return [f"{key}: saved {saved.get(key)!r}, now {current.get(key)!r}" for key in sorted(set(saved) | set(current))
            if relevant(key) and saved.get(key) != current.get(key)]


def check_resumed_config(saved: Mapping[str, Any], config: ml_collections.ConfigDict) -> None:
    """Refuses to resume a checkpoint with a config that changes the model or the data order.

    Raises:
        ValueError: listing each changed field with its saved and new value, unless
            `train.allow_config_change` is set (then it is logged as a warning).
    """
    changed = config_differences(saved, config, _RESUME_FIELDS)
    if not changed:
        return
    message = ("the config differs from the one the checkpoint was trained with in fields that change the model or "
               "the data order: " + "; ".join(changed))
    if not config.train.allow_config_change:
        raise ValueError(message + ". Use another --workdir for a new run, or resume as it was; "
                         "--config.train.allow_config_change=True resumes anyway.")
    logging.warning("%s (train.allow_config_change=True: resuming anyway)", message)
