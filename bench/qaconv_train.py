"""Cost of QAConv's training loss on one device of a job: fwd + bwd time, matching FLOPs, memory.

    python bench/qaconv_train.py                          # the default sweep, 7x7x512, bfloat16
    python bench/qaconv_train.py --old                    # also the previous einsum matcher, row by row
    python bench/qaconv_train.py --quick                  # small shapes for a CPU
    python bench/qaconv_train.py --sweep=256:1024:128,256:1024:0 --dtype=float32

Each configuration `per_device:global:group` times value_and_grad of the QAConv loss alone (matching, the
scalar BNs in train mode, the Dense, pairwise + triplet loss; gradients w.r.t. the QAConv parameters and
the feature maps) as one device of a data-parallel job sees it:
- group G > 0: the device matches its own per-device batch in groups of G (scores `[b/G, G, G]`);
  the global batch does not enter (only the BNs' scalar statistics would cross devices);
- G = 0: the whole global batch is the gallery, as before matching groups: the device scores its b probes
  against all B images (`[b, B]` rows of the all-pairs loss) and differentiates w.r.t. all B maps.
Reported per configuration: median fwd+bwd ms over `--repeats` runs after `--warmup` (block_until_ready),
the matching FLOPs (forward GEMM + two backward GEMMs, `6 * groups * (p hw) * (g hw) * c`) and the ms they
take at `--peak_tflops`, the compiled program's temporary memory (`memory_analysis()`) and, where the
backend reports it (GPUs), the device's peak memory (`memory_stats()`). Every configuration runs in its own
process, so the peak is that configuration's alone and a configuration that runs out of memory is reported
as such. Needs only jax, flax, optax, numpy and absl besides oaml_jax's QAConv module.
"""

import functools
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

_SWEEP = flags.DEFINE_list(
    "sweep", None, "Configurations per_device:global:group (group 0 = the whole global batch); default: "
    "512:512:0, 512:512:512, and per-device 256 with G = 128 and G = 0 at global 512 ... 8192.")
_QUICK = flags.DEFINE_bool("quick", False, "Small shapes (4x4x32 maps, batches of 16-128) for a CPU.")
_OLD = flags.DEFINE_bool("old", False, "Also time the previous einsum matcher (plain autodiff).")
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "Compute dtype of the matching GEMMs.")
_HW = flags.DEFINE_integer("hw", 7, "Feature map side (7: stage 4, 14: stage 3).")
_C = flags.DEFINE_integer("c", 512, "Feature map channels.")
_K = flags.DEFINE_integer("k", 4, "Images per identity.")
_REPEATS = flags.DEFINE_integer("repeats", 20, "Timed runs (the median is reported).")
_WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed runs after compiling.")
_PEAK = flags.DEFINE_float("peak_tflops", 790.0, "Peak TFLOP/s for the 'ms at peak' column (790 = H200 bf16).")
_BLOCK_MB = flags.DEFINE_integer("block_mb", 256, "QAConv.block_bytes in MiB (float32 similarities per block).")
_CHILD = flags.DEFINE_string("child", None, "Internal: run one per_device:global:group:path configuration.")

DEFAULT_SWEEP = ("512:512:0", "512:512:512") + tuple(
    f"256:{g}:{group}" for g in (512, 1024, 2048, 4096, 8192) for group in (128, 0))
QUICK_SWEEP = ("32:32:0", "32:32:32", "16:32:8", "16:128:8", "16:128:0")


def _parse(config: str) -> tuple[int, int, int]:
    per_device, global_batch, group = (int(v) for v in config.split(":"))
    if per_device < 1 or global_batch % per_device or (group and per_device % group):
        raise app.UsageError(f"--sweep {config}: need per_device | global and group | per_device (or group 0)")
    return per_device, global_batch, group


def _shape() -> tuple[int, int]:
    return (4, 32) if _QUICK.value else (_HW.value, _C.value)


