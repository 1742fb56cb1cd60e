"""Issue 24's defects of the module's logic, on Slicer's real MRML (slicer-core); each test failed
on the code before its fix:

1. an edit on a reference with a smaller field of view than the segmentation dropped the segment's
   voxels outside it, for good (undo restored only the reference grid): such an edit is now refused,
   and writes on a smaller grid (undo) keep the voxels outside it;
2. a server URL without http:// was refused after the output node and job folder were made and the
   previous engine was closed;
3. a reference with fewer slices than the bundle's window was refused by the worker, and failed or
   cancelled jobs left zero-filled "... synthetic_N" nodes;
4. "Blob", "Swelling" and "Segment_1" were mapped to labels by label value and by the number in the name;
5. a vector (RGB) reference failed deep inside with an array-shape message;
6. the MRML logic called slicer.util.startupEnvironment(), which needs slicer.app.
"""
import numpy as np
import pytest

from mrml_fixtures import ROOT, headless, phantom_case, phantom_reference, segmentation_from_labels  # noqa: F401

slicer = pytest.importorskip("slicer", reason="slicer-core is in the test extra")

import vtk  # noqa: E402
from gem3d.bundle_format import read_bundle_info  # noqa: E402
from vtk.util import numpy_support  # noqa: E402

from GEM3DEditorLib import edits, label_matching, nodes  # noqa: E402
from GEM3DEditorLib.logic import EditorLogic  # noqa: E402
from GEM3DEditorLib.settings import EngineSettings, GenerateSettings  # noqa: E402

DEMO_BUNDLE = str(ROOT / "GEM3DCore" / "gem3d" / "resources" / "demo_bundle")


def cropped(headless, phantom_case, tmp_path, stop_i=None, stop_k=None, name="crop"):
    """The phantom cut to [:stop_k, :, :stop_i] on the same lattice (a smaller field of view), loaded."""
    from gem3d.io import write_volume
    from gem3d.volume import Volume

    image = phantom_case[0]
    array = np.ascontiguousarray(np.asarray(image.array)[:stop_k, :, :stop_i])
    path = tmp_path / f"{name}.nrrd"
    write_volume(Volume(array, image.geometry), path)
    return nodes.load_volume(headless.volumes_logic, str(path), name)


class RecordingEngine:
    """The engine interface (submit, poll, log_lines, cancel, close, running) answering each job with `answer`."""

    running = True

    def __init__(self, answer="error"):
        self.answer, self.events, self.submitted, self.closed = answer, [], [], False

    def submit(self, request):
        self.submitted.append(request)
        self.events.append({"event": self.answer, "job_id": request["job_id"], "message": "The engine failed."})
        return request["job_id"]

    def poll(self, timeout=0.0, max_events=None):
        events, self.events = self.events, []
        return events

    def log_lines(self):
        return []

    def cancel(self, job_id):
        self.events.append({"event": "cancelled", "job_id": job_id})

    def close(self):
        self.closed = True


def scene_state(headless, work):
    return headless.scene.GetNumberOfNodes(), sorted(p.name for p in work.iterdir())


