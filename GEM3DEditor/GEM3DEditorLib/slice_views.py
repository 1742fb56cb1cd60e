"""The Red, Yellow and Green slice views as images, rendered by MRML's slice logic (no GUI, no
OpenGL: vtkMRMLSliceLogic blends the layers into an RGBA image as Slicer's views show it, with the
display nodes' window/level and colour tables). For the README screenshot and the tests."""
from typing import Dict, Iterable, Optional

import numpy as np
import slicer
from vtk.util import numpy_support

ORIENTATIONS = {"Red": "Axial", "Yellow": "Sagittal", "Green": "Coronal"}


class SliceViews:
    """Use as a context manager (or call close()): slice logics left on a scene crash VTK at exit."""

    def __init__(self, headless, names: Iterable[str] = tuple(ORIENTATIONS), size: int = 256):
        self.logics = {}
        for name in names:
            node = headless.scene.AddNewNodeByClass("vtkMRMLSliceNode")
            node.SetName(name)
            node.SetLayoutName(name)
            node.SetOrientation(ORIENTATIONS[name])
            node.SetDimensions(size, size, 1)
            logic = slicer.vtkMRMLSliceLogic()
            logic.SetMRMLApplicationLogic(headless.application_logic)
            logic.SetMRMLScene(headless.scene)
            logic.SetSliceNode(node)
            self.logics[name] = logic

    def render(self, backgrounds: Dict[str, object], label=None, offsets: Optional[Dict[str, float]] = None,
               label_opacity: float = 0.5) -> Dict[str, np.ndarray]:
        """{view: RGBA uint8 (rows top->bottom, columns left->right as on screen)}; each view shows its
        background volume (and a labelmap outline/overlay), fitted, at `offsets[view]` mm (default: centre)."""
        images = {}
        for name, volume in backgrounds.items():
            logic = self.logics[name]
            composite = logic.GetSliceCompositeNode()
            composite.SetBackgroundVolumeID(volume.GetID())
            composite.SetLabelVolumeID(label.GetID() if label is not None else None)
            composite.SetLabelOpacity(label_opacity)
            logic.FitSliceToAll()
            if offsets and name in offsets:
                logic.SetSliceOffset(offsets[name])
            producer = logic.GetImageDataConnection().GetProducer()
            producer.Update()
            image = producer.GetOutputDataObject(0)
            columns, rows, _ = image.GetDimensions()
            pixels = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(rows, columns, -1)
            images[name] = np.ascontiguousarray(pixels[::-1])  # VTK's first row is the bottom one
        return images

    def close(self) -> None:
        for logic in self.logics.values():
            logic.SetMRMLScene(None)
        self.logics = {}

    def __enter__(self) -> "SliceViews":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
