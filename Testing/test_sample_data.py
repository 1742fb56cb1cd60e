"""The "GEM-3D phantom" sample data entry: made locally by gem3d and loaded, on Slicer's real MRML."""
import os

import numpy as np
import pytest

from mrml_fixtures import headless  # noqa: F401

slicer = pytest.importorskip("slicer", reason="slicer-core is in the test extra")

from gem3d.bundle_format import DEMO_BUNDLE, read_bundle_info  # noqa: E402
from GEM3DEditorLib import label_matching, sample_data  # noqa: E402
from GEM3DEditorLib.logic import EditorLogic  # noqa: E402


def test_the_phantom_sample_is_made_locally_loaded_and_mapped_to_the_demo_labels(headless, tmp_path):
    from gem3d.io import read_description
    from gem3d.phantom import make_case

    scan, segmentation = sample_data.load_phantom_case(headless.scene, headless.volumes_logic, str(tmp_path),
                                                       size=48, slices=16)
    image, labels, _truth = make_case("brain", seed=0, size=48, slices=16)
    np.testing.assert_allclose(slicer.util.arrayFromVolume(scan), np.asarray(image.array), rtol=1e-6)
    assert scan.GetName() == "GEM-3D phantom FLAIR"
    assert "SYNTHETIC" in read_description(sample_data.make_phantom_case(str(tmp_path), size=48, slices=16)[0])
    infos = EditorLogic.segment_infos(segmentation)
    matches, unmatched = label_matching.match_segments(infos, read_bundle_info(DEMO_BUNDLE).label_map.names)
    assert not unmatched and sorted(m.label for m in matches) == [1, 2, 4]
    mask = EditorLogic.compose_mask(segmentation, scan, {m.segment_id: m.label for m in matches})
    np.testing.assert_array_equal(mask, np.asarray(labels.array))


def test_a_second_load_reuses_the_files_and_names_new_nodes(headless, tmp_path):
    paths = sample_data.make_phantom_case(str(tmp_path), size=32, slices=8)
    stamps = [os.stat(p).st_mtime_ns for p in paths]
    first = sample_data.load_phantom_case(headless.scene, headless.volumes_logic, str(tmp_path), size=32, slices=8)
    second = sample_data.load_phantom_case(headless.scene, headless.volumes_logic, str(tmp_path), size=32, slices=8)
    assert [os.stat(p).st_mtime_ns for p in paths] == stamps
    assert first[0].GetName() != second[0].GetName() and headless.scene.IsNodePresent(first[0])
