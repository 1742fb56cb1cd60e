"""Defects 1-4 of the editor issue, on Slicer's real MRML (slicer-core): written before the fixes.

1. the streamed output showed blank (window/level computed from the zero-filled node);
2. edits of a segmentation under a parent transform moved it by the transform;
3. edits reset the segment's label value and layer, and undo did not restore them;
4. exports went through slicer.util.exportNode (mutable default, result ignored).
"""
import inspect
import re

import numpy as np
import pytest

from mrml_fixtures import (ROOT, brats_segmentation, headless, lesion_world_centroid, phantom_case,  # noqa: F401
                           phantom_reference)

slicer = pytest.importorskip("slicer", reason="slicer-core is in the test extra")

from GEM3DEditorLib import nodes, output  # noqa: E402


def window_event(tmp_path, slab, start, axis=0):
    return {"event": "window", "slab": slab, "axis": axis, "start": start, "stop": start + slab.shape[axis]}


def test_streamed_output_gets_a_window_level_from_the_first_window(headless, phantom_reference, tmp_path):
    reference = phantom_reference()
    node = output.prepare_output_node(reference)
    stream = output.OutputStream(node)
    shape = slicer.util.arrayFromVolume(reference).shape
    stream.started({"shape": list(shape), "axis": 0})
    first = np.linspace(0.03, 300.0, 4 * shape[1] * shape[2], dtype=np.float32).reshape(4, shape[1], shape[2])
    stream.window(window_event(tmp_path, first, 0))
    display = node.GetDisplayNode()
    low, high = display.GetWindowLevelMin(), display.GetWindowLevelMax()
    assert display.GetWindow() > 0, (display.GetWindow(), display.GetLevel())
    assert low <= 10.0 and high >= 250.0, (low, high)
    second = np.full((4, shape[1], shape[2]), 696.0, np.float32)
    stream.window(window_event(tmp_path, second, 4))
    assert display.GetWindowLevelMax() >= 690.0 and display.GetWindowLevelMin() <= 10.0


def test_an_unchanged_edit_keeps_a_transformed_segmentation_in_place(headless, phantom_reference,
                                                                      brats_segmentation):
    reference = phantom_reference()
    segmentation = brats_segmentation(reference)
    transform = headless.scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    matrix = np.eye(4)
    matrix[0, 3] = 10.0  # +10 mm R
    transform.SetMatrixTransformToParent(slicer.util.vtkMatrixFromArray(matrix))
    segmentation.SetAndObserveTransformNodeID(transform.GetID())
    edema = segmentation.GetSegmentation().GetSegmentIdBySegmentName("edema")
    before = lesion_world_centroid(segmentation, edema, reference)
    for _ in range(2):  # read -> write round trips
        nodes.set_segment_arrays({edema: nodes.segment_array(segmentation, edema, reference)}, segmentation, reference)
    after = lesion_world_centroid(segmentation, edema, reference)
    np.testing.assert_allclose(after, before, atol=0.5)


def test_edits_keep_label_values_and_layers(headless, phantom_reference, brats_segmentation):
    reference = phantom_reference()
    segmentation = brats_segmentation(reference)
    seg = segmentation.GetSegmentation()
    values = {seg.GetNthSegment(i).GetName(): seg.GetNthSegment(i).GetLabelValue()
              for i in range(seg.GetNumberOfSegments())}
    layers = seg.GetNumberOfLayers()
    ids = [seg.GetNthSegmentID(i) for i in range(seg.GetNumberOfSegments())]
    before = {i: nodes.segment_array(segmentation, i, reference) for i in ids}
    moved = {i: np.roll(a, 3, axis=2) for i, a in before.items()}  # the lesion moved as one
    for arrays in (moved, before):  # the edit, then its undo
        nodes.set_segment_arrays(arrays, segmentation, reference)
        assert {seg.GetNthSegment(i).GetName(): seg.GetNthSegment(i).GetLabelValue()
                for i in range(seg.GetNumberOfSegments())} == values
        assert seg.GetNumberOfLayers() == layers
        for i in ids:
            np.testing.assert_array_equal(nodes.segment_array(segmentation, i, reference), arrays[i])


def test_exports_do_not_use_exportNode_and_check_every_write(headless, phantom_reference, tmp_path):
    default = inspect.signature(slicer.util.exportNode).parameters["properties"].default
    assert isinstance(default, dict)  # Slicer's mutable default, the reason exportNode is not used
    for path in [ROOT / "GEM3DEditor" / "GEM3DEditor.py"] + sorted((ROOT / "GEM3DEditor" / "GEM3DEditorLib").glob("*.py")):
        assert not re.search(r"\bexportNode\(", path.read_text(encoding="utf-8")), path.name
    reference = phantom_reference()
    with pytest.raises(ValueError, match="does not exist"):
        nodes.write_volume(reference, str(tmp_path / "missing" / "x.nrrd"))
