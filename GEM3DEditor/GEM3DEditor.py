"""GEM-3D Editor (Slicer 5.8+): the module class, a Widget that only wires the panel to a ModuleLogic (GEM3DEditorLib:
MRML with slicer and vtk only), the in-Slicer test; the gem3d engine runs as a process whose events a QTimer applies."""
import json
import os
import pathlib
import sys
import tempfile
import time

import numpy as np
import qt
import slicer
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
from slicer.util import VTKObservationMixin

from GEM3DEditorLib import install, label_matching, panel, sample_data
from GEM3DEditorLib.logic import EditorLogic, first_scalar_volume
from GEM3DEditorLib.module_logic import ModuleLogic
from GEM3DEditorLib.parameters import (BatchMode, GEM3DEditorParameterNode, InformedSource, batch_settings,
                                       generate_settings, path_text)
from GEM3DEditorLib.settings import EngineSettings, GenerateSettings

MODULE_DIR = os.path.dirname(os.path.abspath(__file__))


def gem3dRoot():
    """Folder holding the gem3d package (shipped next to this module, or ../GEM3DCore), on sys.path."""
    roots = (MODULE_DIR, os.path.abspath(os.path.join(MODULE_DIR, os.pardir, "GEM3DCore")))
    root = next((r for r in roots if os.path.isfile(os.path.join(r, "gem3d", "__init__.py"))), None)
    if root and root not in sys.path:
        sys.path.insert(0, root)
    return root


gem3dRoot()  # the editor uses gem3d's torch-free contract (request, bundle format, labels, axes)
from gem3d import bundle_format  # noqa: E402


