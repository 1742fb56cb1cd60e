"""A scene set up the way Slicer's application sets it up, for Slicer's MRML without the
application (the `slicer-core` wheel): tests and the screenshot script use it.

Inside Slicer the module uses slicer.mrmlScene and slicer.modules.volumes.logic() instead.
"""
import slicer

_rules_registered = False


def register_segmentation_converters() -> None:
    """The conversion rules qSlicerSegmentationsModule registers at startup (without them a
    segmentation cannot even hold an empty binary labelmap)."""
    global _rules_registered
    if _rules_registered:
        return
    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    for rule in (slicer.vtkBinaryLabelmapToClosedSurfaceConversionRule,
                 slicer.vtkClosedSurfaceToBinaryLabelmapConversionRule):
        factory.RegisterConverterRule(rule())
    _rules_registered = True


class HeadlessSlicer:
    """scene, application logic, colour logic (Grey and label colour tables) and volumes logic."""

    def __init__(self):
        register_segmentation_converters()
        self.scene = slicer.vtkMRMLScene()
        self.application_logic = slicer.vtkMRMLApplicationLogic()
        self.application_logic.SetMRMLScene(self.scene)
        self.color_logic = slicer.vtkMRMLColorLogic()
        self.color_logic.SetMRMLApplicationLogic(self.application_logic)
        self.color_logic.SetMRMLScene(self.scene)
        self.application_logic.SetModuleLogic("Colors", self.color_logic)
        self.volumes_logic = slicer.vtkSlicerVolumesLogic()
        self.volumes_logic.SetMRMLApplicationLogic(self.application_logic)
        self.volumes_logic.SetMRMLScene(self.scene)
