"""MRML nodes <-> numpy arrays and files, through Slicer's own storage nodes and logics.

Imports only slicer (MRML) and vtk, so it runs under the slicer-core wheel. Every function takes
the scene from its nodes (or a volumes logic), never slicer.mrmlScene. Files are read and written
with storage nodes and explicit settings, and every write is checked: slicer.util.exportNode has a
mutable `properties={}` default that remembers the last file format (Slicer 5.8-5.13).

Arrays are (k, j, i), as slicer.util.arrayFromVolume gives them.
"""
import os
from typing import Dict

import numpy as np
import slicer
import vtk
from vtk.util import numpy_support


def ijk_to_ras(volume_node) -> np.ndarray:
    matrix = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(matrix)
    return slicer.util.arrayFromVTKMatrix(matrix)


def image_data_from_array(array: np.ndarray, image=None):
    """vtkImageData (or vtkOrientedImageData when given) holding a deep copy of a (k, j, i) array."""
    array = np.ascontiguousarray(array)
    image = vtk.vtkImageData() if image is None else image
    image.SetDimensions(array.shape[2], array.shape[1], array.shape[0])
    scalars = numpy_support.numpy_to_vtk(array.ravel(), deep=True)
    image.GetPointData().SetScalars(scalars)
    return image


def load_volume(volumes_logic, path: str, name: str = "", labelmap: bool = False):
    """A volume node read by Slicer's volume logic (its archetype storage node), with display nodes."""
    if not os.path.isfile(path):
        raise ValueError(f"cannot load {path}: the file does not exist")
    name = name or os.path.basename(path).split(".")[0]
    node = volumes_logic.AddArchetypeVolume(path, name, 1 if labelmap else 0)
    if node is None:
        raise ValueError(f"Slicer could not read {path} as a volume")
    return node


def write_volume(volume_node, path: str, compress: bool = False) -> str:
    """Write a volume with a storage node of its own (the node's storage node is left alone).
    Temporary inputs of the engine are written uncompressed: zlib is the slow part of NRRD."""
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(path)
    storage.SetUseCompression(1 if compress else 0)
    return _write(storage, volume_node, path)


def load_segmentation(scene, path: str, name: str = ""):
    """A segmentation node read from .seg.nrrd (or a labelmap file) by Slicer's segmentation storage node."""
    if not os.path.isfile(path):
        raise ValueError(f"cannot load {path}: the file does not exist")
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name or os.path.basename(path).split(".")[0])
    storage = scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    storage.SetFileName(path)
    node.SetAndObserveStorageNodeID(storage.GetID())
    if not storage.ReadData(node):
        scene.RemoveNode(node)
        scene.RemoveNode(storage)
        raise ValueError(f"Slicer could not read {path} as a segmentation")
    node.CreateDefaultDisplayNodes()
    return node


def write_segmentation(segmentation_node, path: str, compress: bool = True) -> str:
    storage = slicer.vtkMRMLSegmentationStorageNode()
    storage.SetFileName(path)
    storage.SetUseCompression(1 if compress else 0)
    return _write(storage, segmentation_node, path)


def _write(storage, node, path: str) -> str:
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ValueError(f"cannot write {path}: the folder {folder} does not exist")
    if not storage.WriteData(node) or not os.path.isfile(path):
        raise ValueError(f"Slicer could not write {node.GetName()} to {path}")
    return path


def segment_array(segmentation_node, segment_id: str, reference_node) -> np.ndarray:
    """Binary (k, j, i) uint8 array of one segment on the reference's grid, read through the parent
    transforms of both (what slicer.util.arrayFromSegmentBinaryLabelmap does, without slicer.mrmlScene)."""
    scene = segmentation_node.GetScene()
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__gem3d_segment__")
    ids = vtk.vtkStringArray()
    ids.InsertNextValue(segment_id)
    try:
        if not slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
                segmentation_node, ids, labelmap, reference_node):
            raise ValueError(f"cannot read segment {segment_id!r} of {segmentation_node.GetName()}")
        array = (slicer.util.arrayFromVolume(labelmap) > 0).astype(np.uint8)
    finally:
        _remove_with_display(scene, labelmap)
    return array


