"""GEM-3D Editor: synthesise a 3D scan from a segmentation and one informed slice, in 3D Slicer.

A thin adapter: MRML nodes <-> numpy arrays and files, GUI state <-> engine requests, engine
events -> node updates. The model runs in a separate process (`PythonSlicer -m gem3d worker`,
see docs/worker-protocol.md) whose events a QTimer applies on the GUI thread; everything that
can run without Slicer lives in GEM3DEditorLib and in the gem3d package shipped beside it.

Coordinates: Slicer's scene is RAS, gem3d and all files are LPS. Inputs go to the engine as
NRRD files written by Slicer (which converts), and the engine's window slabs are in the
reference's array grid, so they fill a node that has the reference's IJK-to-RAS matrix as they
are. Only the mask edits work on arrays in memory; GEM3DEditorLib.geometry converts for them.

Supports Slicer 5.8 (Python 3.9) and newer.
"""
import enum
import importlib
import json
import logging
import os
import pathlib
import sys
import tempfile
import time
from typing import Annotated, Dict, List, Optional

import numpy as np
import qt
import vtk

import slicer
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
from slicer.util import VTKObservationMixin
from slicer.parameterNodeWrapper import Minimum, WithinRange, parameterNodeWrapper

from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode

from GEM3DEditorLib import (batch, bundle_info, dependencies, edits, export, geometry, label_matching,
                            mask_history, process, request, sink, thumbnail)
from GEM3DEditorLib.worker_client import (WorkerClient, environment_with_path, python_executable_default,
                                          worker_command)

MODULE_DIR = os.path.dirname(os.path.abspath(__file__))
REQUESTER = "GEM-3D Editor"


def gem3dRoot() -> Optional[str]:
    """Folder holding the gem3d package (shipped next to this module, or ../GEM3DCore in a source
    tree); put on sys.path so that `import gem3d` finds it."""
    root = bundle_info.find_gem3d_root(MODULE_DIR)
    if root and root not in sys.path:
        sys.path.insert(0, root)
    return root


def defaultBundlePath() -> str:
    return bundle_info.demo_bundle_path(gem3dRoot()) or ""


def pathText(path) -> str:
    """A parameter node path as text; '' for unset (pathlib.Path() is '.')."""
    text = str(path) if path is not None else ""
    return "" if text in ("", ".") else text


#
# GEM3DEditor
#


