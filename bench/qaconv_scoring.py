"""Throughput of QAConv pair scoring (`qaconv_pair_scores`, eval mode, occlusion-weighted, both directions).

    python bench/qaconv_scoring.py [--pairs 6000] [--chunk_size 1024] [--repeats 3]

Scores `--pairs` pairs (default 6,000: LFW) of random channel-L2-normalized feature maps with random
visibility maps at 7x7x512 (stage 4) and 14x14x256 (stage 3), on whatever backend JAX finds. Reports the
compile+first-run time and the best of `--repeats` timed runs (seconds and pairs/s).
"""

import os
import sys
import time

import jax
import jax.numpy as jnp
from absl import app, flags, logging

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from oaml_jax.models.qaconv import QAConv, qaconv_pair_scores  # noqa: E402  (repo root put on the path above)

_PAIRS = flags.DEFINE_integer("pairs", 6000, "Pairs to score (LFW has 6,000).")
_CHUNK = flags.DEFINE_integer("chunk_size", 1024, "Pairs per chunk inside qaconv_pair_scores.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed runs after the compiling one.")
SHAPES = ((7, 7, 512), (14, 14, 256))


def _features(key: jax.Array, n: int, shape: tuple[int, int, int]) -> jax.Array:
    x = jax.random.normal(key, (n, *shape), jnp.float32)
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def bench(shape: tuple[int, int, int], pairs: int, chunk_size: int, repeats: int) -> dict[str, float]:
    """Times scoring `pairs` pairs of `[h, w, c]` maps; returns first-run and best-run seconds, pairs/s."""
    keys = jax.random.split(jax.random.PRNGKey(0), 5)
    a, b = _features(keys[0], pairs, shape), _features(keys[1], pairs, shape)
    a_vis = jax.random.uniform(keys[2], (pairs, *shape[:2]))
    b_vis = jax.random.uniform(keys[3], (pairs, *shape[:2]))
    module = QAConv()
    variables = module.init(keys[4], a[:2], b[:2], a_vis[:2], b_vis[:2])
    start = time.perf_counter()
    qaconv_pair_scores(variables, a, b, a_vis, b_vis, chunk_size=chunk_size, module=module).block_until_ready()
    first = time.perf_counter() - start
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        qaconv_pair_scores(variables, a, b, a_vis, b_vis, chunk_size=chunk_size, module=module).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return {"first_s": first, "best_s": best, "pairs_per_s": pairs / best}


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    logging.info("backend %s, devices %s", jax.default_backend(), jax.devices())
    print(f"backend: {jax.default_backend()} ({jax.devices()[0].device_kind}), {_PAIRS.value} pairs, "
          f"chunk {_CHUNK.value}")
    for shape in SHAPES:
        r = bench(shape, _PAIRS.value, _CHUNK.value, _REPEATS.value)
        print(f"{'x'.join(map(str, shape)):>10}: compile+run {r['first_s']:7.2f} s   best {r['best_s']:7.3f} s   "
              f"{r['pairs_per_s']:10.0f} pairs/s")


if __name__ == "__main__":
    app.run(main)
