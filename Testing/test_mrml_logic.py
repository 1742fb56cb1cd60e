"""GEM3DEditorLib's logic on Slicer's real MRML (slicer-core): volumes through Slicer's storage
nodes, segmentations from labelmaps and .seg.nrrd, a transformed segmentation, the composed mask,
a real `gem3d worker` with the demo bundle streaming into a real volume node, edit and undo,
export re-read with Slicer's storage nodes and SimpleITK."""
import time

import numpy as np
import pytest
import SimpleITK as sitk

from mrml_fixtures import (ROOT, brats_segmentation, headless, lesion_world_centroid, oblique_geometry,  # noqa: F401
                           phantom_case, phantom_reference)

slicer = pytest.importorskip("slicer", reason="slicer-core is in the test extra")

from gem3d.bundle_format import read_bundle_info  # noqa: E402
from GEM3DEditorLib import geometry, label_matching, nodes, slice_views  # noqa: E402
from GEM3DEditorLib.logic import EditorLogic, first_scalar_volume  # noqa: E402
from GEM3DEditorLib.settings import EngineSettings, GenerateSettings  # noqa: E402

DEMO_BUNDLE = ROOT / "GEM3DCore" / "gem3d" / "resources" / "demo_bundle"


def translation(headless, mm_ras):
    node = headless.scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    matrix = np.eye(4)
    matrix[:3, 3] = mm_ras
    node.SetMatrixTransformToParent(slicer.util.vtkMatrixFromArray(matrix))
    return node


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd"])
@pytest.mark.parametrize("spacing, left_handed", [((0.9, 1.1, 2.5), False), ((1.0, 1.0, 1.0), True),
                                                  ((0.5, 0.7, 3.0), True)])
def test_volumes_through_slicers_storage_nodes_keep_simpleitks_geometry(headless, phantom_reference, tmp_path,
                                                                       suffix, spacing, left_handed):
    expected = oblique_geometry(spacing, left_handed)
    node = phantom_reference(expected, suffix)
    path = node.GetStorageNode().GetFileName()
    assert_same_voxels_in_space(node, sitk.ReadImage(path))
    written = nodes.write_volume(node, str(tmp_path / f"again{suffix}"))
    assert_same_voxels_in_space(node, sitk.ReadImage(written))


def assert_same_voxels_in_space(node, image):
    """Every voxel of the SimpleITK image (LPS) holds the value the Slicer node (RAS) has at that point
    (Slicer may store a left-handed NIfTI with its k axis reversed: the same voxels in space)."""
    values = sitk.GetArrayFromImage(image)
    voxels = slicer.util.arrayFromVolume(node)
    ras_to_ijk = np.linalg.inv(nodes.ijk_to_ras(node))
    z, y, x = np.meshgrid(*[np.arange(n) for n in values.shape], indexing="ij")
    index = np.stack([x.ravel(), y.ravel(), z.ravel()], axis=1)
    lps = np.array([image.TransformIndexToPhysicalPoint([int(v) for v in i]) for i in index[::7]])
    ras = np.c_[-lps[:, 0], -lps[:, 1], lps[:, 2], np.ones(len(lps))]
    ijk = np.rint((ras_to_ijk @ ras.T)[:3].T).astype(int)
    np.testing.assert_allclose((ras_to_ijk @ ras.T)[:3].T, ijk, atol=1e-3)  # voxel centres on voxel centres
    np.testing.assert_array_equal(voxels[ijk[:, 2], ijk[:, 1], ijk[:, 0]], values.reshape(-1)[::7])


def test_a_labelmap_is_never_taken_for_the_reference(headless, phantom_reference):
    headless.scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "labels")
    reference = phantom_reference()
    assert first_scalar_volume(headless.scene) is reference


def test_segmentation_from_seg_nrrd_composes_the_labels(headless, phantom_case, phantom_reference, tmp_path):
    from gem3d.io import write_segmentation

    reference = phantom_reference()
    labels = phantom_case[1]
    path = tmp_path / "lesion.seg.nrrd"
    write_segmentation(labels, path, [{"name": "necrotic core", "label_value": 1}, {"name": "oedema", "label_value": 2},
                                      {"name": "enhancing tumour", "label_value": 4}])
    segmentation = nodes.load_segmentation(headless.scene, str(path))
    matches, unmatched = label_matching.match_segments(EditorLogic.segment_infos(segmentation),
                                                       read_bundle_info(str(DEMO_BUNDLE)).label_map.names)
    assert not unmatched
    mask = EditorLogic.compose_mask(segmentation, reference, {m.segment_id: m.label for m in matches})
    np.testing.assert_array_equal(mask, np.asarray(labels.array))


def test_the_mask_of_a_transformed_segmentation_is_where_the_segmentation_is_shown(
        headless, phantom_case, phantom_reference, brats_segmentation):
    reference = phantom_reference()
    segmentation = brats_segmentation(reference)
    ids = {s.name: s.segment_id for s in EditorLogic.segment_infos(segmentation)}
    plain = EditorLogic.compose_mask(segmentation, reference, {ids["edema"]: 2})
    spacing_i = np.linalg.norm(nodes.ijk_to_ras(reference)[:3, 0])
    direction_i = nodes.ijk_to_ras(reference)[:3, 0] / spacing_i
    segmentation.SetAndObserveTransformNodeID(translation(headless, direction_i * 2 * spacing_i).GetID())
    moved = EditorLogic.compose_mask(segmentation, reference, {ids["edema"]: 2})
    np.testing.assert_array_equal(moved[:, :, 2:], plain[:, :, :-2])  # two voxels along i