class GEM3DEditor(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("GEM-3D Editor")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["GEM-3D Editor contributors"]
        self.parent.helpText = _("""
Synthesise a 3D scan (brain MRI FLAIR, abdominal CT) from a segmentation and one informed 2D slice
with GEM-3D latent diffusion: draw, move or augment a lesion and see a matching synthetic volume
appear window by window. The Batch tab enhances or harmonises whole datasets.
Every output is marked SYNTHETIC and comes with a provenance record; it is not a patient scan and
must not be used for diagnosis.
""")
        self.parent.acknowledgementText = _("""
Implements the method of L. Zhu, N. Codella, D. Chen, Z. Jin, L. Yuan, L. Yu, "Generative Enhancement
for 3D Medical Images" (GEM-3D), arXiv:2403.12852. Built on 3D Slicer, PyTorch, diffusers and SimpleITK.
""")


#
# Parameter node
#


class InformedSource(enum.Enum):
    SAME = "same"
    OTHER = "other"
    GENERATED = "generated"

    def label(self):
        return {"same": _("this scan"), "other": _("another loaded scan"),
                "generated": _("generated (slice model)")}[self.value]


class Sampler(enum.Enum):
    DEFAULT = ""
    DPMPP = "dpm++"
    DDIM = "ddim"
    UNIPC = "unipc"

    def label(self):
        return self.value or _("fast default (DPM-Solver++)")


class Device(enum.Enum):
    AUTO = "auto"
    CPU = "cpu"
    CUDA = "cuda"

    def label(self):
        return {"auto": _("auto (CUDA if available)"), "cpu": "CPU", "cuda": "CUDA"}[self.value]


class ExportFormat(enum.Enum):
    NIFTI = "nii.gz"
    NRRD = "nrrd"

    def label(self):
        return {"nii.gz": "NIfTI (.nii.gz)", "nrrd": "NRRD (.nrrd)"}[self.value]


class BatchMode(enum.Enum):
    ENHANCE = "enhance"
    HARMONIZE = "harmonize"

    def label(self):
        return {"enhance": _("Enhance (K samples per case)"),
                "harmonize": _("Harmonise (one fixed informed slice)")}[self.value]


@parameterNodeWrapper
class GEM3DEditorParameterNode:
    bundlePath: pathlib.Path
    referenceVolume: vtkMRMLScalarVolumeNode
    segmentation: vtkMRMLSegmentationNode
    labelMapping: Dict[str, int]  # segment ID -> model label chosen in the table (0: ignore)
    informedSource: InformedSource = InformedSource.SAME
    informedVolume: vtkMRMLScalarVolumeNode
    informedSlice: Annotated[int, Minimum(0)] = 0
    startAtInformed: bool = True
    startPosition: Annotated[float, WithinRange(0.0, 1.0)] = 0.5
    sampler: Sampler = Sampler.DEFAULT
    steps: Annotated[int, WithinRange(0, 1000)] = 0
    seed: Annotated[int, WithinRange(0, 2147483647)] = 0
    device: Device = Device.AUTO
    enginePython: str = ""
    outputVolume: vtkMRMLScalarVolumeNode
    exportFolder: pathlib.Path
    exportFormat: ExportFormat = ExportFormat.NIFTI
    exportDicom: bool = False
    patientName: str = export.DEFAULT_PATIENT_NAME
    batchMode: BatchMode = BatchMode.ENHANCE
    batchInputFolder: pathlib.Path
    batchOutputFolder: pathlib.Path
    batchTimes: Annotated[int, WithinRange(1, 100)] = 2
    batchAugment: bool = False
    batchInformedScan: pathlib.Path
    batchInformedPosition: Annotated[float, WithinRange(0.0, 1.0)] = 0.5


#
# Dependencies (installed on first use, never at import)
#


def ensureDependencies(enginePython: str = "") -> bool:
    """Make sure the engine's packages are importable by PythonSlicer; ask before installing.
    True when generation can start. A user-chosen engine Python manages its own packages."""
    if enginePython.strip():
        return True
    missing = dependencies.missing_packages()
    if not missing:
        return True
    if not slicer.util.confirmOkCancelDisplay(
            _("GEM-3D Editor needs Python packages that are not installed yet (PyTorch alone is 1-3 GB). "
              "Install them now? This takes several minutes and modifies Slicer's Python environment."),
            windowTitle=_("{requester} - Install Python Packages").format(requester=REQUESTER),
            detailedText=dependencies.describe(missing)):
        return False
    loaded = dependencies.installed_versions(dependencies.loaded_distributions(sys.modules))
    torchRequirement, others = dependencies.split_torch(missing)
    slicer.util.showStatusMessage(_("Installing Python packages for GEM-3D Editor..."))
    try:
        if torchRequirement:
            _installTorch(torchRequirement)
        if others:
            _installPackages(others, dependencies.pins(loaded))
    except Exception as e:
        raise RuntimeError(_("Installing the packages GEM-3D Editor needs failed: {error}. Check the network "
                             "connection and the Python console, restart Slicer and try again.").format(error=e))
    importlib.invalidate_caches()
    stillMissing = dependencies.missing_packages()
    changed = dependencies.changed(loaded, dependencies.installed_versions(list(loaded)))
    if stillMissing or changed:
        if not slicer.app.testingEnabled() and slicer.util.confirmYesNoDisplay(
                _("The packages are installed; Slicer must restart to use them. Restart now?"),
                windowTitle=REQUESTER,
                detailedText=dependencies.describe(stillMissing) + "\n" + "\n".join(changed)):
            slicer.util.restart()
        return False
    return True


def _installTorch(requirement: str) -> None:
    """torch through the PyTorch extension when it is installed (it picks the CUDA build that fits
    the driver), else plain pip (CPU build on Windows, CUDA build of PyPI on Linux)."""
    try:
        import PyTorchUtils
    except ImportError:
        PyTorchUtils = None
    if PyTorchUtils is not None:
        torchLogic = PyTorchUtils.PyTorchUtilsLogic()
        if not torchLogic.torchInstalled():
            torch = torchLogic.installTorch(askConfirmation=False,
                                            torchVersionRequirement=requirement[len("torch"):])
            if torch is None:
                raise RuntimeError(_("PyTorch was not installed"))
    else:
        slicer.util.pip_install(requirement)


def _installPackages(requirements: List[str], pins: List[str]) -> None:
    """Everything but torch; packages Slicer has already loaded (numpy...) are kept as they are."""
    if hasattr(slicer, "packaging") and hasattr(slicer.packaging, "pip_ensure"):  # Slicer >= 5.12
        with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
            f.write("\n".join(pins) + "\n")
        try:
            slicer.packaging.pip_ensure(requirements, constraints=f.name, prompt_install=False,
                                        prompt_restart=False, requester=REQUESTER)
        finally:
            os.remove(f.name)
    else:
        slicer.util.pip_install(list(requirements) + list(pins))


#
# GEM3DEditorWidget
#


class GEM3DEditorWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._observedSegmentation = None
        self._history = mask_history.MaskHistory()
        self._batch = None
        self._batchDone = True
        self._timer = None
        self._inTimer = False
        self._thumbnailPath = os.path.join(tempfile.gettempdir(), f"gem3d_thumbnail_{os.getpid()}.pgm")

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/GEM3DEditor.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = GEM3DEditorLogic()

        self._timer = qt.QTimer()
        self._timer.setInterval(100)
        self._timer.connect("timeout()", self.onTimer)

        table = self.ui.labelMappingTable
        table.horizontalHeader().setSectionResizeMode(qt.QHeaderView.Stretch)
        table.verticalHeader().hide()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        # Widgets bound to the parameter node update it in their own slot: read it one event later.
        self.ui.bundlePathLineEdit.connect("currentPathChanged(QString)", lambda path: self.later(self.onBundleChanged))
        self.ui.referenceVolumeSelector.connect("currentNodeChanged(vtkMRMLNode*)",
                                                lambda node: self.later(self.onReferenceChanged))
        self.ui.segmentationSelector.connect("currentNodeChanged(vtkMRMLNode*)",
                                             lambda node: self.later(self.onSegmentationChanged))
        self.ui.informedSourceComboBox.connect("currentIndexChanged(int)",
                                               lambda index: self.later(self.updateInformedWidgets))
        self.ui.informedVolumeSelector.connect("currentNodeChanged(vtkMRMLNode*)",
                                               lambda node: self.later(self.updateInformedWidgets))
        self.ui.informedSliceSpinBox.connect("valueChanged(int)", lambda value: self.later(self.onInformedSliceChanged))
        self.ui.startAtInformedCheckBox.connect("toggled(bool)", lambda on: self.later(self.updateInformedWidgets))
        self.ui.useCurrentSliceButton.connect("clicked(bool)", self.onUseCurrentSlice)
        self.ui.flipButton.connect("clicked(bool)", lambda: self.onEdit([{"op": "flip", "axis": "LR"}]))
        self.ui.rotateButton.connect("clicked(bool)", lambda: self.onEdit([edits.rotate_ras(
            [self.ui.rotateXSpinBox.value, self.ui.rotateYSpinBox.value, self.ui.rotateZSpinBox.value])]))
        self.ui.translateButton.connect("clicked(bool)", lambda: self.onEdit([edits.translate_ras(
            [self.ui.translateXSpinBox.value, self.ui.translateYSpinBox.value, self.ui.translateZSpinBox.value])]))
        self.ui.scaleButton.connect("clicked(bool)", lambda: self.onEdit(
            [{"op": "scale", "factor": self.ui.scaleSpinBox.value}]))
        self.ui.moveToCenterButton.connect("clicked(bool)", lambda: self.onEdit(
            [{"op": "move_toward_center", "max_px": self.ui.moveToCenterSpinBox.value}]))
        self.ui.augmentButton.connect("clicked(bool)", self.onAugment)
        self.ui.undoButton.connect("clicked(bool)", lambda: self.onUndoRedo(undo=True))
        self.ui.redoButton.connect("clicked(bool)", lambda: self.onUndoRedo(undo=False))
        self.ui.generateButton.connect("clicked(bool)", self.onGenerate)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancel)
        self.ui.exportButton.connect("clicked(bool)", self.onExport)
        self.ui.batchRunButton.connect("clicked(bool)", self.onBatchRun)
        self.ui.batchCancelButton.connect("clicked(bool)", self.onBatchCancel)

        self.initializeParameterNode()

    @staticmethod
    def later(function) -> None:
        qt.QTimer.singleShot(0, function)

    def cleanup(self) -> None:
        self.removeObservers()
        if self._timer:
            self._timer.stop()
        if self._batch is not None and self._batch.running:
            self._batch.cancel()  # a batch run resumes where it stopped
        if self.logic:
            self.logic.shutdown()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateButtons)

    def onSceneStartClose(self, caller, event) -> None:
        self.logic.abandonJob()
        self._history.clear()
        self.setParameterNode(None)
        if self._observedSegmentation is not None:
            self.removeObservers(self.onSegmentsChanged)
            self._observedSegmentation = None

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        p = self._parameterNode
        if not os.path.isfile(os.path.join(pathText(p.bundlePath), "bundle.json")) and defaultBundlePath():
            p.bundlePath = pathlib.Path(defaultBundlePath())
        if not p.referenceVolume:
            p.referenceVolume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
        if not p.segmentation:
            p.segmentation = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLSegmentationNode")
        self.onBundleChanged()
        self.onSegmentationChanged()

    def setParameterNode(self, inputParameterNode: Optional[GEM3DEditorParameterNode]) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateButtons)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            # Widgets with a "SlicerParameterName" property in the .ui are connected to the parameter node.
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateButtons)
            self.updateButtons()
            self.updateInformedWidgets()

    # ------------------------------------------------------------------ state
    def updateButtons(self, caller=None, event=None) -> None:
        p = self._parameterNode
        if p is None:
            return
        busy = self.logic.busy
        ready = bool(p.referenceVolume and p.segmentation and
                     os.path.isfile(os.path.join(pathText(p.bundlePath), "bundle.json")))
        self.ui.generateButton.enabled = ready and not busy
        self.ui.generateButton.toolTip = (_("Generate a synthetic volume") if ready else
                                          _("Select a model bundle, a reference scan and a segmentation"))
        self.ui.cancelButton.enabled = busy
        self.ui.exportButton.enabled = self.exportSource() is not None and not busy
        self.ui.batchRunButton.enabled = not self.batchBusy
        self.ui.batchCancelButton.enabled = self.batchBusy
        harmonize = p.batchMode == BatchMode.HARMONIZE
        for widget in (self.ui.batchInformedScanLineEdit, self.ui.batchInformedPositionSlider):
            widget.enabled = harmonize
        for widget in (self.ui.batchTimesSpinBox, self.ui.batchAugmentCheckBox):
            widget.enabled = not harmonize
        self.ui.undoButton.enabled = self._history.can_undo
        self.ui.redoButton.enabled = self._history.can_redo

    def onBundleChanged(self) -> None:
        p = self._parameterNode
        if p is None:
            return
        try:
            info = bundle_info.read_bundle_info(pathText(p.bundlePath))
            self.ui.bundleInfoLabel.text = info.describe()
        except ValueError as e:
            self.ui.bundleInfoLabel.text = str(e)
        self.updateLabelTable()
        self.updateButtons()

    def onReferenceChanged(self) -> None:
        self._history.clear()
        self.updateInformedWidgets()
        self.updateButtons()

    def onSegmentationChanged(self) -> None:
        p = self._parameterNode
        if p is None:
            return
        if p.segmentation is not self._observedSegmentation:
            events = (slicer.vtkSegmentation.SegmentAdded, slicer.vtkSegmentation.SegmentRemoved,
                      slicer.vtkSegmentation.SegmentModified)
            if self._observedSegmentation is not None:
                for event in events:
                    self.removeObserver(self._observedSegmentation, event, self.onSegmentsChanged)
            self._observedSegmentation = p.segmentation
            if p.segmentation is not None:
                for event in events:
                    self.addObserver(p.segmentation, event, self.onSegmentsChanged)
            self._history.clear()
        self.ui.editSegmentSelector.setCurrentNode(p.segmentation)
        self.updateLabelTable()
        self.updateButtons()

    def onSegmentsChanged(self, caller=None, event=None) -> None:
        qt.QTimer.singleShot(0, self.updateLabelTable)  # after the segmentation finished changing

    # ------------------------------------------------------------------ segment -> label table
    def updateLabelTable(self) -> None:
        p = self._parameterNode
        table = self.ui.labelMappingTable
        table.setRowCount(0)
        if p is None or p.segmentation is None:
            self.ui.labelMappingStatusLabel.text = ""
            return
        try:
            labelMap = bundle_info.read_bundle_info(pathText(p.bundlePath)).label_map
        except ValueError:
            labelMap = {}
        segments = self.logic.segmentInfos(p.segmentation)
        matches, unmatched = label_matching.match_segments(segments, labelMap)
        chosen = dict(p.labelMapping)
        table.setRowCount(len(matches))
        for row, match in enumerate(matches):
            nameItem = qt.QTableWidgetItem(match.name)
            nameItem.setFlags(qt.Qt.ItemIsEnabled)
            nameItem.setData(qt.Qt.UserRole, match.segment_id)
            table.setItem(row, 0, nameItem)
            combo = qt.QComboBox()
            combo.addItem(_("(ignore)"), 0)
            for value, name in sorted(labelMap.items()):
                combo.addItem(f"{value}: {name}", value)
            label = chosen.get(match.segment_id, match.label or 0)
            combo.setCurrentIndex(max(combo.findData(label), 0))
            combo.connect("currentIndexChanged(int)",
                          lambda index, segmentId=match.segment_id, c=combo: self.onMappingChanged(segmentId, c))
            table.setCellWidget(row, 1, combo)
            reason = match.reason if match.segment_id not in chosen else _("set by you")
            reasonItem = qt.QTableWidgetItem(reason)
            reasonItem.setFlags(qt.Qt.ItemIsEnabled)
            table.setItem(row, 2, reasonItem)
        notChosen = [m.name for m in unmatched if not chosen.get(m.segment_id)]
        self.ui.labelMappingStatusLabel.text = (
            _("Not matched to a model label (ignored unless you pick one): {names}").format(names=", ".join(notChosen))
            if notChosen else "")

    def onMappingChanged(self, segmentId: str, combo) -> None:
        mapping = dict(self._parameterNode.labelMapping)
        mapping[segmentId] = int(combo.itemData(combo.currentIndex))
        self._parameterNode.labelMapping = mapping

    def currentMapping(self) -> Dict[str, int]:
        table = self.ui.labelMappingTable
        mapping = {}
        for row in range(table.rowCount):
            combo = table.cellWidget(row, 1)
            mapping[table.item(row, 0).data(qt.Qt.UserRole)] = int(combo.itemData(combo.currentIndex))
        return mapping

    # ------------------------------------------------------------------ informed slice
    def informedNode(self):
        p = self._parameterNode
        if p is None:
            return None
        return p.informedVolume if p.informedSource == InformedSource.OTHER else p.referenceVolume

    def updateInformedWidgets(self) -> None:
        p = self._parameterNode
        if p is None:
            return
        source = p.informedSource
        self.ui.informedVolumeSelector.enabled = source == InformedSource.OTHER
        self.ui.startAtInformedCheckBox.enabled = source == InformedSource.SAME
        self.ui.startPositionSlider.enabled = not (p.startAtInformed and source == InformedSource.SAME)
        node = self.informedNode()
        if node is not None and node.GetImageData() is not None:
            shape = slicer.util.arrayFromVolume(node).shape
            count = shape[geometry.axial_axis(self.logic.ijkToRAS(node))]
            self.ui.informedSliceSpinBox.maximum = max(count - 1, 0)
        self.updateThumbnail()

    def updateThumbnail(self) -> Optional[int]:
        """Show the informed slice; returns its index (None without a scan)."""
        p = self._parameterNode
        node = self.informedNode()
        label = self.ui.informedThumbnailLabel
        if p is None or node is None or node.GetImageData() is None:
            label.setPixmap(qt.QPixmap())
            return None
        array = slicer.util.arrayFromVolume(node)
        ijkToRAS = self.logic.ijkToRAS(node)
        axis = geometry.axial_axis(ijkToRAS)
        index = min(p.informedSlice, array.shape[axis] - 1)
        thumbnail.write_thumbnail(self._thumbnailPath, array, ijkToRAS, axis, index)
        label.setPixmap(qt.QPixmap(self._thumbnailPath))
        label.toolTip = (_("The slice model generates the informed slice at the height of this slice.")
                         if p.informedSource == InformedSource.GENERATED else _("The informed slice."))
        return index

    def onInformedSliceChanged(self) -> None:
        """The slice index changed: show it, and move the Red view to it."""
        index = self.updateThumbnail()
        if index is not None:
            self.logic.showSliceInRedView(self.informedNode(), index)

    def onUseCurrentSlice(self) -> None:
        node = self.informedNode()
        index = self.logic.redViewSliceIndex(node) if node is not None else None
        if index is not None:
            self._parameterNode.informedSlice = index

    # ------------------------------------------------------------------ mask edits
    def editedSegmentIds(self) -> List[str]:
        if self.ui.editAllSegmentsCheckBox.checked:
            return [segmentId for segmentId, label in self.currentMapping().items() if label]
        segmentId = self.ui.editSegmentSelector.currentSegmentID()
        return [segmentId] if segmentId else []

    def onEdit(self, specs: List[dict], seed: Optional[int] = None) -> None:
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("The mask edit failed."), waitCursor=True):
            segmentIds = self.editedSegmentIds()
            if not (p.segmentation and p.referenceVolume and segmentIds):
                raise ValueError(_("Select a reference scan, a segmentation and a segment (or map segments to "
                                   "model labels) to edit."))
            applied, messages = self.logic.editSegments(p.segmentation, segmentIds, p.referenceVolume, specs,
                                                        self._history, seed)
            self.ui.editStatusLabel.text = "; ".join(
                [json.dumps(s) for s in applied] + messages)
        self.updateButtons()

    def onAugment(self) -> None:
        p = self._parameterNode
        try:
            modality = bundle_info.read_bundle_info(pathText(p.bundlePath)).modality
        except ValueError:
            modality = "mri"
        gem3dRoot()
        self.onEdit(edits.paper_augmentation(modality, np.random.default_rng()))

    def onUndoRedo(self, undo: bool) -> None:
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("Undo failed."), waitCursor=True):
            spec = self.logic.undoRedo(p.segmentation, p.referenceVolume, self._history, undo)
            if spec is not None:
                self.ui.editStatusLabel.text = (_("Undone: {spec}") if undo else _("Redone: {spec}")).format(
                    spec=json.dumps(spec.get("edits")))
        self.updateButtons()

    # ------------------------------------------------------------------ generate
    def onGenerate(self) -> None:
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("Failed to start the generation."), waitCursor=True):
            if not ensureDependencies(p.enginePython):
                return
            start = None if (p.startAtInformed and p.informedSource == InformedSource.SAME) else p.startPosition
            outputNode = self.logic.startGeneration(
                bundle=pathText(p.bundlePath), referenceNode=p.referenceVolume, segmentationNode=p.segmentation,
                mapping=self.currentMapping(), informedSource=p.informedSource.value,
                informedNode=p.informedVolume, informedSlice=p.informedSlice, start=start,
                sampler=p.sampler.value or None, steps=p.steps or None, seed=p.seed, device=p.device.value,
                enginePython=p.enginePython, outputNode=p.outputVolume, maskEdits=self._history.applied_specs())
            slicer.util.setSliceViewerLayers(background=outputNode)
            self.ui.progressBar.value = 0
            self.ui.statusLabel.text = _("Starting the GEM-3D engine...")
            self._timer.start()
        self.updateButtons()

    def onCancel(self) -> None:
        self.logic.cancel()
        self.ui.statusLabel.text = _("Cancelling...")

    def onTimer(self) -> None:
        if self._inTimer:  # an error dialog runs a nested event loop
            return
        self._inTimer = True
        try:
            errors = self.applyEvents()
            if not self.logic.busy and not self.batchBusy:
                self._timer.stop()
            self.updateButtons()
        finally:
            self._inTimer = False
        for message, details in errors:
            slicer.util.errorDisplay(message, windowTitle=REQUESTER, detailedText=details)

    def applyEvents(self) -> List[tuple]:
        """Show the engine's and the batch run's progress; returns the errors to report."""
        errors = []
        for event in self.logic.processEvents():
            kind = event["event"]
            if kind == "started":
                self.ui.statusLabel.text = _("Generating {count} windows...").format(count=len(event.get("plan", [])))
            elif kind == "window":
                self.ui.progressBar.value = int(100 * float(event.get("progress", 0)))
                self.ui.statusLabel.text = _("Window {start}-{stop} ({direction})").format(
                    start=event["start"], stop=event["stop"], direction=event.get("direction", ""))
            elif kind == "finished":
                self.ui.progressBar.value = 100
                seconds = (event.get("timings") or {}).get("total")
                self.ui.statusLabel.text = (_("Done in {seconds:.1f} s.").format(seconds=seconds)
                                            if seconds is not None else _("Done."))
            elif kind == "cancelled":
                self.ui.statusLabel.text = event.get("message") or _("Cancelled.")
            elif kind == "error":
                self.ui.statusLabel.text = event["message"]
                errors.append((event["message"], event.get("stderr", "")))
        if self._batch is not None:
            errors += self.processBatchEvents()
        return errors

    # ------------------------------------------------------------------ export
    def exportSource(self):
        """The volume Export writes: the selected output volume if it was generated here, else the last one."""
        node = self._parameterNode.outputVolume if self._parameterNode else None
        if node is not None and node.GetAttribute("GEM3D.Image"):
            return node
        last = self.logic.lastOutputNode
        if last is not None and slicer.mrmlScene.IsNodePresent(last) and last.GetAttribute("GEM3D.Image"):
            return last
        return None

    def onExport(self) -> None:
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("Export failed."), waitCursor=True):
            folder = pathText(p.exportFolder)
            if not folder:
                raise ValueError(_("Choose an export folder first."))
            paths = self.logic.exportCase(self.exportSource(), folder, p.exportFormat.value, p.exportDicom,
                                          p.patientName)
            self.ui.statusLabel.text = _("Exported: {files}").format(
                files=", ".join(os.path.basename(v) for v in paths.values() if v))

    # ------------------------------------------------------------------ batch
    def onBatchRun(self) -> None:
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("Failed to start the batch run."), waitCursor=True):
            if not ensureDependencies(p.enginePython):
                return
            python = self.logic.enginePythonPath(p.enginePython)
            command = batch.batch_command(
                python, p.batchMode.value, pathText(p.batchInputFolder), pathText(p.batchOutputFolder),
                bundle=pathText(p.bundlePath) or None, times=p.batchTimes, augment=p.batchAugment,
                informed_scan=pathText(p.batchInformedScan) or None, informed_position=p.batchInformedPosition,
                sampler=p.sampler.value or None, steps=p.steps or None, seed=p.seed, device=p.device.value)
            logging.info("GEM-3D batch: " + " ".join(command))
            self._batch = process.CommandRunner(command, env=self.logic.engineEnvironment(p.enginePython),
                                                what=f"gem3d {p.batchMode.value}").start()
            self._batchDone = False
            self.ui.batchProgressBar.value = 0
            self.ui.batchStatusLabel.text = _("Starting...")
            self._timer.start()
        self.updateButtons()

    def onBatchCancel(self) -> None:
        if self._batch is not None:
            self._batch.cancel()

    @property
    def batchBusy(self) -> bool:
        return self._batch is not None and not self._batchDone

    def processBatchEvents(self) -> List[tuple]:
        errors = []
        for event in self._batch.poll():
            kind = event["event"]
            if kind == "progress":
                self.ui.batchProgressBar.maximum = event["total"]
                self.ui.batchProgressBar.value = event["done"]
                self.ui.batchStatusLabel.text = event["line"]
            elif kind == "log":
                logging.info("gem3d: " + event["line"])
                self.ui.batchStatusLabel.text = event["line"]
            elif kind == "finished":
                self.ui.batchStatusLabel.text = _("Done: the synthetic dataset is in {folder}.").format(
                    folder=pathText(self._parameterNode.batchOutputFolder))
            elif kind == "cancelled":
                self.ui.batchStatusLabel.text = _("Stopped. Run again to resume.")
            elif kind == "error":
                self.ui.batchStatusLabel.text = event["message"]
                errors.append((event["message"], ""))
            if kind in ("finished", "cancelled", "error"):
                self._batchDone = True
        return errors


