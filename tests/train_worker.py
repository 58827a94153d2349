"""Helpers for the training tests: a tiny dataset, the tiny config, and a subprocess entry point.

    python tests/train_worker.py --data DIR --workdir DIR --out result.json [--devices 8]
        [--process_id I --num_processes N --port P] [--max_steps S]
runs `train_and_evaluate` on the tiny config in a fresh process (fake CPU devices and jax.distributed
must be set up before jax is first used, hence a separate process) and writes the result as JSON.
"""

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IDENTITIES = 8
IMAGES_PER_IDENTITY = 8
VAL_PAIRS = 20
# The tests compile the same tiny train step in several runs and processes: a persistent compilation
# cache turns all but the first into cache hits.
CACHE_ENV = {
    "JAX_COMPILATION_CACHE_DIR": os.path.join(tempfile.gettempdir(), "oaml_jax_train_tests_xla_cache"),
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
}


def enable_compilation_cache() -> None:
    """Turns on the persistent compilation cache in this process (before the first compile)."""
    import jax
    jax.config.update("jax_compilation_cache_dir", CACHE_ENV["JAX_COMPILATION_CACHE_DIR"])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def free_port() -> int:
    """A TCP port nothing listens on now (for a jax.distributed coordinator)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_script_on_devices(script: str, devices: int = 8) -> subprocess.CompletedProcess:
    """Runs Python source `script` in a fresh process with `devices` fake CPU devices, from the repo root."""
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    return subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=600)


def run_worker(data: str, workdir: str, out: str, devices: int = 1, **flags) -> subprocess.Popen:
    """Starts this script in a subprocess (see the module docstring); returns the Popen."""
    env = dict(os.environ, **CACHE_ENV)
    env.pop("XLA_FLAGS", None)
    cmd = [sys.executable, os.path.abspath(__file__), "--data", data, "--workdir", workdir, "--out", out,
           "--devices", str(devices)] + [f"--{k}={v}" for k, v in flags.items()]
    return subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def make_tiny_data(folder: str) -> str:
    """8 identities x 8 images (a per-identity colour pattern plus noise) and a 20-pair val.bin."""
    from data_pipelines import bin_pairs, recordio_format
    from data_pipelines.images import encode_jpeg

    rng = np.random.default_rng(0)
    bases = rng.integers(0, 256, size=(IDENTITIES, 7, 7, 3)).astype(np.float32)

    def image(identity: int) -> np.ndarray:
        big = np.kron(bases[identity], np.ones((16, 16, 1), np.float32))
        return np.clip(big + rng.normal(0, 20, big.shape), 0, 255).astype(np.uint8)

    items = [(encode_jpeg(image(i)), i) for i in range(IDENTITIES) for _ in range(IMAGES_PER_IDENTITY)]
    recordio_format.write_recordio(folder, items, num_classes=IDENTITIES)
    pairs, issame = [], []
    for p in range(VAL_PAIRS):
        a = p % IDENTITIES
        b = a if p % 2 == 0 else (a + 1) % IDENTITIES
        pairs += [image(a), image(b)]
        issame.append(a == b)
    bin_pairs.write_bin(os.path.join(folder, "val.bin"), np.stack(pairs), issame)
    return folder


def make_tiny_folders(folder: str, names, images_per_identity: int = IMAGES_PER_IDENTITY) -> str:
    """One folder of JPEGs per identity name (a per-name colour pattern plus noise): a "folder" source."""
    from data_pipelines.images import encode_jpeg

    for name in names:
        rng = np.random.default_rng(sum(map(ord, name)))
        base = np.kron(rng.integers(0, 256, size=(7, 7, 3)).astype(np.float32), np.ones((16, 16, 1), np.float32))
        os.makedirs(os.path.join(folder, name), exist_ok=True)
        for i in range(images_per_identity):
            image = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
            with open(os.path.join(folder, name, f"{i}.jpg"), "wb") as f:
                f.write(encode_jpeg(image))
    return folder


def tiny_config(data_path: str, **train_overrides):
    """configs/default.py:test on `data_path`, with `config.train` overrides."""
    sys.path.insert(0, ROOT)
    from configs import default
    config = default.get_config("test")
    config.data.path = data_path
    for key, value in train_overrides.items():
        config.train[key] = value
    return config


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", required=True)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--process_id", type=int, default=0)
    parser.add_argument("--num_processes", type=int, default=1)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--max_steps", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=0)
    parser.add_argument("--occlusion_set", default="")
    args = parser.parse_args()
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"
    sys.path.insert(0, ROOT)
    from absl import flags
    flags.FLAGS.mark_as_parsed()
    from oaml_jax import cli, train

    config = tiny_config(args.data, max_steps=args.max_steps, **({"epochs": args.epochs} if args.epochs else {}))
    if args.occlusion_set:
        config.data.occlusion_sets = args.occlusion_set
        config.data.occlusion_batch = 8
        config.data.occlusion_holdout = 0.0
    if args.num_processes > 1:
        config.distributed.initialize = True
        config.distributed.coordinator_address = f"127.0.0.1:{args.port}"
        config.distributed.num_processes = args.num_processes
        config.distributed.process_id = args.process_id
    result = train.train_and_evaluate(config, args.workdir)
    with open(args.out, "w") as fh:
        json.dump({"step": result["step"], "losses": {str(k): v for k, v in result["losses"].items()},
                   "metrics": result["metrics"], "preempted": result["preempted"]}, fh)
    if result["preempted"]:
        sys.exit(cli.PREEMPTED_EXIT_CODE)


if __name__ == "__main__":
    main()
