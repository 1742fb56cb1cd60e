"""The one contract (DESIGN.md "Boundaries"): request schema, bundle format, label maps and the
model-grid axis rules import and work in a Python without torch or diffusers (Slicer's own)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gem3d.bundle_format import DEMO_BUNDLE, BundleError, read_bundle_info
from gem3d.grid import AxialAxis, ModelGrid, position_slice, slice_position
from gem3d.labels import BRATS, MSD_BRAIN, canonical_name, normalise_name
from gem3d.request import GenerateRequest, InformedSpec, RequestError
from gem3d.volume import Geometry

CONTRACT = ("gem3d.request", "gem3d.bundle_format", "gem3d.labels", "gem3d.grid", "gem3d.volume",
            "gem3d.sampler_settings", "gem3d.config", "gem3d.typed", "gem3d.protocol", "gem3d.mask_edits")

BLOCKED_RUN = r"""
import sys

BLOCKED = {"torch", "diffusers", "safetensors", "einops", "yaml"}


class Refuse:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is blocked in this test")
        return None


sys.meta_path.insert(0, Refuse())
import importlib
for module in sys.argv[2:]:
    importlib.import_module(module)
from gem3d.bundle_format import read_bundle_info
from gem3d.request import GenerateRequest
info = read_bundle_info(sys.argv[1])
request = GenerateRequest.from_dict({"reference": "r.nii.gz", "mask": "m.nii.gz", "out": "o.nii.gz",
                                     "sampler": info.sampler})
leaked = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
assert not leaked, leaked
print(info.name, info.label_map.by_name("ET"), request.sampler)
"""


def blocked_run(*modules: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1] / "GEM3DCore"))
    return subprocess.run([sys.executable, "-c", BLOCKED_RUN, str(DEMO_BUNDLE), *modules],
                          capture_output=True, text=True, timeout=120, env=env)


def test_contract_imports_and_reads_a_bundle_without_torch_or_diffusers():
    result = blocked_run(*CONTRACT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["demo-brain", "4", "dpm++"]


def test_the_blocker_really_blocks():
    result = blocked_run("gem3d.bundle")
    assert result.returncode != 0 and "torch is blocked" in result.stderr


def test_old_bundle_json_with_the_unused_sampler_key_reads_as_what_requests_get():
    raw = json.loads((DEMO_BUNDLE / "bundle.json").read_text())
    assert raw["config"]["diffusion"]["sampler"] == "ddim"  # written before the key was dropped
    info = read_bundle_info(DEMO_BUNDLE)
    assert (info.sampler, info.steps) == ("dpm++", 20)
    assert info.window_length == 8 and info.slice_size == 64 and info.has_slice_model


def test_a_hand_edited_summary_is_refused(tmp_path):
    raw = json.loads((DEMO_BUNDLE / "bundle.json").read_text())
    (tmp_path / "bundle.json").write_text(json.dumps(dict(raw, slice_size=128)))
    with pytest.raises(BundleError, match="slice_size"):
        read_bundle_info(tmp_path)


def test_request_reports_every_problem_at_once():
    with pytest.raises(RequestError) as err:
        GenerateRequest("r", "m", "o", start=1.5, sampler="euler", steps=0, seed=-1, edits=[{"axis": "LR"}])
    for part in ("start", "sampler", "steps", "seed", "edits"):
        assert part in str(err.value)
    with pytest.raises(RequestError, match="informed.scan"):
        InformedSpec("other")
    # the engine's default applies: 'other' needs a scan, not a slice or position
    assert InformedSpec("other", scan="s.nii.gz").slice is None


def test_request_path_rules(tmp_path):
    reference, mask, out = (tmp_path / n for n in ("r.nii.gz", "m.nii.gz", "o.nii.gz"))
    reference.write_bytes(b"r")
    mask.write_bytes(b"m")
    assert GenerateRequest(str(reference), str(mask), str(out)).path_problems() == []
    out.write_bytes(b"keep")
    assert "exists" in " ".join(GenerateRequest(str(reference), str(mask), str(out)).path_problems())
    assert GenerateRequest(str(reference), str(mask), str(out), overwrite=True).path_problems() == []
    problems = GenerateRequest(str(reference), str(mask), str(reference), overwrite=True).path_problems()
    assert problems == [f"--out {reference} would overwrite an input ({reference}); choose another output path"]
    out.unlink()
    (tmp_path / "o.provenance.json").write_text("keep")  # the editor sees what the engine would refuse
    assert "provenance" in " ".join(GenerateRequest(str(reference), str(mask), str(out)).path_problems())
    source = tmp_path / "edit_source.nii.gz"
    problems = GenerateRequest(str(reference), str(mask), str(source), overwrite=True,
                               edits=[{"op": "paste", "source": str(source)}]).path_problems()
    assert "would overwrite an input" in " ".join(problems)
    message = GenerateRequest(str(reference), str(mask), "o.nii.gz").with_absolute_paths().to_message()
    assert message["type"] == "generate" and os.path.isabs(message["out"])
    assert GenerateRequest.from_dict(message) == GenerateRequest.from_dict(message)


def test_one_spelling_rule_for_structure_names():
    assert normalise_name("Enhancing_Tumor") == normalise_name("enhancing tumour") == "enhancing tumour"
    assert normalise_name("Peritumoral Edema") == "peritumoral oedema"
    assert canonical_name("NCR/NET") == canonical_name("Non-Enhancing Tumor") == "necrosis"
    assert canonical_name("oedema") == canonical_name("ED") == "oedema"
    assert BRATS.by_name("Enhancing Tumor") == 4 and MSD_BRAIN.by_name("necrotic core") == 2
    assert BRATS.match("liver") is None


@pytest.mark.parametrize("flip", [False, True])
def test_axial_axis_and_positions_agree_with_the_model_grid(flip):
    # a sagittal-acquired scan: array axis 2 (x) runs along S-I
    direction = np.array([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [(-1.0 if flip else 1.0), 0.0, 0.0]])
    geometry, shape = Geometry((1, 1, 1), (0, 0, 0), direction), (6, 7, 9)
    axial = AxialAxis.of(geometry, shape)
    grid = ModelGrid.fit(geometry, shape, 8)
    assert (axial.axis, axial.flipped, axial.n_slices) == (grid.axis, grid.flipped, grid.n_slices) == (2, flip, 9)
    assert axial.position(0) == (1.0 if flip else 0.0)
    assert [position_slice(slice_position(z, 9), 9) for z in range(9)] == list(range(9))
    assert [axial.reference_index(axial.model_index(i)) for i in range(9)] == list(range(9))
    with pytest.raises(ValueError, match="outside"):
        axial.model_index(9)
    assert slice_position(0, 1) == 0.0