def _matching_flops(per_device: int, global_batch: int, group: int, side: int, c: int) -> float:
    hw = side * side
    groups, p, g = (per_device // group, group, group) if group else (1, per_device, global_batch)
    return 6.0 * groups * (p * hw) * (g * hw) * c


def _row_block_loss(scores, probe_labels, gallery_labels, margin=1.0):
    """The rows of the all-pairs QAConv loss a device computes for its probes (the first b gallery images)."""
    import jax
    import jax.numpy as jnp
    import optax

    same = probe_labels[:, None] == gallery_labels[None, :]
    pair = optax.sigmoid_binary_cross_entropy(scores, same.astype(jnp.float32)).sum(axis=1).mean()
    positive = same & (jnp.arange(scores.shape[1])[None, :] != jnp.arange(scores.shape[0])[:, None])
    valid = positive.any(axis=1) & (~same).any(axis=1)
    min_pos = jnp.where(valid, jnp.min(jnp.where(positive, scores, jnp.inf), axis=1), 0.0)
    max_neg = jnp.where(valid, jnp.max(jnp.where(~same, scores, -jnp.inf), axis=1), 0.0)
    hinge = jnp.where(valid, jax.nn.relu(margin - (min_pos - max_neg)), 0.0)
    return pair + 0.5 * hinge.sum() / jnp.maximum(valid.sum(), 1)


def _run_child(config: str) -> dict:
    """Compiles and times one configuration in this process; returns its measurements."""
    import jax
    import jax.numpy as jnp

    from oaml_jax.models.qaconv import QAConv, qaconv_loss
    from oaml_jax.models.qaconv_matcher import match_features, match_features_einsum

    per_device, global_batch, group = _parse(config.rsplit(":", 1)[0])
    old = config.rsplit(":", 1)[1] == "einsum"
    side, c = _shape()
    dtype = jnp.dtype(_DTYPE.value)
    images = per_device if group else global_batch
    keys = jax.random.split(jax.random.key(0), 3)
    feats = jax.random.normal(keys[0], (images, side, side, c), jnp.float32)
    feats = feats / jnp.linalg.norm(feats, axis=-1, keepdims=True)
    vis = jax.random.uniform(keys[1], (images, side, side))
    labels = jnp.arange(images, dtype=jnp.int32) // _K.value
    module = QAConv(dtype=dtype, block_bytes=_BLOCK_MB.value * 2**20)
    variables = jax.jit(module.init)(keys[2], feats[:2], feats[:2], vis[:2], vis[:2])
    einsum = functools.partial(match_features_einsum, dtype=dtype)

    def loss(params, feats):
        qa_vars = {"params": params, "batch_stats": variables["batch_stats"]}
        score = functools.partial(module.apply, qa_vars, train=True, method=QAConv.score_features,
                                  mutable=["batch_stats"])
        if group:
            shape = (per_device // group, group)
            f, v = feats.reshape(*shape, side, side, c), vis.reshape(*shape, side, side)
            if old:
                scores, _ = score(jax.vmap(einsum)(f, f, v, v))
            else:
                scores, _ = module.apply(qa_vars, f, f, v, v, train=True, mutable=["batch_stats"])
            return qaconv_loss(scores, labels.reshape(shape))[0]
        probe, probe_vis = feats[:per_device], vis[:per_device]
        x = (einsum if old else functools.partial(match_features, dtype=dtype, block_bytes=module.block_bytes))(
            probe, feats, probe_vis, vis)
        scores, _ = score(x)
        return _row_block_loss(scores, labels[:per_device], labels)

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    start = time.perf_counter()
    compiled = step.lower(variables["params"], feats).compile()
    compile_s = time.perf_counter() - start
    analysis = compiled.memory_analysis()
    for _ in range(_WARMUP.value):
        jax.block_until_ready(compiled(variables["params"], feats))
    times = []
    for _ in range(_REPEATS.value):
        start = time.perf_counter()
        jax.block_until_ready(compiled(variables["params"], feats))
        times.append(time.perf_counter() - start)
    stats = jax.devices()[0].memory_stats() or {}
    return {"ms": 1e3 * float(np.median(times)), "compile_s": compile_s,
            "temp_bytes": None if analysis is None else analysis.temp_size_in_bytes,
            "peak_bytes": stats.get("peak_bytes_in_use"),
            "device": f"{jax.default_backend()} ({jax.devices()[0].device_kind})"}


def _child_flags() -> list[str]:
    names = ("quick", "dtype", "hw", "c", "k", "repeats", "warmup", "block_mb")
    return [f"--{name}={flags.FLAGS[name].value}" for name in names]


def _run_isolated(config: str) -> dict:
    result = subprocess.run([sys.executable, os.path.abspath(__file__), f"--child={config}", *_child_flags()],
                            capture_output=True, text=True)
    for line in result.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    tail = (result.stderr.strip().splitlines() or ["no output"])[-1]
    return {"error": "out of memory" if "RESOURCE_EXHAUSTED" in result.stderr else tail[:60]}


def _mib(value) -> str:
    return "-" if value is None else f"{value / 2**20:,.1f}"


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    if _CHILD.value:
        print("RESULT " + json.dumps(_run_child(_CHILD.value)))
        return
    if _QUICK.value:
        flags.FLAGS.repeats, flags.FLAGS.warmup = min(_REPEATS.value, 3), 1
    sweep = _SWEEP.value or (QUICK_SWEEP if _QUICK.value else DEFAULT_SWEEP)
    configs = [_parse(config) for config in sweep]
    side, c = _shape()
    paths = ("blocked", "einsum") if _OLD.value else ("blocked",)
    header = (f"{'per-dev':>7} {'global':>6} {'G':>5} {'groups':>9} {'matcher':>8} {'fwd+bwd ms':>10} "
              f"{'match GFLOP':>11} {'ms @peak':>8} {'temp MiB':>9} {'peak MiB':>9}  compile s")
    printed_device = False
    for per_device, global_batch, group in configs:
        flops = _matching_flops(per_device, global_batch, group, side, c)
        groups = f"{per_device // group}x{group}" if group else f"1x{global_batch}"
        for path in paths:
            result = _run_isolated(f"{per_device}:{global_batch}:{group}:{path}")
            if not printed_device and "device" in result:
                print(f"{result['device']}, {side}x{side}x{c} maps, {_DTYPE.value}, K = {_K.value}, "
                      f"block {_BLOCK_MB.value} MiB, median of {flags.FLAGS.repeats} runs, peak "
                      f"{_PEAK.value:g} TFLOP/s")
                print(header)
                printed_device = True
            row = (f"{per_device:>7} {global_batch:>6} {group:>5} {groups:>9} {path:>8} ")
            if "error" in result:
                print(row + f"{'failed: ' + result['error']}")
                continue
            print(row + f"{result['ms']:>10.2f} {flops / 1e9:>11.4g} {flops / (_PEAK.value * 1e9):>8.3g} "
                  f"{_mib(result['temp_bytes']):>9} {_mib(result['peak_bytes']):>9}  {result['compile_s']:.1f}")


if __name__ == "__main__":
    app.run(main)