class GEM3DEditor(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("GEM-3D Editor")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["GEM-3D Editor contributors"]
        self.parent.helpText = _("""
Synthesise a 3D scan (brain MRI FLAIR, abdominal CT) from a segmentation and one informed 2D slice with
GEM-3D latent diffusion; the Batch tab enhances or harmonises datasets. Every output is marked SYNTHETIC,
with a provenance record: it is not a patient scan and must not be used for diagnosis.
""")
        self.parent.acknowledgementText = _('L. Zhu et al., "Generative Enhancement for 3D Medical Images" '
                                            "(GEM-3D), arXiv:2403.12852. Built on 3D Slicer, PyTorch, diffusers.")
        slicer.app.connect("startupCompleted()", lambda: panel.register_sample_data(
            os.path.join(MODULE_DIR, "Resources", "Icons", "GEM3DEditor.png")))


class GEM3DEditorLogic(ScriptedLoadableModuleLogic):
    """Only the parameter node; the work is done by GEM3DEditorLib.logic.EditorLogic."""

    def getParameterNode(self):
        return GEM3DEditorParameterNode(super().getParameterNode())


def newEditorLogic() -> EditorLogic:
    return EditorLogic(slicer.mrmlScene, slicer.modules.volumes.logic(), panel.work_folder(), gem3dRoot(),
                       startup_environment=slicer.util.startupEnvironment())


class GEM3DEditorWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None, logic: "ModuleLogic | None" = None) -> None:  # a stand-in, else setup() makes one
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic, self._parameterNode, self._parameterNodeGuiTag, self._observedSegmentation = logic, None, None, None

    def onReload(self) -> None:
        """Reload GEM3DEditorLib and gem3d too (Slicer's Reload reloads only this file)."""
        for name in [n for n in sys.modules if n == "gem3d" or n.startswith(("gem3d.", "GEM3DEditorLib"))]:
            del sys.modules[name]
        ScriptedLoadableModuleWidget.onReload(self)

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/GEM3DEditor.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = self.logic or newEditorLogic()
        self._timer = qt.QTimer()
        self._timer.setInterval(100)
        self._timer.connect("timeout()", self.onTimer)
        self.ui.labelMappingTable.horizontalHeader().setSectionResizeMode(qt.QHeaderView.Stretch)
        self.ui.labelMappingTable.verticalHeader().hide()
        panel.keep_server_token(self.ui.serverTokenLineEdit)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        later = lambda f: (lambda *args: qt.QTimer.singleShot(0, f))  # noqa: E731  after the parameter node updates
        ui = self.ui
        ui.bundlePathLineEdit.connect("currentPathChanged(QString)", later(self.onBundleChanged))
        ui.referenceVolumeSelector.connect("currentNodeChanged(vtkMRMLNode*)", later(self.onReferenceChanged))
        ui.segmentationSelector.connect("currentNodeChanged(vtkMRMLNode*)", later(self.onSegmentationChanged))
        ui.informedSourceComboBox.connect("currentIndexChanged(int)", later(self.updateInformedWidgets))
        ui.informedVolumeSelector.connect("currentNodeChanged(vtkMRMLNode*)", later(self.updateInformedWidgets))
        ui.informedSliceSpinBox.connect("valueChanged(int)", later(self.updateInformedWidgets))
        ui.startAtInformedCheckBox.connect("toggled(bool)", later(self.updateInformedWidgets))
        ui.useCurrentSliceButton.connect("clicked(bool)", self.onUseCurrentSlice)
        panel.connect_edit_buttons(ui, self.onEdit, lambda: self.bundleInfo().modality)
        ui.undoButton.connect("clicked(bool)", lambda: self.onUndoRedo(undo=True))
        ui.redoButton.connect("clicked(bool)", lambda: self.onUndoRedo(undo=False))
        ui.generateButton.connect("clicked(bool)", self.onGenerate)
        ui.cancelButton.connect("clicked(bool)", lambda: self.logic.cancel())
        ui.exportButton.connect("clicked(bool)", self.onExport)
        ui.batchRunButton.connect("clicked(bool)", self.onBatchRun)
        ui.batchCancelButton.connect("clicked(bool)", lambda: self.logic.cancel_batch())
        self.initializeParameterNode()

    def cleanup(self) -> None:
        self.removeObservers()
        self._timer.stop()
        self.logic.shutdown()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        self.setParameterNode(None)

    def onSceneStartClose(self, caller, event) -> None:
        self.logic.abandon()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(GEM3DEditorLogic().getParameterNode())
        p = self._parameterNode
        if not os.path.isfile(os.path.join(path_text(p.bundlePath), "bundle.json")):
            p.bundlePath = pathlib.Path(bundle_format.DEMO_BUNDLE)
        if not p.referenceVolume:
            p.referenceVolume = first_scalar_volume(slicer.mrmlScene)
        if not p.segmentation:
            p.segmentation = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLSegmentationNode")
        self.onBundleChanged()
        self.onSegmentationChanged()

    def setParameterNode(self, parameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, 33, self.updateButtons)  # vtkCommand.ModifiedEvent
        self._parameterNode = parameterNode
        if parameterNode:
            self._parameterNodeGuiTag = parameterNode.connectGui(self.ui)  # the .ui's "SlicerParameterName"s
            self.addObserver(parameterNode, 33, self.updateButtons)
            self.updateInformedWidgets()

    def bundleInfo(self):
        return bundle_format.read_bundle_info(path_text(self._parameterNode.bundlePath))

    def updateButtons(self, caller=None, event=None) -> None:
        p, logic, ui = self._parameterNode, self.logic, self.ui
        if p is None:
            return
        bundle = os.path.join(path_text(p.bundlePath), "bundle.json")
        ready = bool(p.referenceVolume and p.segmentation and os.path.isfile(bundle))
        ui.generateButton.enabled = ready and not logic.busy
        ui.generateButton.toolTip = "" if ready else _("Select a model bundle, a reference scan and a segmentation")
        ui.cancelButton.enabled = logic.busy
        ui.exportButton.enabled = self.logic.exportable(p.outputVolume) is not None and not logic.busy
        ui.batchRunButton.enabled, ui.batchCancelButton.enabled = not logic.batch_busy, logic.batch_busy
        harmonize = p.batchMode == BatchMode.HARMONIZE
        ui.batchInformedScanLineEdit.enabled = ui.batchInformedPositionSlider.enabled = harmonize
        ui.batchTimesSpinBox.enabled = ui.batchAugmentCheckBox.enabled = not harmonize
        ui.undoButton.enabled, ui.redoButton.enabled = logic.history.can_undo, logic.history.can_redo

    def onBundleChanged(self) -> None:
        try:
            self.ui.bundleInfoLabel.text = self.bundleInfo().describe()
        except ValueError as e:
            self.ui.bundleInfoLabel.text = str(e)
        self.updateLabelTable()
        self.updateButtons()

    def onReferenceChanged(self) -> None:
        self.logic.history.clear()
        self.updateInformedWidgets()
        self.updateButtons()

    def onSegmentationChanged(self) -> None:
        p = self._parameterNode
        if p is not None and p.segmentation is not self._observedSegmentation:
            self.removeObservers(self.onSegmentsChanged)
            self._observedSegmentation = p.segmentation
            for event in (slicer.vtkSegmentation.SegmentAdded, slicer.vtkSegmentation.SegmentRemoved,
                          slicer.vtkSegmentation.SegmentModified) if p.segmentation else ():
                self.addObserver(p.segmentation, event, self.onSegmentsChanged)
            self.logic.history.clear()
        self.ui.editSegmentSelector.setCurrentNode(p.segmentation if p else None)
        self.updateLabelTable()
        self.updateButtons()

    def onSegmentsChanged(self, caller=None, event=None) -> None:
        qt.QTimer.singleShot(0, self.updateLabelTable)

    def updateLabelTable(self) -> None:
        p = self._parameterNode
        if p is None or p.segmentation is None:
            self.ui.labelMappingTable.setRowCount(0)
            return
        try:
            labelMap = self.bundleInfo().label_map.names
        except ValueError:
            labelMap = {}
        names = panel.fill_label_table(self.ui.labelMappingTable, self.logic.segment_infos(p.segmentation), labelMap,
                                       dict(p.labelMapping), self.onMappingChanged)
        self.ui.labelMappingStatusLabel.text = _("Not matched to a model label (ignored unless you pick one): "
                                                 "{names}").format(names=", ".join(names)) if names else ""

    def onMappingChanged(self, segmentId: str, label: int) -> None:
        self._parameterNode.labelMapping = dict(self._parameterNode.labelMapping, **{segmentId: label})

    def informedNode(self):
        p = self._parameterNode
        return p.informedVolume if p.informedSource == InformedSource.OTHER else p.referenceVolume

    def updateInformedWidgets(self) -> None:
        p, ui = self._parameterNode, self.ui
        if p is None:
            return
        ui.informedVolumeSelector.enabled = p.informedSource == InformedSource.OTHER
        ui.startAtInformedCheckBox.enabled = p.informedSource == InformedSource.SAME
        ui.startPositionSlider.enabled = not (p.startAtInformed and p.informedSource == InformedSource.SAME)
        panel.show_informed_slice(ui.informedThumbnailLabel, ui.informedSliceSpinBox, self.informedNode(),
                                  p.informedSlice)

    def onUseCurrentSlice(self) -> None:
        index = panel.red_view_slice_index(self.informedNode())
        if index is not None:
            self._parameterNode.informedSlice = index

    def onEdit(self, specs) -> None:
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("The mask edit failed."), waitCursor=True):
            if self.ui.editAllSegmentsCheckBox.checked:
                segmentIds = [s for s, label in panel.table_mapping(self.ui.labelMappingTable).items() if label]
            else:
                segmentIds = [s for s in [self.ui.editSegmentSelector.currentSegmentID()] if s]
            if not (p.segmentation and p.referenceVolume and segmentIds):
                raise ValueError(_("Select a reference scan, a segmentation and a segment (or map segments to "
                                   "model labels) to edit."))
            applied, messages = self.logic.edit_segments(p.segmentation, segmentIds, p.referenceVolume, specs)
            self.ui.editStatusLabel.text = "; ".join([json.dumps(s) for s in applied] + messages)
        self.updateButtons()

    def onUndoRedo(self, undo: bool) -> None:
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("Undo failed."), waitCursor=True):
            spec = self.logic.undo_redo(p.segmentation, p.referenceVolume, undo)
            if spec is not None:
                text = _("Undone: {spec}") if undo else _("Redone: {spec}")
                self.ui.editStatusLabel.text = text.format(spec=json.dumps(spec["edits"]))
        self.updateButtons()

    def onGenerate(self) -> None:
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("Failed to start the generation."), waitCursor=True):
            if not (p.serverURL.strip() or install.ensure_dependencies(p.enginePython, device=p.device.value)):
                return  # a remote engine needs nothing installed here
            outputNode = self.logic.start_generation(
                generate_settings(p, self.ui.serverTokenLineEdit.text), p.referenceVolume, p.segmentation, panel.table_mapping(self.ui.labelMappingTable),
                p.informedVolume, p.outputVolume)
            slicer.util.setSliceViewerLayers(background=outputNode)
            self._timer.start()
        self.updateButtons()

    def onBatchRun(self) -> None:
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("Failed to start the batch run."), waitCursor=True):
            if install.ensure_dependencies(p.enginePython, device=p.device.value):
                self.logic.start_batch(batch_settings(p))
                self._timer.start()
        self.updateButtons()

    def onTimer(self) -> None:
        self.logic.process_events()
        for state, progress, status in ((self.logic.job, self.ui.progressBar, self.ui.statusLabel),
                                        (self.logic.batch, self.ui.batchProgressBar, self.ui.batchStatusLabel)):
            if state is not None:
                progress.value, status.text = int(100 * state.progress), state.status
        if not self.logic.busy and not self.logic.batch_busy:
            self._timer.stop()
        for message in self.logic.take_errors():
            slicer.util.errorDisplay(message, windowTitle=install.REQUESTER)
        self.updateButtons()

    def onExport(self) -> None:
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("Export failed."), waitCursor=True):
            if not path_text(p.exportFolder):
                raise ValueError(_("Choose an export folder first."))
            if not install.ensure_dependencies(export_only=True):
                return
            paths = self.logic.export_case(self.logic.exportable(p.outputVolume), path_text(p.exportFolder),
                                           p.exportFormat.value, p.exportDicom, p.patientName)
            files = ", ".join(os.path.basename(v) for v in paths.values() if v)
            self.ui.statusLabel.text = _("Exported: {files}").format(files=files)


