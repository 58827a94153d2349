"""The package as users install it: `pip install .` and `pip install -e .`, its console scripts, and
`python -m oaml_jax...` from outside the repository.

Each venv sees the site-packages of the interpreter running the tests (the pinned dependencies and pip are
already there), whether that interpreter is a plain one or itself in a virtual environment, so only the
package itself is built (with the build requirements pyproject.toml names, which pip fetches) and
installed: what is checked is pyproject.toml (build system, packages, scripts, metadata).
"""

import os
import site
import subprocess
import venv

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Each console script and a flag of its own that its --help must list.
SCRIPTS = {"oaml-train": "workdir", "oaml-eval": "checkpoint", "oaml-demo": "data_seed", "oaml-inference": "far",
           "oaml-convert": "ckpt", "oaml-export": "format", "oaml-ablation": "seeds"}


def _venv(path):
    """A venv at `path` whose site-packages come first, then this interpreter's own (not its base's: inside
    a virtual environment `system_site_packages` would reach the base interpreter's, without the pins)."""
    venv.EnvBuilder(with_pip=False).create(path)
    own = [*site.getsitepackages(), *([site.getusersitepackages()] if site.ENABLE_USER_SITE else [])]
    purelib = subprocess.run([os.path.join(path, "bin", "python"), "-c",
                              "import sysconfig; print(sysconfig.get_path('purelib'))"],
                             capture_output=True, text=True, check=True).stdout.strip()
    with open(os.path.join(purelib, "outer_site_packages.pth"), "w") as f:  # addsitedir runs their .pth files too
        f.write("".join(f"import site; site.addsitedir({d!r})\n" for d in own if os.path.isdir(d)))
    return os.path.join(path, "bin")


def _run(cmd, cwd):
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600,
                          env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})


@pytest.mark.slow
@pytest.mark.parametrize("editable", [False, True])
def test_installed_package_runs_from_anywhere(tmp_path, editable):
    bin_dir = _venv(str(tmp_path / "venv"))
    target = ["-e", REPO] if editable else [REPO]
    # Built as users build it: pip fetches pyproject.toml's build requirements into an isolated environment,
    # so neither setuptools nor wheel of the running environment matters.
    install = _run([os.path.join(bin_dir, "python"), "-m", "pip", "install", "-q", "--no-deps", *target],
                   cwd=str(tmp_path))
    assert install.returncode == 0, install.stderr[-3000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    # The entry points are the same metadata either way; an editable install differs only in where the
    # modules are found, which one script and the imports below show.
    for script, own_flag in SCRIPTS.items() if not editable else list(SCRIPTS.items())[:1]:
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
    module = _run([python, "-m", "oaml_jax.export", "--help"], cwd=str(elsewhere))
    assert "Try --helpfull" in module.stdout and "\n  --format:" in module.stdout, module.stderr[-2000:]
    if not editable:
        # A recipe read by path (it imports the library's defaults, not a `configs` package), up to the
        # run's first check; the project's input errors end in one line, whatever the install.
        missing = tmp_path / "no_data"
        train = _run([os.path.join(bin_dir, "oaml-train"), f"--config={REPO}/configs/default.py:test",
                      f"--workdir={tmp_path / 'run'}", f"--config.data.path={missing}"], cwd=str(elsewhere))
        assert train.returncode == 1, train.stderr[-3000:]
        assert train.stderr.splitlines()[-1] == (
            f"error: data.path: training data folder '{missing}' does not exist (data.source='recordio') "
            "[traceback: --verbosity=1]"), train.stderr[-3000:]
        assert os.listdir(elsewhere) == []
