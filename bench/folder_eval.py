"""Folder verification throughput: pairs scored per second and the host memory of the all-pairs engine.

    python bench/folder_eval.py                          # 1,000 faces of 200 identities, the test-size model
    python bench/folder_eval.py --faces=4000 --arch=demo --tile=512

A randomly initialized model (`oaml_jax/configs/default.py:test`, or the demo's width with --arch=demo) scores
every pair of --faces synthetic aligned faces (`FolderEvaluator`, clean variant). Printed: faces extracted per
second, pairs per second with AdaFace only (matrix products per tile) and with QAConv (the blocked matcher per
tile, both directions; fused and gated derived), each run twice and the second (warm) run reported, and the
peak host memory the all-pairs engine traced (tracemalloc) against what all pair scores would take.
"""

import os
import sys
import tempfile
import time
import tracemalloc

import jax
import jax.numpy as jnp
import ml_collections
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data_pipelines import synthetic  # noqa: E402  (needs the repo root on sys.path)
from data_pipelines.images import encode_png  # noqa: E402
from oaml_jax.configs import default, demo  # noqa: E402
from oaml_jax.evaluation import base, evaluators, folder  # noqa: E402
from oaml_jax.serving import FaceModel  # noqa: E402
from oaml_jax.models import factory  # noqa: E402

_FACES = flags.DEFINE_integer("faces", 1000, "Faces in the folder.")
_PER_ID = flags.DEFINE_integer("per_identity", 5, "Faces per identity.")
_ARCH = flags.DEFINE_enum("arch", "test", ["test", "demo"], "Model width: default.py:test or demo.py.")
_TILE = flags.DEFINE_integer("tile", 256, "Faces per tile side.")
_BATCH = flags.DEFINE_integer("batch", 64, "Extraction batch.")


def _model(qaconv: bool) -> FaceModel:
    config = default.get_config("test") if _ARCH.value == "test" else demo.get_config()
    model = factory.build_model(config.model, 16)
    variables = jax.jit(lambda rng: model.init({"params": rng, "dropout": rng}, jnp.zeros((2, 112, 112, 3)),
                                               jnp.zeros((2,), jnp.int32), jnp.ones((2, 7, 7)), train=False))(
        jax.random.PRNGKey(0))
    if not qaconv:
        model = factory.build_embedding_model(config.model)
        variables = {k: {"backbone": v["backbone"]} for k, v in variables.items()}
    return FaceModel(model, variables, factory.input_contract(config.model), batch_size=_BATCH.value)


def main(argv):
    del argv
    with tempfile.TemporaryDirectory() as root:
        for k in range(_FACES.value):
            ident, image = divmod(k, _PER_ID.value)
            os.makedirs(os.path.join(root, f"id{ident:05d}"), exist_ok=True)
            face = synthetic.render_face(synthetic.identity_params(0, ident), image, 0)
            with open(os.path.join(root, f"id{ident:05d}", f"{image}.png"), "wb") as f:
                f.write(encode_png(face))
        common = base.Common(fusion_weights={"adaface": 0.5, "qaconv": 0.5}, variants=("clean",), gate_threshold=0.5,
                             training=False)
        settings = ml_collections.ConfigDict(dict(type="folder", path=root, aligned=True, tile=_TILE.value))
        evaluator = evaluators.evaluator_class("bench", "folder")("bench", settings, common)
        start = time.perf_counter()
        faces = evaluator.faces()
        print(f"{faces.summary('bench')}: read in {time.perf_counter() - start:.1f} s")
        n = faces.labels.size
        pairs = n * (n - 1) // 2
        for qaconv in (False, True):
            model = _model(qaconv)
            model.progress = False
            start = time.perf_counter()
            folder._extract(model, faces.faces)
            print(f"{'QAConv' if qaconv else 'AdaFace'} model: {n / (time.perf_counter() - start):,.0f} faces/s "
                  "extracted (cold)")
            for run in ("cold", "warm"):
                tracemalloc.start()
                result = evaluator.evaluate(model)
                peak = tracemalloc.get_traced_memory()[1]
                tracemalloc.stop()
                print(f"  {run}: {pairs:,} pairs, {result.pairs_per_s:,.0f} pairs/s "
                      f"({'AdaFace, QAConv, fused, gated' if qaconv else 'AdaFace'}); traced host peak "
                      f"{peak / 2**20:.1f} MiB (faces and features included) vs {8 * pairs / 2**20:.1f} MiB for "
                      "one float64 score of every pair")


if __name__ == "__main__":
    app.run(main)