def set_segment_arrays(arrays: Dict[str, np.ndarray], segmentation_node, reference_node) -> None:
    """Write binary arrays on the reference's grid back into segments ({segment ID: array}), in the
    segmentation's own frame (the inverse of the parent transforms segment_array read through), each
    into its own layer: label values and layers stay as they were. The segments written together may
    take each other's old voxels (a lesion moved as one); other segments are never overwritten.
    Only the reference's field of view changes: a segment's voxels outside it are kept (MODE_REPLACE
    clears the whole segment, so they are put back after the write).

    slicer.util.updateSegmentBinaryLabelmapFromArray does neither: it applies the transform the
    wrong way and moves the segment into a new layer with label value 1."""
    outside = {segment_id: _outside_image(segmentation_node, segment_id, reference_node) for segment_id in arrays}
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    for segment_id, array in arrays.items():
        image = _in_segmentation_frame(array, segmentation_node, reference_node)
        others = [other for other in arrays if other != segment_id]
        if not logic.SetBinaryLabelmapToSegment(image, segmentation_node, segment_id, logic.MODE_REPLACE,
                                                image.GetExtent(), False, others):
            raise ValueError(f"cannot write segment {segment_id!r} of {segmentation_node.GetName()}")
    for segment_id, image in outside.items():
        if image is not None and not logic.SetBinaryLabelmapToSegment(
                image, segmentation_node, segment_id, logic.MODE_MERGE_MAX, image.GetExtent()):
            raise ValueError(f"cannot keep segment {segment_id!r} of {segmentation_node.GetName()} outside the "
                             "reference scan")


def voxels_outside(segmentation_node, segment_id: str, reference_node) -> int:
    """How many of the segment's voxels (in its own geometry) lie outside the reference's field of view."""
    outside = _outside_mask(segmentation_node, segment_id, reference_node)
    return 0 if outside is None else int(outside[0].sum())


def _in_segmentation_frame(array: np.ndarray, segmentation_node, reference_node):
    """A (k, j, i) array on the reference's grid as a binary vtkOrientedImageData in the segmentation's frame."""
    image = slicer.vtkOrientedImageData()
    image_data_from_array((np.asarray(array) > 0).astype(np.uint8), image)
    image.SetImageToWorldMatrix(slicer.util.vtkMatrixFromArray(ijk_to_ras(reference_node)))
    if reference_node.GetParentTransformNode() is not segmentation_node.GetParentTransformNode():
        segmentation_from_reference = vtk.vtkGeneralTransform()
        slicer.vtkMRMLTransformNode.GetTransformBetweenNodes(
            reference_node.GetParentTransformNode(), segmentation_node.GetParentTransformNode(),
            segmentation_from_reference)
        slicer.vtkOrientedImageDataResample.TransformOrientedImage(image, segmentation_from_reference)
    return image


def _outside_mask(segmentation_node, segment_id: str, reference_node):
    """(binary (k, j, i) array of the segment's voxels outside the reference's field of view, the
    segment's own labelmap it is laid on), or None when the segment is empty."""
    current = slicer.vtkOrientedImageData()
    segmentation_node.GetBinaryLabelmapRepresentation(segment_id, current)
    if current.GetPointData().GetScalars() is None or current.GetNumberOfPoints() == 0:
        return None
    field_of_view = _in_segmentation_frame(np.ones(slicer.util.arrayFromVolume(reference_node).shape, np.uint8),
                                           segmentation_node, reference_node)
    inside = slicer.vtkOrientedImageData()
    slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(
        field_of_view, current, inside, False, False)
    shape = current.GetDimensions()[::-1]
    outside = (numpy_support.vtk_to_numpy(current.GetPointData().GetScalars()).reshape(shape) > 0) & \
        (numpy_support.vtk_to_numpy(inside.GetPointData().GetScalars()).reshape(shape) == 0)
    return outside, current


def _outside_image(segmentation_node, segment_id: str, reference_node):
    """The segment's voxels outside the field of view as an image to merge back, or None if there are none.
    They carry the segment's label value: MODE_MERGE_MAX takes the maximum with the shared layer's values."""
    found = _outside_mask(segmentation_node, segment_id, reference_node)
    if found is None or not found[0].any():
        return None
    outside, current = found
    label_value = segmentation_node.GetSegmentation().GetSegment(segment_id).GetLabelValue()
    image = slicer.vtkOrientedImageData()
    image_data_from_array(outside.astype(np.uint8) * np.uint8(label_value), image)
    image.SetExtent(current.GetExtent())
    matrix = vtk.vtkMatrix4x4()
    current.GetImageToWorldMatrix(matrix)
    image.SetImageToWorldMatrix(matrix)
    return image


def _remove_with_display(scene, node) -> None:
    display = node.GetDisplayNode()
    if display is not None and display.GetColorNode() is not None and display.GetColorNode().GetType() == \
            slicer.vtkMRMLColorNode.User:
        scene.RemoveNode(display.GetColorNode())
    scene.RemoveNode(node)