def test_edits_and_undo_on_a_transformed_segmentation(headless, phantom_reference, brats_segmentation, tmp_path):
    from GEM3DEditorLib import edits

    reference = phantom_reference()
    segmentation = brats_segmentation(reference)
    segmentation.SetAndObserveTransformNodeID(translation(headless, [10.0, 0.0, 0.0]).GetID())
    logic = EditorLogic(headless.scene, headless.volumes_logic, str(tmp_path))
    seg = segmentation.GetSegmentation()
    ids = [seg.GetNthSegmentID(i) for i in range(seg.GetNumberOfSegments())]
    values = [seg.GetSegment(i).GetLabelValue() for i in ids]
    edema = seg.GetSegmentIdBySegmentName("edema")
    before = {i: nodes.segment_array(segmentation, i, reference) for i in ids}
    centre = lesion_world_centroid(segmentation, edema, reference)
    logic.edit_segments(segmentation, ids, reference, [edits.translate_ras([0.0, 0.0, 0.0])])
    np.testing.assert_allclose(lesion_world_centroid(segmentation, edema, reference), centre, atol=1e-6)
    logic.edit_segments(segmentation, ids, reference, [edits.translate_ras([10.0, 0.0, 0.0])])  # 10 mm right: 2 voxels
    np.testing.assert_allclose(lesion_world_centroid(segmentation, edema, reference) - centre, [10.0, 0, 0], atol=1.5)
    assert [seg.GetSegment(i).GetLabelValue() for i in ids] == values
    logic.undo_redo(segmentation, reference, undo=True)
    logic.undo_redo(segmentation, reference, undo=True)
    for i in ids:
        np.testing.assert_array_equal(nodes.segment_array(segmentation, i, reference), before[i])
    assert [seg.GetSegment(i).GetLabelValue() for i in ids] == values and not logic.history.can_undo


def test_a_real_worker_streams_the_demo_bundle_into_a_volume_node_and_exports(
        headless, phantom_reference, brats_segmentation, tmp_path):

    from gem3d.io import read_description, read_segmentation, read_volume

    reference = phantom_reference(oblique_geometry((1.0, 1.0, 2.0)))
    segmentation = brats_segmentation(reference)
    logic = EditorLogic(headless.scene, headless.volumes_logic, str(tmp_path / "work"),
                             gem3d_root=str(ROOT / "GEM3DCore"))
    (tmp_path / "work").mkdir()
    matches, _ = label_matching.match_segments(logic.segment_infos(segmentation),
                                               read_bundle_info(str(DEMO_BUNDLE)).label_map.names)
    settings = GenerateSettings(str(DEMO_BUNDLE), start=0.5,
                                engine=EngineSettings(sampler="ddim", steps=2, seed=1, device="cpu",
                                                      engine_python=""))  # "": this Python outside Slicer
    out = logic.start_generation(settings, reference, segmentation, {m.segment_id: m.label for m in matches})
    views = slice_views.SliceViews(headless, ["Red"])
    first_view, events, deadline = None, [], time.time() + 300
    try:
        while logic.busy and time.time() < deadline:
            new = logic.process_events()
            events += new
            if first_view is None and any(e["event"] == "window" for e in new):
                display = out.GetDisplayNode()
                assert display.GetWindow() > 0  # not the (0, 0) of a zero-filled node
                first_view = views.render({"Red": out})["Red"]
            time.sleep(0.05)
    finally:
        logic.shutdown()
        views.close()
    kinds = [e["event"] for e in events]
    assert kinds[-1] == "finished", events[-1]
    assert logic.job.windows == kinds.count("window") == logic.job.planned_windows >= 2
    assert first_view is not None and first_view[..., :3].std() > 5.0  # the Red view after the first window
    voxels = slicer.util.arrayFromVolume(out)
    final = read_volume(out.GetAttribute("GEM3D.Image"))
    np.testing.assert_allclose(voxels, final.array, atol=1e-5)
    assert final.geometry.allclose(geometry.geometry_from_ijk_to_ras(nodes.ijk_to_ras(reference)), atol=1e-5)
    low, high = out.GetDisplayNode().GetWindowLevelMin(), out.GetDisplayNode().GetWindowLevelMax()
    assert low <= np.percentile(voxels, 1) and high >= np.percentile(voxels, 99)

    paths = logic.export_case(out, str(tmp_path / "export"), "nrrd")
    reread = nodes.load_volume(headless.volumes_logic, paths["image"], "reread")
    np.testing.assert_allclose(slicer.util.arrayFromVolume(reread), voxels, atol=1e-5)
    np.testing.assert_allclose(nodes.ijk_to_ras(reread), nodes.ijk_to_ras(reference), atol=1e-5)
    assert read_description(paths["image"]).startswith("SYNTHETIC")
    image = sitk.ReadImage(paths["image"])
    np.testing.assert_allclose(sitk.GetArrayFromImage(image), voxels, atol=1e-5)
    labels, _segments = read_segmentation(paths["segmentation"])
    exported = nodes.load_segmentation(headless.scene, paths["segmentation"])
    composed = EditorLogic.compose_mask(
        exported, reference, {s.segment_id: s.label_value for s in logic.segment_infos(exported)})
    mask = EditorLogic.compose_mask(segmentation, reference, {m.segment_id: m.label for m in matches})
    np.testing.assert_array_equal(composed, mask)
    np.testing.assert_array_equal(np.asarray(labels.array), mask)
