"""Multi-device and multi-process training, each run in its own subprocess (tests/train_worker.py)."""

import json

import jax
import numpy as np
import pytest

import train_worker
from data_pipelines import synthetic_occlusion
from oaml_jax import checkpoint

STEPS = 2
TIMEOUT_S = 900
# One worker runs the whole module: the `runs` fixture trains once for both tests (pytest.ini runs pytest-xdist).
pytestmark = pytest.mark.xdist_group("multiprocess")


def _finish(proc, out) -> dict:
    log, _ = proc.communicate(timeout=TIMEOUT_S)
    assert proc.returncode == 0, log[-4000:]
    with open(out) as fh:
        return json.load(fh)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same two steps on 1 device, on 8 devices, and on 2 processes x 4 devices (run concurrently), with
    an occlusion batch of 8 from a synthetic occlusion set (OAML's second stream)."""
    root = tmp_path_factory.mktemp("multi")
    data = train_worker.make_tiny_data(str(root / "data"))
    occlusion_set = synthetic_occlusion.write_occlusion_set(str(root / "occlusion"), 16, seed=0)["out_dir"]
    port = train_worker.free_port()
    specs = {
        "one": dict(devices=1),
        "eight": dict(devices=8),
        "proc0": dict(devices=4, process_id=0, num_processes=2, port=port, workdir="two"),
        "proc1": dict(devices=4, process_id=1, num_processes=2, port=port, workdir="two"),
    }
    results = {}
    # The two cooperating processes run first, on their own, so neither waits on unrelated compiles.
    for group in (("proc0", "proc1"), ("one", "eight")):
        procs = {}
        for name in group:
            spec = dict(specs[name])
            workdir = str(root / spec.pop("workdir", name))
            out = str(root / f"{name}.json")
            procs[name] = (train_worker.run_worker(data, workdir, out, max_steps=STEPS, occlusion_set=occlusion_set,
                                                   **spec), out)
        results.update({name: _finish(proc, out) for name, (proc, out) in procs.items()})
    return root, results


@pytest.mark.slow
def test_eight_devices_match_one_device(runs):
    _, results = runs
    one, eight = results["one"]["losses"], results["eight"]["losses"]
    assert sorted(one) == sorted(eight) == [str(s) for s in range(STEPS)]
    for step in one:
        np.testing.assert_allclose(eight[step], one[step], rtol=2e-4, err_msg=f"step {step}")


@pytest.mark.slow
def test_two_processes_agree_and_restore_in_one(runs):
    root, results = runs
    timing = {"images_per_sec", "mfu"}
    p0, p1 = results["proc0"], results["proc1"]
    assert p0["losses"] == p1["losses"] and p0["step"] == p1["step"] == STEPS
    assert p0["metrics"]["loss_occ_set"] > 0  # the occlusion stream, split over the processes
    assert {k: v for k, v in p0["metrics"].items() if k not in timing} == \
        {k: v for k, v in p1["metrics"].items() if k not in timing}
    for step, loss in results["one"]["losses"].items():
        np.testing.assert_allclose(results["proc0"]["losses"][step], loss, rtol=2e-4)
    restored = checkpoint.restore(str(root / "two"))
    variables = restored.variables
    assert restored.config["distributed"]["num_processes"] == 2
    assert variables["params"]["head"]["kernel"].shape == (32, 8)
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(variables))