def test_edits_and_undo_never_lose_voxels_outside_the_reference_field_of_view(headless, phantom_case,
                                                                              phantom_reference, tmp_path):
    whole = phantom_reference(name="whole")
    labels = np.asarray(phantom_case[1].array)  # the lesion spans i = 16..27
    segmentation = segmentation_from_labels(headless.scene, whole, labels,
                                            {1: "necrosis", 2: "edema", 4: "enhancing"})
    seg = segmentation.GetSegmentation()
    ids = [seg.GetNthSegmentID(i) for i in range(seg.GetNumberOfSegments())]
    before = {i: nodes.segment_array(segmentation, i, whole) for i in ids}
    assert [int(a.sum()) for a in before.values()] == [int((labels == v).sum()) for v in (1, 2, 4)]
    logic = EditorLogic(headless.scene, headless.volumes_logic, str(tmp_path))

    cut = cropped(headless, phantom_case, tmp_path, stop_i=22)  # cuts the lesion
    edema = seg.GetSegmentIdBySegmentName("edema")
    assert nodes.voxels_outside(segmentation, edema, cut) == int((labels[:, :, 22:] == 2).sum()) > 0
    with pytest.raises(ValueError, match=r"^Segment 'necrosis' reaches outside crop \(\d+ voxels\): an edit"):
        logic.edit_segments(segmentation, ids, cut, [edits.translate_ras([0.0, 0.0, 0.0])])
    assert not logic.history.can_undo
    nodes.set_segment_arrays({i: nodes.segment_array(segmentation, i, cut) for i in ids}, segmentation, cut)
    for i in ids:  # a write on the smaller grid (what undo does) keeps the voxels outside it
        np.testing.assert_array_equal(nodes.segment_array(segmentation, i, whole), before[i])

    inside = cropped(headless, phantom_case, tmp_path, stop_i=30, name="inside")  # holds the whole lesion
    step = nodes.ijk_to_ras(inside)[:3, 0]
    logic.edit_segments(segmentation, ids, inside, [edits.translate_ras(4 * step)])  # pushes i 27 to 31 > 29
    moved = nodes.segment_array(segmentation, edema, whole)
    assert 0 < int(moved.sum()) < int(before[edema].sum()) and not moved[:, :, 30:].any()
    logic.undo_redo(segmentation, inside, undo=True)
    for i in ids:
        np.testing.assert_array_equal(nodes.segment_array(segmentation, i, whole), before[i])
    assert [seg.GetSegment(i).GetLabelValue() for i in ids] == [1, 2, 4] and seg.GetNumberOfLayers() == 1


def test_a_server_url_without_http_is_refused_before_anything_is_made_or_closed(headless, phantom_case,
                                                                                phantom_reference, tmp_path):
    reference = phantom_reference()
    segmentation = segmentation_from_labels(headless.scene, reference, np.asarray(phantom_case[1].array),
                                            {1: "necrosis", 2: "edema", 4: "enhancing"})
    mapping = {s.segment_id: v for s, v in zip(EditorLogic.segment_infos(segmentation), (1, 2, 4))}
    work = tmp_path / "work"
    work.mkdir()
    previous = RecordingEngine()
    logic = EditorLogic(headless.scene, headless.volumes_logic, str(work))
    logic.client, logic._client_key = previous, ("",)
    state = scene_state(headless, work)
    for url in ("gpu-host:8000", "http://", "ftp://gpu-host"):
        settings = GenerateSettings(DEMO_BUNDLE, engine=EngineSettings(server_url=url))
        with pytest.raises(ValueError, match="must start with http:// or https:// and name a host"):
            logic.start_generation(settings, reference, segmentation, mapping)
        assert scene_state(headless, work) == state and not previous.closed and logic.client is previous


def test_too_few_slices_for_the_window_are_refused_before_the_engine_starts(headless, phantom_case, tmp_path):
    reference = cropped(headless, phantom_case, tmp_path, stop_k=6)  # the demo bundle's window is 8
    labels = np.asarray(phantom_case[1].array)[:6]
    segmentation = segmentation_from_labels(headless.scene, reference, labels, {1: "necrosis", 2: "edema",
                                                                                 4: "enhancing"})
    mapping = {s.segment_id: s.label_value for s in EditorLogic.segment_infos(segmentation)}
    work = tmp_path / "work"
    work.mkdir()
    made = []
    logic = EditorLogic(headless.scene, headless.volumes_logic, str(work),
                        client_factory=lambda settings: made.append(settings) or RecordingEngine())
    state = scene_state(headless, work)
    with pytest.raises(ValueError, match="6 axial slices, fewer than the model's window length 8"):
        logic.start_generation(GenerateSettings(DEMO_BUNDLE), reference, segmentation, mapping)
    assert scene_state(headless, work) == state and not made


@pytest.mark.parametrize("answer, keep_partial", [("error", False), ("cancel", False), ("error", True)])
def test_failed_and_cancelled_jobs_leave_no_empty_output_node(headless, phantom_case, phantom_reference, tmp_path,
                                                              answer, keep_partial):
    reference = phantom_reference()
    segmentation = segmentation_from_labels(headless.scene, reference, np.asarray(phantom_case[1].array),
                                            {1: "necrosis", 2: "edema", 4: "enhancing"})
    mapping = {s.segment_id: s.label_value for s in EditorLogic.segment_infos(segmentation)}
    engine = RecordingEngine("error" if answer == "error" else "queued")
    logic = EditorLogic(headless.scene, headless.volumes_logic, str(tmp_path), client_factory=lambda s: engine)
    volumes = headless.scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode")
    for _ in range(3):
        out = logic.start_generation(GenerateSettings(DEMO_BUNDLE, keep_partial=keep_partial), reference,
                                     segmentation, mapping)
        if answer == "cancel":
            logic.cancel()
        logic.process_events()
        assert logic.job.done and not logic.busy
    count = headless.scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode")
    if keep_partial:
        assert count == volumes + 3 and out.GetName().endswith("(partial)")
    else:
        assert count == volumes and not headless.scene.IsNodePresent(out) and logic.last_output_node is None
        assert headless.scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeDisplayNode") == volumes


