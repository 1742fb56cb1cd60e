"""What the module installs, per Slicer/Python version (GEM3DEditorLib/dependencies.py), checked
against the package registry and run at the oldest versions the bounds allow.

- Slicer 5.8 ships Python 3.9 with numpy 1.26.4 and scipy 1.13.1: pip must resolve the Python 3.9
  row with those kept (metadata only: --dry-run with fast-deps, no multi-GB torch download).
- The oldest-versions run builds a venv with torch 2.13.0 (the one CPU wheel available offline),
  numpy 1.26.4, scipy 1.13.1, diffusers 0.30.0, torchmetrics 1.3.0 and runs engine and worker tests.
Both need PyPI; they are skipped, saying so, only when it cannot be reached.
"""
import os
import socket
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "GEM3DEditor"))

from GEM3DEditorLib import dependencies  # noqa: E402

SLICER58_KEPT = ["numpy==1.26.4", "scipy==1.13.1"]  # Slicer 5.8's own, never replaced
OLDEST = {"numpy": "1.26.4", "scipy": "1.13.1", "diffusers": "0.30.0", "torchmetrics": "1.3.0"}
OLDEST_TESTS = ["Testing/test_engine.py::test_events_geometry_and_provenance",
                "Testing/test_engine.py::test_cancel_stops_without_output",
                "Testing/test_worker.py::test_malformed_line_then_valid_request",
                "Testing/test_worker.py::test_cancel_mid_job"]


def pypi_reachable() -> bool:
    try:
        socket.create_connection(("pypi.org", 443), timeout=5).close()
        return True
    except OSError:
        return False


needs_pypi = pytest.mark.skipif(not pypi_reachable(), reason="PyPI (pypi.org:443) cannot be reached from here")


def test_python39_row_keeps_slicers_numpy_and_scipy_inside_the_bounds():
    row = dependencies.requirements_for((3, 9))
    assert dependencies.satisfies("1.26.4", row["numpy"]) and dependencies.satisfies("1.13.1", row["scipy"])
    assert row["torch"] == "torch>=2.1,<2.9" and dependencies.requirements_for((3, 12)) == dependencies.REQUIREMENTS
    for name, version in OLDEST.items():  # the oldest-versions run uses versions the bounds allow
        assert dependencies.satisfies(version, dependencies.REQUIREMENTS[name]), name
    assert dependencies.satisfies("2.13.0+cpu", "torch>=2.1,<3") and not dependencies.satisfies("2.9.0", row["torch"])
    assert not dependencies.satisfies("0.29.2", row["diffusers"])


@needs_pypi
def test_pip_resolves_the_slicer58_set_for_python39(tmp_path):
    row = dependencies.requirements_for((3, 9))
    requirements = [r for name, r in row.items() if name not in ("numpy", "scipy")] + SLICER58_KEPT
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--python-version", "3.9",
         "--only-binary=:all:", "--use-feature=fast-deps", "--target", str(tmp_path / "target"),
         "--disable-pip-version-check", *requirements],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    resolved = result.stdout.rsplit("Would install", 1)[-1]
    assert "numpy-1.26.4" in resolved and "scipy-1.13.1" in resolved and "torch-2." in resolved, resolved


@needs_pypi
def test_engine_and_worker_tests_pass_at_the_oldest_versions(tmp_path):
    env_dir = tmp_path / "oldest"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    python = str(env_dir / ("Scripts" if os.name == "nt" else "bin") / "python")
    pip = [python, "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    others = [r for name, r in dependencies.REQUIREMENTS.items() if name not in OLDEST and name != "torch"]
    for step in (["torch==2.13.0"],
                 [f"{dependencies.distribution_name(dependencies.REQUIREMENTS[n])}=={v}" for n, v in OLDEST.items()]
                 + others + ["pytest>=7,<10"]):
        done = subprocess.run(pip + step, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    env = dict(os.environ, PYTHONPATH=str(ROOT / "GEM3DCore"), HF_HUB_OFFLINE="1")
    versions = subprocess.run([python, "-c", "import numpy, scipy, diffusers, torchmetrics, torch; print(numpy.__version__,"
                               " scipy.__version__, diffusers.__version__, torchmetrics.__version__, torch.__version__)"],
                              capture_output=True, text=True, env=env, timeout=300)
    assert versions.stdout.split() == ["1.26.4", "1.13.1", "0.30.0", "1.3.0", "2.13.0+cpu"], versions.stderr
    run = subprocess.run([python, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *OLDEST_TESTS],
                         cwd=ROOT, capture_output=True, text=True, env=env, timeout=900)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert " passed" in run.stdout and " failed" not in run.stdout
