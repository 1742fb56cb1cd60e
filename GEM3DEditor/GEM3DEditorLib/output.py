"""The synthetic output node: made on the reference's grid, filled window by window as the
engine streams, with a window/level that shows what has arrived.

Imports only slicer (MRML + util) and vtk.
"""
import numpy as np
import slicer

from .export import synthetic_description
from .sink import ArraySink

CT_DISPLAY_RANGE = (40.0 - 200.0, 40.0 + 200.0)  # HU shown: soft-tissue window 400, level 40
GEM3D_ATTRIBUTES = ("GEM3D.Image", "GEM3D.Mask", "GEM3D.Provenance", "GEM3D.Modality", "GEM3D.ReferenceFile",
                    "GEM3D.Slicer")


def prepare_output_node(reference_node, output_node=None, name: str = ""):
    """The output volume on the reference's grid (same IJK-to-RAS, same parent transform), zero-filled,
    marked synthetic. An output node given by the user is reused; a labelmap is refused."""
    scene = reference_node.GetScene()
    if output_node is not None and not output_node.IsA("vtkMRMLScalarVolumeNode") or \
            output_node is not None and output_node.IsA("vtkMRMLLabelMapVolumeNode"):
        raise ValueError(f"{output_node.GetName()} is not a scalar volume: choose another output volume")
    if output_node is None:
        output_node = scene.AddNewNodeByClass(
            "vtkMRMLScalarVolumeNode", scene.GenerateUniqueName(name or reference_node.GetName() + " synthetic"))
    shape = slicer.util.arrayFromVolume(reference_node).shape
    slicer.util.updateVolumeFromArray(output_node, np.zeros(shape, np.float32))
    output_node.CopyOrientation(reference_node)
    output_node.SetAndObserveTransformNodeID(reference_node.GetTransformNodeID())
    output_node.SetAttribute("GEM3D.Synthetic", "true")
    for key in GEM3D_ATTRIBUTES:
        output_node.RemoveAttribute(key)
    output_node.SetDescription(synthetic_description("GEM-3D synthetic volume; not a patient scan"))
    if output_node.GetDisplayNode() is None:
        output_node.CreateDefaultDisplayNodes()
    return output_node


class OutputStream:
    """Writes `window` events into the output node's voxels and refreshes its views."""

    def __init__(self, output_node, modality: str = ""):
        self.node = output_node
        self.modality = (modality or "").lower()
        self.sink = ArraySink(slicer.util.arrayFromVolume(output_node))
        self.range = None  # (low, high) shown so far

    def show_range(self, slab: np.ndarray) -> None:
        """Window/level from the data that has arrived, widened as windows come (the display node's
        auto window/level was computed from the zero-filled node and is never recomputed).
        CT gets the abdominal soft-tissue preset (W 400, L 40 HU) at once."""
        display = self.node.GetDisplayNode()
        if display is None:
            return
        if self.modality == "ct":
            low, high = CT_DISPLAY_RANGE
        else:
            finite = slab[np.isfinite(slab)]
            if finite.size == 0:
                return
            low, high = (float(v) for v in np.percentile(finite, [0.5, 99.5]))
            if self.range is not None:
                low, high = min(low, self.range[0]), max(high, self.range[1])
            if high <= low:
                high = low + 1.0
        if self.range != (low, high):
            self.range = (low, high)
            display.AutoWindowLevelOff()
            display.SetWindowLevelMinMax(low, high)

    def started(self, event: dict) -> None:
        self.sink.check_started(event["shape"], event["axis"])

    def window(self, event: dict) -> None:
        scene = self.node.GetScene()
        if scene is None or not scene.IsNodePresent(self.node):
            raise ValueError("The output volume was deleted; the generation is stopped.")
        self.sink.array = slicer.util.arrayFromVolume(self.node)  # the node's current voxel buffer
        slab = self.sink.apply_event(event)
        slicer.util.arrayFromVolumeModified(self.node)
        self.show_range(slab)

    def replace(self, array: np.ndarray) -> None:
        """The final image (the stream's result) replaces the streamed preview."""
        voxels = slicer.util.arrayFromVolume(self.node)
        if array.shape != voxels.shape:
            raise ValueError(f"the engine's output has shape {array.shape}, the output volume {voxels.shape}")
        voxels[:] = array
        slicer.util.arrayFromVolumeModified(self.node)
        self.show_range(np.asarray(array))