def test_an_engine_that_is_gone_is_replaced_and_a_live_one_kept(headless, phantom_case, phantom_reference, tmp_path):
    """The logic keeps its engine between jobs (models stay loaded) and asks the interface's
    `running` whether it is still there: a worker that exited is closed and a new one made."""
    reference = phantom_reference()
    segmentation = segmentation_from_labels(headless.scene, reference, np.asarray(phantom_case[1].array),
                                            {1: "necrosis", 2: "edema", 4: "enhancing"})
    mapping = {s.segment_id: s.label_value for s in EditorLogic.segment_infos(segmentation)}
    made = []
    logic = EditorLogic(headless.scene, headless.volumes_logic, str(tmp_path),
                        client_factory=lambda settings: made.append(RecordingEngine()) or made[-1])

    def generate():
        logic.start_generation(GenerateSettings(DEMO_BUNDLE), reference, segmentation, mapping)
        logic.process_events()
        assert logic.job.done

    generate()
    generate()
    assert len(made) == 1 and not made[0].closed
    made[0].running = False                        # the worker process exited between jobs
    generate()
    assert len(made) == 2 and made[0].closed and not made[1].closed and len(made[1].submitted) == 1


def test_segments_are_never_mapped_by_label_value_or_the_number_in_their_name(headless, phantom_case,
                                                                              phantom_reference, tmp_path):
    reference = phantom_reference()
    segmentation = segmentation_from_labels(headless.scene, reference, np.asarray(phantom_case[1].array),
                                            {1: "Blob", 2: "Swelling", 4: "Segment_1"})
    label_map = read_bundle_info(DEMO_BUNDLE).label_map.names
    matches, unmatched = label_matching.match_segments(EditorLogic.segment_infos(segmentation), label_map)
    assert [m.label for m in matches] == [None, None, None]
    assert [m.name for m in unmatched] == ["Blob", "Swelling", "Segment_1"]
    logic = EditorLogic(headless.scene, headless.volumes_logic, str(tmp_path), client_factory=RecordingEngine)
    with pytest.raises(ValueError, match="No segment is mapped"):
        logic.start_generation(GenerateSettings(DEMO_BUNDLE), reference, segmentation,
                               {m.segment_id: m.label for m in matches})


def test_a_vector_reference_is_refused_with_a_sentence(headless, phantom_reference, tmp_path):
    scalar = phantom_reference()
    rgb = headless.scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode", "photo")
    rgb.CopyOrientation(scalar)
    image = vtk.vtkImageData()
    image.SetDimensions(48, 48, 16)
    image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(np.zeros((16 * 48 * 48, 3), np.uint8), deep=True))
    rgb.SetAndObserveImageData(image)
    segmentation = headless.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "lesion")
    logic = EditorLogic(headless.scene, headless.volumes_logic, str(tmp_path), client_factory=RecordingEngine)
    with pytest.raises(ValueError, match=r"^photo has 3 components per voxel .*select a greyscale scan"):
        logic.start_generation(GenerateSettings(DEMO_BUNDLE), rgb, segmentation, {})


def test_the_engine_environment_needs_no_slicer_app(headless, tmp_path):
    assert not hasattr(slicer, "app")
    logic = EditorLogic(headless.scene, headless.volumes_logic, str(tmp_path), gem3d_root=str(ROOT / "GEM3DCore"),
                        startup_environment={"PATH": "/opt/site/bin", "SITE": "1"})
    env = logic.engine_environment("/usr/bin/python3")
    assert env["SITE"] == "1" and env["PATH"] == "/opt/site/bin"
    assert env["PYTHONPATH"].split(":")[0] == str(ROOT / "GEM3DCore")