class GEM3DEditorTest(ScriptedLoadableModuleTest):
    """Runs in Slicer (Reload and Test, or ctest). Skipped, with a message, when gem3d's packages are
    missing: testing mode never installs them."""

    def runTest(self):
        slicer.mrmlScene.Clear()
        missing = install.needed()
        if missing:
            self.delayDisplay("GEM-3D Editor test skipped; install first: " + ", ".join(r for _n, r in missing))
            return
        self.test_GenerateAndExport()

    def test_GenerateAndExport(self):
        from gem3d.io import read_description, read_volume

        folder = tempfile.mkdtemp(prefix="gem3d_test_")
        logic = newEditorLogic()
        reference, segmentation = sample_data.load_phantom_case(slicer.mrmlScene, slicer.modules.volumes.logic(),
                                                                folder, size=64, slices=32)
        bundle = str(bundle_format.DEMO_BUNDLE)
        matches, _unmatched = label_matching.match_segments(logic.segment_infos(segmentation),
                                                            bundle_format.read_bundle_info(bundle).label_map.names)
        settings = GenerateSettings(bundle, start=0.5, engine=EngineSettings(steps=2, seed=1, device="cpu"))
        try:
            out = logic.start_generation(settings, reference, segmentation, {m.segment_id: m.label for m in matches})
            deadline = time.time() + 900
            while logic.busy and time.time() < deadline:
                logic.process_events()
                slicer.app.processEvents()
                time.sleep(0.05)
        finally:
            logic.shutdown()
        self.assertTrue(logic.job.done and logic.job.error is None, logic.job.status)
        self.assertGreater(out.GetDisplayNode().GetWindow(), 0)
        paths = logic.export_case(out, os.path.join(folder, "export"), "nii.gz", dicom=True)
        np.testing.assert_allclose(read_volume(paths["image"]).array, slicer.util.arrayFromVolume(out), atol=1e-4)
        self.assertTrue(read_description(paths["image"]).startswith("SYNTHETIC"))