#
# GEM3DEditorLogic
#


class GEM3DEditorLogic(ScriptedLoadableModuleLogic):
    """MRML nodes <-> files and arrays, and the engine process. Usable without the widget."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self.client = None
        self._clientPython = None
        self.job = None  # the running or last generation: dict(id, outputNode, sink, paths, ...)
        self.lastOutputNode = None

    def getParameterNode(self):
        return GEM3DEditorParameterNode(super().getParameterNode())

    # ------------------------------------------------------------------ geometry helpers
    @staticmethod
    def ijkToRAS(volumeNode) -> np.ndarray:
        matrix = vtk.vtkMatrix4x4()
        volumeNode.GetIJKToRASMatrix(matrix)
        return slicer.util.arrayFromVTKMatrix(matrix)

    @staticmethod
    def _redSliceNode():
        layoutManager = slicer.app.layoutManager()
        if layoutManager is None or layoutManager.sliceWidget("Red") is None:
            return None
        return layoutManager.sliceWidget("Red").mrmlSliceNode()

    def redViewSliceIndex(self, volumeNode) -> Optional[int]:
        """Index (along the volume's axial axis) of the slice the Red view shows."""
        sliceNode = self._redSliceNode()
        if sliceNode is None:
            return None
        sliceToRAS = sliceNode.GetSliceToRAS()
        point = [sliceToRAS.GetElement(i, 3) for i in range(3)]
        ijkToRAS = self.ijkToRAS(volumeNode)
        axis = geometry.axial_axis(ijkToRAS)
        return geometry.slice_index_at(ijkToRAS, point, axis, slicer.util.arrayFromVolume(volumeNode).shape[axis])

    def showSliceInRedView(self, volumeNode, index: int) -> None:
        sliceNode = self._redSliceNode()
        if sliceNode is None:
            return
        ijkToRAS = self.ijkToRAS(volumeNode)
        shape = slicer.util.arrayFromVolume(volumeNode).shape
        centre = geometry.slice_center_ras(ijkToRAS, shape, geometry.axial_axis(ijkToRAS), index)
        sliceNode.JumpSliceByOffsetting(*[float(c) for c in centre])

    # ------------------------------------------------------------------ segments
    @staticmethod
    def segmentInfos(segmentationNode) -> List[label_matching.SegmentInfo]:
        segmentation = segmentationNode.GetSegmentation()
        infos = []
        for index in range(segmentation.GetNumberOfSegments()):
            segmentId = segmentation.GetNthSegmentID(index)
            segment = segmentation.GetSegment(segmentId)
            terminology = vtk.mutable("")
            segment.GetTag("TerminologyEntry", terminology)
            infos.append(label_matching.SegmentInfo(segmentId, segment.GetName() or segmentId, terminology.get(),
                                                    int(segment.GetLabelValue())))
        return infos

    @staticmethod
    def composeMask(segmentationNode, referenceNode, mapping: Dict[str, int]) -> np.ndarray:
        """Label array in the reference's grid from the mapped segments."""
        shape = slicer.util.arrayFromVolume(referenceNode).shape
        parts = [(slicer.util.arrayFromSegmentBinaryLabelmap(segmentationNode, segmentId, referenceNode), label)
                 for segmentId, label in mapping.items() if label]
        return label_matching.compose_label_mask(shape, parts)

    def editSegments(self, segmentationNode, segmentIds: List[str], referenceNode, specs: List[dict],
                     history: mask_history.MaskHistory, seed: Optional[int] = None):
        """Apply mask edits to segments (as one lesion), in the reference's grid; recorded for undo."""
        gem3dRoot()
        arrays = {segmentId: slicer.util.arrayFromSegmentBinaryLabelmap(segmentationNode, segmentId, referenceNode)
                  for segmentId in segmentIds}
        lps = geometry.geometry_from_ijk_to_ras(self.ijkToRAS(referenceNode))
        edited, applied, messages = edits.apply_to_segments(arrays, lps, specs, seed)
        names = [segmentationNode.GetSegmentation().GetSegment(s).GetName() for s in segmentIds]
        history.record(arrays, {"edits": applied, "segments": names})
        for segmentId, array in edited.items():
            slicer.util.updateSegmentBinaryLabelmapFromArray(array, segmentationNode, segmentId, referenceNode)
        return applied, messages

    @staticmethod
    def undoRedo(segmentationNode, referenceNode, history: mask_history.MaskHistory, undo: bool):
        def current(segmentId):
            return slicer.util.arrayFromSegmentBinaryLabelmap(segmentationNode, segmentId, referenceNode)

        result = history.undo(current) if undo else history.redo(current)
        if result is None:
            return None
        arrays, spec = result
        for segmentId, array in arrays.items():
            slicer.util.updateSegmentBinaryLabelmapFromArray(array, segmentationNode, segmentId, referenceNode)
        return spec

    # ------------------------------------------------------------------ engine process
    @staticmethod
    def enginePythonPath(enginePython: str = "") -> str:
        return enginePython.strip() or python_executable_default()

    @staticmethod
    def engineEnvironment(enginePython: str = "") -> Dict[str, str]:
        """PythonSlicer runs in Slicer's environment; another Python in the one Slicer was started from.
        Both find the gem3d package shipped with the module first."""
        base = slicer.util.startupEnvironment() if enginePython.strip() else None
        root = gem3dRoot()
        return environment_with_path(base, [root] if root else [])

    def workFolder(self) -> str:
        folder = os.path.join(slicer.app.temporaryPath, "GEM3DEditor")
        os.makedirs(folder, exist_ok=True)
        return folder

    def ensureWorker(self, enginePython: str = "") -> WorkerClient:
        python = self.enginePythonPath(enginePython)
        if self.client is not None and self.client.running and self._clientPython == python:
            return self.client  # keeps its models loaded between jobs
        if self.client is not None:
            self.client.close(timeout=2.0)
        self.client = WorkerClient(worker_command(python), env=self.engineEnvironment(enginePython),
                                   cwd=self.workFolder()).start()
        self._clientPython = python
        return self.client

    @property
    def busy(self) -> bool:
        return self.job is not None and not self.job["done"]

    def startGeneration(self, bundle: str, referenceNode, segmentationNode, mapping: Dict[str, int],
                        informedSource: str = "same", informedNode=None, informedSlice: int = 0,
                        start: Optional[float] = 0.5, sampler: Optional[str] = None,
                        steps: Optional[int] = None, seed: int = 0, device: str = "auto",
                        enginePython: str = "", outputNode=None, maskEdits=()):
        """Write the inputs, send the request and prepare the output node; returns the output node.
        Call processEvents() (a QTimer does) until the job is done."""
        if self.busy:
            raise RuntimeError(_("A generation is already running."))
        if referenceNode is None or segmentationNode is None:
            raise ValueError(_("Select a reference scan and a segmentation."))
        if informedSource == "other" and informedNode is None:
            raise ValueError(_("Select the scan that provides the informed slice."))
        if outputNode is not None and outputNode in (referenceNode, informedNode):
            raise ValueError(_("The output volume must not be an input scan: choose another output volume."))
        mask = self.composeMask(segmentationNode, referenceNode, mapping)
        if not mask.any():
            raise ValueError(_("No segment is mapped to a model label, or the mapped segments are empty: "
                               "the mask would be empty."))
        jobId = request.new_job_id()
        paths = request.job_paths(self.workFolder(), jobId)
        os.makedirs(paths["folder"])
        slicer.util.exportNode(referenceNode, paths["reference"])
        self._exportLabelmap(mask, referenceNode, paths["mask"])
        scan, position, index = None, None, int(informedSlice)
        if informedSource == "other":
            slicer.util.exportNode(informedNode, paths["informed"])
            scan = paths["informed"]
        elif informedSource == "generated":
            position = geometry.slice_height(self.ijkToRAS(referenceNode),
                                             slicer.util.arrayFromVolume(referenceNode).shape, index)
            index = None
        req = request.build_generate_request(
            jobId, bundle, paths["reference"], paths["mask"], paths["out"], informed_source=informedSource,
            informed_scan=scan, informed_slice=index, informed_position=position, start=start,
            sampler=sampler, steps=steps, seed=seed, device=device)
        request.validate_request(req)
        client = self.ensureWorker(enginePython)
        outputNode = self._prepareOutputNode(referenceNode, outputNode)
        arraySink = sink.ArraySink(slicer.util.arrayFromVolume(outputNode))
        client.generate(req)
        self.job = {"id": jobId, "request": req, "paths": paths, "outputNode": outputNode, "sink": arraySink,
                    "done": False, "mapping": dict(mapping), "maskEdits": list(maskEdits),
                    "segmentation": segmentationNode.GetName(), "referenceFile": self._storedFile(referenceNode)}
        self.lastOutputNode = outputNode
        return outputNode

    @staticmethod
    def _storedFile(node) -> str:
        storage = node.GetStorageNode()
        return (storage.GetFileName() or "") if storage is not None else ""

    @staticmethod
    def _exportLabelmap(mask: np.ndarray, referenceNode, path: str) -> None:
        labelNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__gem3d_mask__")
        try:
            labelNode.CopyOrientation(referenceNode)
            slicer.util.updateVolumeFromArray(labelNode, mask)
            slicer.util.exportNode(labelNode, path)
        finally:
            slicer.mrmlScene.RemoveNode(labelNode)

    @staticmethod
    def _prepareOutputNode(referenceNode, outputNode):
        """The output volume on the reference's grid (same IJK-to-RAS, same parent transform)."""
        if outputNode is None:
            outputNode = slicer.mrmlScene.AddNewNodeByClass(
                "vtkMRMLScalarVolumeNode", slicer.mrmlScene.GenerateUniqueName(referenceNode.GetName() + " synthetic"))
        shape = slicer.util.arrayFromVolume(referenceNode).shape
        slicer.util.updateVolumeFromArray(outputNode, np.zeros(shape, np.float32))
        outputNode.CopyOrientation(referenceNode)
        outputNode.SetAndObserveTransformNodeID(referenceNode.GetTransformNodeID())
        outputNode.SetAttribute("GEM3D.Synthetic", "true")
        for key in ("GEM3D.Image", "GEM3D.Mask", "GEM3D.Provenance", "GEM3D.Modality", "GEM3D.ReferenceFile"):
            outputNode.RemoveAttribute(key)
        outputNode.SetDescription(export.synthetic_description(_("GEM-3D synthetic volume; not a patient scan")))
        if outputNode.GetDisplayNode() is None:
            outputNode.CreateDefaultDisplayNodes()
        return outputNode

    def processEvents(self) -> List[dict]:
        """Apply the engine's events to the output node; returns them (for the GUI)."""
        if self.client is None:
            return []
        for line in self.client.drain_log():
            logging.info("gem3d: " + line)
        events = self.client.poll()
        job = self.job
        for event in events:
            if job is None or job["done"] or event.get("job_id") not in (job["id"], None):
                continue
            kind = event["event"]
            try:
                if kind == "started":
                    job["sink"].check_started(event["shape"], event["axis"])
                elif kind == "window":
                    self._applyWindow(job, event)
            except ValueError as e:  # a grid mismatch: stop rather than write wrong voxels
                self.client.cancel(job["id"])
                event.update({"event": "error", "type": "error", "message": str(e)})
                kind = "error"
            if kind == "finished":
                self._finish(job, event)
            if kind in ("finished", "cancelled", "error"):
                job["done"] = True
        return events

    def _applyWindow(self, job, event) -> None:
        node = job["outputNode"]
        if not slicer.mrmlScene.IsNodePresent(node):
            raise ValueError(_("The output volume was deleted; the generation is stopped."))
        job["sink"].array = slicer.util.arrayFromVolume(node)  # the node's current voxel buffer
        job["sink"].apply_event(event)
        slicer.util.arrayFromVolumeModified(node)

    def _finish(self, job, event) -> None:
        """The output file is the result: the node gets its voxels (the streamed windows were a preview),
        and the attributes that Export and the provenance need."""
        node, outputs = job["outputNode"], event.get("outputs") or {}
        if not job["sink"].complete:
            logging.warning(f"GEM-3D job {job['id']}: only {job['sink'].filled_fraction:.0%} of the slices arrived "
                            "as windows")
        if slicer.mrmlScene.IsNodePresent(node) and os.path.isfile(outputs.get("image", "")):
            gem3dRoot()
            from gem3d.io import read_volume

            final = read_volume(outputs["image"]).array
            voxels = slicer.util.arrayFromVolume(node)
            if final.shape == voxels.shape:
                voxels[:] = final
                slicer.util.arrayFromVolumeModified(node)
        node.SetAttribute("GEM3D.Image", outputs.get("image", job["paths"]["out"]))
        node.SetAttribute("GEM3D.Mask", job["paths"]["mask"])
        node.SetAttribute("GEM3D.Provenance", outputs.get("provenance", ""))
        node.SetAttribute("GEM3D.ReferenceFile", job["referenceFile"])
        node.SetAttribute("GEM3D.Slicer", json.dumps({
            "segmentation": job["segmentation"], "label_mapping": job["mapping"],
            "mask_edits_in_slicer": job["maskEdits"], "request": job["request"]}))
        try:
            node.SetAttribute("GEM3D.Modality", bundle_info.read_bundle_info(job["request"]["bundle"]).modality)
        except ValueError:
            pass

    def cancel(self) -> None:
        if self.busy:
            self.client.cancel(self.job["id"])

    def abandonJob(self) -> None:
        """The scene is closing: cancel, and never touch the output node again."""
        self.cancel()
        if self.job is not None:
            self.job["done"] = True
        self.job = None
        self.lastOutputNode = None

    def shutdown(self) -> None:
        self.abandonJob()
        if self.client is not None:
            self.client.close(timeout=2.0)
            self.client = None

    # ------------------------------------------------------------------ export
    def exportCase(self, outputNode, folder: str, imageFormat: str = "nii.gz", dicom: bool = False,
                   patientName: str = export.DEFAULT_PATIENT_NAME) -> Dict[str, Optional[str]]:
        """Write the engine's output for this node (volume, segmentation, provenance, optionally DICOM)."""
        if outputNode is None or not outputNode.GetAttribute("GEM3D.Image"):
            raise ValueError(_("Generate a volume first: only volumes generated here can be exported."))
        gem3dRoot()
        from gem3d.io import read_volume

        image = read_volume(outputNode.GetAttribute("GEM3D.Image"))
        mask = read_volume(outputNode.GetAttribute("GEM3D.Mask"))
        provenance = {}
        provenancePath = outputNode.GetAttribute("GEM3D.Provenance")
        if provenancePath and os.path.isfile(provenancePath):
            with open(provenancePath, encoding="utf-8") as f:
                provenance = json.load(f)
        provenance["slicer"] = json.loads(outputNode.GetAttribute("GEM3D.Slicer") or "{}")
        request_ = provenance["slicer"].get("request") or {}
        labelNames = {}
        if request_.get("bundle"):
            try:
                labelNames = bundle_info.read_bundle_info(request_["bundle"]).label_map
            except ValueError:
                pass
        protected = [request_.get("reference"), request_.get("mask"),
                     outputNode.GetAttribute("GEM3D.ReferenceFile")]
        return export.export_case(
            image, folder, name=export.safe_name(outputNode.GetName()), mask=mask, provenance=provenance,
            image_format=imageFormat, label_names=labelNames, dicom=dicom, patient_name=patientName,
            modality=export.dicom_modality(outputNode.GetAttribute("GEM3D.Modality") or ""),
            description=f"GEM-3D {outputNode.GetName()}", protected=[p for p in protected if p])


#
# GEM3DEditorTest
#


class GEM3DEditorTest(ScriptedLoadableModuleTest):
    """Runs in Slicer (Reload and Test, or ctest). Needs gem3d's dependencies and the demo bundle."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_GeometryThroughFiles()
        self.setUp()
        self.test_GenerateAndExport()

    def _phantomScene(self):
        """A phantom brain (gem3d.phantom) as the reference, and a segmentation with a spherical lesion."""
        gem3dRoot()
        from gem3d import phantom
        from gem3d.io import write_volume

        image, _labels, _truth = phantom.make_case("brain", seed=0, index=0, size=64, slices=32)
        folder = tempfile.mkdtemp(prefix="gem3d_test_")
        path = os.path.join(folder, "phantom_flair.nrrd")
        write_volume(image, path)
        referenceNode = slicer.util.loadVolume(path)
        segmentationNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Lesion")
        segmentationNode.CreateDefaultDisplayNodes()
        segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(referenceNode)
        segmentId = segmentationNode.GetSegmentation().AddEmptySegment("", "edema")
        shape = slicer.util.arrayFromVolume(referenceNode).shape
        k, j, i = np.ogrid[:shape[0], :shape[1], :shape[2]]
        centre = [s // 2 for s in shape]
        sphere = ((k - centre[0]) ** 2 + (j - centre[1] - 8) ** 2 + (i - centre[2] - 10) ** 2) <= 36
        slicer.util.updateSegmentBinaryLabelmapFromArray(sphere.astype(np.uint8), segmentationNode, segmentId,
                                                         referenceNode)
        return referenceNode, segmentationNode, segmentId, folder

    def test_GeometryThroughFiles(self):
        """A volume written by Slicer and read by gem3d has the geometry GEM3DEditorLib computes from its
        IJK-to-RAS matrix (RAS -> LPS)."""
        self.delayDisplay("Geometry RAS -> LPS")
        gem3dRoot()
        from gem3d.io import read_volume

        node = slicer.util.addVolumeFromArray(np.zeros((4, 5, 6), np.float32), name="oblique")
        matrix = vtk.vtkMatrix4x4()
        transform = vtk.vtkTransform()
        transform.Translate(12.0, -7.0, 30.0)
        transform.RotateWXYZ(25.0, 0.3, 0.5, 0.8)
        transform.Scale(0.7, 0.9, 2.5)
        matrix.DeepCopy(transform.GetMatrix())
        node.SetIJKToRASMatrix(matrix)
        path = os.path.join(tempfile.mkdtemp(prefix="gem3d_test_"), "oblique.nrrd")
        slicer.util.exportNode(node, path)
        fromFile = read_volume(path).geometry
        computed = geometry.geometry_from_ijk_to_ras(GEM3DEditorLogic.ijkToRAS(node))
        self.assertTrue(fromFile.allclose(computed), f"{fromFile.describe()} != {computed.describe()}")
        self.delayDisplay("Geometry test passed")

    def test_GenerateAndExport(self):
        self.delayDisplay("Generating from a phantom with the demo bundle")
        bundle = defaultBundlePath()
        self.assertTrue(bundle, "the demo bundle (gem3d/resources/demo_bundle) is missing")
        self.assertTrue(ensureDependencies())
        referenceNode, segmentationNode, segmentId, folder = self._phantomScene()
        logic = GEM3DEditorLogic()
        mapping = {m.segment_id: m.label for m in label_matching.match_segments(
            logic.segmentInfos(segmentationNode), bundle_info.read_bundle_info(bundle).label_map)[0]}
        self.assertTrue(mapping[segmentId], "the 'edema' segment must match a model label")
        try:
            outputNode = logic.startGeneration(bundle, referenceNode, segmentationNode, mapping, start=0.5,
                                               steps=2, seed=1, device="cpu")
            events, deadline = [], time.time() + 900
            while logic.busy and time.time() < deadline:
                events += logic.processEvents()
                slicer.app.processEvents()
                time.sleep(0.05)
            kinds = [e["event"] for e in events]
            self.assertEqual(kinds[-1:], ["finished"], f"events: {kinds}; last: {events[-1] if events else None}")
            started = events[kinds.index("started")]
            self.assertEqual(kinds.count("window"), len(started["plan"]))
            self.assertTrue(logic.job["sink"].complete, "the windows did not cover the volume")
        finally:
            logic.shutdown()
        output = slicer.util.arrayFromVolume(outputNode)
        self.assertEqual(output.shape, slicer.util.arrayFromVolume(referenceNode).shape)
        self.assertFalse(np.isnan(output).any())
        self.assertGreater(float(output.std()), 0.0)
        np.testing.assert_allclose(logic.ijkToRAS(outputNode), logic.ijkToRAS(referenceNode), atol=1e-6)

        paths = logic.exportCase(outputNode, os.path.join(folder, "export"), "nii.gz", dicom=True)
        from gem3d.io import read_description, read_volume

        exported = read_volume(paths["image"])
        np.testing.assert_allclose(exported.array, output, rtol=1e-5, atol=1e-4)
        self.assertTrue(read_description(paths["image"]).startswith("SYNTHETIC"))
        self.assertTrue(exported.geometry.allclose(geometry.geometry_from_ijk_to_ras(logic.ijkToRAS(referenceNode))))
        self.assertTrue(os.path.isfile(paths["segmentation"]))
        with open(paths["provenance"], encoding="utf-8") as f:
            self.assertTrue(json.load(f)["synthetic"])
        self.assertTrue(os.listdir(paths["dicom"]))
        self.delayDisplay("Generate and export test passed")
