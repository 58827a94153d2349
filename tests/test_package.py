"""The package as users install it: `pip install .` and `pip install -e .`, its console scripts, and
`python -m oaml_jax...` from outside the repository.

The venvs see this machine's site-packages (the pinned dependencies are already installed), so only the
package itself is built and installed: what is checked is pyproject.toml (packages, scripts, metadata).
"""

import os
import subprocess
import venv

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Each console script and a flag of its own that its --help must list.
SCRIPTS = {"oaml-train": "workdir", "oaml-eval": "checkpoint", "oaml-demo": "data_seed", "oaml-inference": "far",
           "oaml-convert": "ckpt", "oaml-export": "format", "oaml-ablation": "seeds"}


def _venv(path):
    venv.EnvBuilder(system_site_packages=True).create(path)  # pip comes from the system site-packages
    return os.path.join(path, "bin")


def _run(cmd, cwd):
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600,
                          env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})


@pytest.mark.slow
@pytest.mark.parametrize("editable", [False, True])
def test_installed_package_runs_from_anywhere(tmp_path, editable):
    bin_dir = _venv(str(tmp_path / "venv"))
    target = ["-e", REPO] if editable else [REPO]
    install = _run([os.path.join(bin_dir, "python"), "-m", "pip", "install", "-q", "--no-deps",
                    "--no-build-isolation", *target], cwd=str(tmp_path))
    assert install.returncode == 0, install.stderr[-3000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for script, own_flag in SCRIPTS.items():
        # --help prints the command's module docstring and its flags, though __main__ is pip's wrapper.
        result = _run([os.path.join(bin_dir, script), "--help"], cwd=str(elsewhere))
        usage = result.stdout + result.stderr
        assert "USAGE:" not in usage and "--[no]log_libraries" in usage, f"{script}: {usage[-2000:]}"
        assert f"\n  --{own_flag}:" in usage, f"{script}: {usage[-2000:]}"  # absl's listing, not the docstring
    python = os.path.join(bin_dir, "python")
    located = _run([python, "-c", "import oaml_jax, data_pipelines; print(oaml_jax.__file__)"], cwd=str(elsewhere))
    assert located.returncode == 0, located.stderr[-2000:]
    generic = _run([python, "-c", "import configs"], cwd=str(elsewhere))
    assert "No module named 'configs'" in generic.stderr, generic.stderr[-2000:]  # no generic top-level name
    assert located.stdout.startswith(REPO if editable else str(tmp_path / "venv")), located.stdout
    module = _run([python, "-m", "oaml_jax.inference", "--help"], cwd=str(elsewhere))
    assert "Try --helpfull" in module.stdout and "embed" in module.stdout, module.stderr[-2000:]
