"""Every engine command refuses a bad path, folder or bundle.json before it imports torch
(issue 25): torch is blocked in the subprocess, so any model work would fail with an ImportError
traceback instead of the one-sentence refusal."""
from __future__ import annotations

import json
import resource
import subprocess
import sys

import pytest

WITHOUT_TORCH = "import sys; sys.modules['torch'] = None; from gem3d.cli import main; main(prog_name='gem3d')"
# The refusal's CPU time, not its wall time, is what a loaded 2-core box cannot inflate: about
# 0.2 s (1.1 s wall at load average 8) against 5 s of CPU to import torch and load the model first.
REFUSAL_CPU_S = 2.0


def gem3d_without_torch(*args):
    """(exit code, stderr, CPU seconds) of `gem3d ARGS` in a Python where `import torch` fails."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run([sys.executable, "-c", WITHOUT_TORCH, *map(str, args)], capture_output=True, text=True,
                          timeout=120)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return done.returncode, done.stderr, after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime


@pytest.fixture(scope="module")
def bad_bundle(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad") / "bundle"
    folder.mkdir()
    (folder / "bundle.json").write_text(json.dumps({"format": "something-else"}))
    return folder


def cases(phantom, bad_bundle, tmp):
    image, mask = phantom / "imagesTr" / "brain_000_0000.nii.gz", phantom / "labelsTr" / "brain_000.nii.gz"
    missing = tmp / "no-such-folder"
    a_file = tmp / "a-file.txt"
    a_file.write_text("not a folder")
    return {
        "generate --out": (["generate", "--mask", mask, "--reference", image, "--out", missing / "x.nii.gz"],
                           "output folder"),
        "generate bundle.json": (["generate", "--mask", mask, "--reference", image, "--out", tmp / "x.nii.gz",
                                  "--bundle", bad_bundle], "bundle.json"),
        "generate input": (["generate", "--mask", mask, "--reference", image, "--out", tmp / "x.nii.gz",
                            "--informed", "other"], "informed.scan"),
        "enhance bundle.json": (["enhance", "--dataset", phantom, "--out", tmp / "enh", "--bundle", bad_bundle],
                                "bundle.json"),
        "enhance --out": (["enhance", "--dataset", phantom, "--out", phantom / "inside"], "source dataset"),
        "harmonize bundle.json": (["harmonize", "--dataset", phantom, "--informed-from", image, "--out", tmp / "h",
                                   "--bundle", bad_bundle], "bundle.json"),
        "demo --out": (["demo", "--out", a_file / "demo"], "a-file.txt"),
        "demo bundle.json": (["demo", "--out", tmp / "demo", "--bundle", bad_bundle], "bundle.json"),
        "evaluate --json": (["evaluate", "--real", phantom, "--synthetic", phantom, "--json", missing / "r.json"],
                            "output folder"),
        "train --config": (["train", "vae", "--config", "no-such-preset", "--dataset", phantom, "--out",
                            tmp / "run"], "no-such-preset"),
        "train --dataset": (["train", "vae", "--config", "tiny", "--dataset", tmp, "--out", tmp / "run"],
                            str(tmp)),
        "worker bundle.json": (["worker", "--bundle", bad_bundle], "bundle.json"),
        "serve bundle.json": (["serve", "--bundle", bad_bundle, "--port", "0"], "bundle.json"),
    }


NAMES = [
    "generate --out", "generate bundle.json", "generate input", "enhance bundle.json", "enhance --out",
    "harmonize bundle.json", "demo --out", "demo bundle.json", "evaluate --json", "train --config",
    "train --dataset", "worker bundle.json", "serve bundle.json"]


@pytest.mark.parametrize("name", NAMES)
def test_refused_before_model_work_in_one_sentence(name, brain_phantom, bad_bundle, tmp_path):
    args, fragment = cases(brain_phantom, bad_bundle, tmp_path)[name]
    code, stderr, cpu = gem3d_without_torch(*args)
    assert code == 1, stderr
    assert "Traceback" not in stderr and "torch" not in stderr, stderr
    assert fragment in stderr, stderr
    assert len(stderr.strip().splitlines()) == 1, stderr
    assert cpu < REFUSAL_CPU_S, f"{name}: the refusal took {cpu:.1f} s of CPU"
