"""Fixtures for tests on Slicer's real MRML (the slicer-core wheel): a headless scene, phantom
volumes written by SimpleITK in chosen geometries and loaded through Slicer's volume logic, and a
BraTS-labelled segmentation imported from a labelmap."""
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "GEM3DEditor"))

BRATS = {1: "necrotic core", 2: "edema", 4: "enhancing tumour"}


@pytest.fixture
def headless():
    from GEM3DEditorLib.headless import HeadlessSlicer

    return HeadlessSlicer()


def oblique_geometry(spacing=(0.9, 1.1, 2.5), left_handed=False):
    from gem3d.volume import Geometry

    angle = np.deg2rad(20.0)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0.0], [np.sin(angle), np.cos(angle), 0.0], [0.0, 0.0, 1.0]])
    tilt = np.deg2rad(10.0)
    rotation = rotation @ np.array([[1.0, 0.0, 0.0], [0.0, np.cos(tilt), -np.sin(tilt)], [0.0, np.sin(tilt), np.cos(tilt)]])
    if left_handed:
        rotation = rotation @ np.diag([1.0, 1.0, -1.0])
    return Geometry(tuple(spacing), (12.0, -30.0, 41.0), rotation)


@pytest.fixture
def phantom_case():
    """(image, labels) of a 48 x 48 x 16 phantom brain, in gem3d Volumes."""
    from gem3d import phantom

    image, labels, _truth = phantom.make_case("brain", seed=0, index=0, size=48, slices=16)
    return image, labels


@pytest.fixture
def phantom_reference(headless, phantom_case, tmp_path):
    """Write the phantom (in a chosen geometry and format) and load it through Slicer's volume logic."""
    from gem3d.io import write_volume
    from gem3d.volume import Volume

    from GEM3DEditorLib import nodes

    def make(geometry=None, suffix=".nrrd", name="reference"):
        image = phantom_case[0]
        volume = image if geometry is None else Volume(image.array, geometry)
        path = tmp_path / f"{name}{suffix}"
        write_volume(volume, path)
        return nodes.load_volume(headless.volumes_logic, str(path), name)

    return make


@pytest.fixture
def brats_segmentation(headless, phantom_case, tmp_path):
    """A segmentation with the phantom's labels 1, 2, 4 as segments of one shared layer (label values kept),
    imported from a labelmap on the reference's grid."""
    import slicer

    def make(reference):
        array = np.asarray(phantom_case[1].array)
        assert array.shape == slicer.util.arrayFromVolume(reference).shape
        return segmentation_from_labels(headless.scene, reference, array, BRATS)

    return make


def segmentation_from_labels(scene, grid_node, labels: np.ndarray, names: dict, name="lesion"):
    """Segments of one shared layer (label values kept, named by `names`) imported from a label array
    on grid_node's grid."""
    import slicer

    from GEM3DEditorLib import nodes

    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "labels")
    labelmap.CopyOrientation(grid_node)
    labelmap.SetAndObserveImageData(nodes.image_data_from_array(np.asarray(labels).astype(np.uint8)))
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    segmentation.CreateDefaultDisplayNodes()
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(grid_node)
    image = slicer.vtkSlicerSegmentationsModuleLogic.CreateOrientedImageDataFromVolumeNode(labelmap)
    assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(image, segmentation)
    seg = segmentation.GetSegmentation()
    for index in range(seg.GetNumberOfSegments()):
        seg.GetNthSegment(index).SetName(names[seg.GetNthSegment(index).GetLabelValue()])
    scene.RemoveNode(labelmap)
    return segmentation


def lesion_world_centroid(segmentation, segment_id, reference):
    """RAS centroid (world) of a segment, read through its parent transform."""
    from GEM3DEditorLib import nodes

    array = nodes.segment_array(segmentation, segment_id, reference)
    k, j, i = np.nonzero(array)
    ijk = np.stack([i, j, k, np.ones_like(i)]).astype(float)
    return (nodes.ijk_to_ras(reference) @ ijk)[:3].mean(axis=1)
