"""The page: trame-slicer's slice views and Segment Editor over one Session, with GEM-3D's controls
(case, lesion edits with undo, bundle/sampler/steps/seed, Generate with progress and Cancel, Export).

Every user-facing failure is one sentence in the page's message line; patient file names are never logged.
"""
from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path
from typing import Optional, Tuple

from trame.app import TrameApp, asynchronous
from trame.ui.vuetify3 import SinglePageWithDrawerLayout
from trame.widgets import html
from trame.widgets import vuetify3 as v3
from trame_slicer.core import LayoutManager, SlicerApp
from trame_slicer.rca_view import register_rca_factories
from trame_slicer.segmentation import SegmentationEffectErase, SegmentationEffectNoTool, SegmentationEffectPaint
from trame_slicer.views import Layout, LayoutDirection, ViewLayoutDefinition, ViewProps, ViewType

from gem3d.sampler_settings import SAMPLERS
from GEM3DEditorLib import edits

from . import access
from . import uploads
from .session import Session

log = logging.getLogger("gem3d_web")
EFFECTS = {"none": SegmentationEffectNoTool, "paint": SegmentationEffectPaint, "erase": SegmentationEffectErase}
LESION_EDITS = {  # button id -> (label, edit spec in gem3d.mask_edits' terms)
    "right": ("right", edits.translate_ras([5.0, 0.0, 0.0])), "left": ("left", edits.translate_ras([-5.0, 0.0, 0.0])),
    "anterior": ("anterior", edits.translate_ras([0.0, 5.0, 0.0])),
    "posterior": ("posterior", edits.translate_ras([0.0, -5.0, 0.0])),
    "up": ("up", edits.translate_ras([0.0, 0.0, 5.0])), "down": ("down", edits.translate_ras([0.0, 0.0, -5.0])),
    "flip": ("flip L-R", {"op": "flip", "axis": "LR"}), "rotate": ("rotate 10°", edits.rotate_ras([0.0, 0.0, 10.0])),
    "grow": ("grow", {"op": "scale", "factor": 1.2}), "shrink": ("shrink", {"op": "scale", "factor": 0.8}),
}
# Oversized uploads are refused in the browser: over the websocket's message limit they would
# drop the connection instead of getting a sentence.
UNREADABLE = ("The uploaded file could not be read as a scan or segmentation: "
              "upload NIfTI, NRRD, MetaImage or a zipped DICOM series and a Slicer .seg.nrrd.")
UPLOAD_JS = ("const files = Array.from($event.target.files || []);"
             "const total = files.reduce((n, f) => n + f.size, 0);"
             "if (!files.length) {} else if (total > max_upload) {"
             "message = `The upload is ${(total / 1e6).toFixed(0)} MB; this editor accepts up to "
             "${(max_upload / 1e6).toFixed(0)} MB (gem3d-web --max-upload-mb).`; $event.target.value = '';"
             "} else { trigger('%s', [files]); }")  # % the trigger's name


UPLOAD_ACCEPT = ".nii,.nii.gz,.nrrd,.mha,.mhd,.nhdr,.zip"
SYNTHETIC_GROUP = 1  # the side-by-side layout's right view; every other view is in group 0


def layouts() -> dict:
    """Three views (the latest volume: synthetic once generated), or the reference and the synthetic
    side by side in two axial views."""
    synthetic = ViewLayoutDefinition("Synthetic", ViewType.SLICE_VIEW,
                                     ViewProps(orientation="Axial", label="Synthetic", color="#9E9E9E",
                                               group=SYNTHETIC_GROUP))
    return {
        "three": Layout(LayoutDirection.Horizontal, [
            ViewLayoutDefinition.axial_view(),
            Layout(LayoutDirection.Vertical, [ViewLayoutDefinition.coronal_view(),
                                              ViewLayoutDefinition.sagittal_view()]),
        ]),
        "side": Layout(LayoutDirection.Horizontal, [ViewLayoutDefinition.axial_view(), synthetic]),
    }


class EditorApp(TrameApp):
    """One scene, one Session, one page."""

    def __init__(self, bundle: str, work_folder: str, data_root: Optional[str] = None,
                 max_upload_mb: float = 200.0, remote: Tuple[str, str] = ("", ""), server=None):
        super().__init__(server)
        self.data_root = Path(data_root).resolve() if data_root else None
        self.max_upload_bytes = int(max_upload_mb * 1024 * 1024)
        self.slicer = SlicerApp()
        register_rca_factories(self.slicer.view_manager, self.server)
        self.layout_manager = LayoutManager(self.slicer.scene, self.slicer.view_manager, self.server)
        for name, layout in layouts().items():
            self.layout_manager.register_layout(name, layout)
        self.layout_manager.set_layout("three")
        self._unfitted = set()  # slice views to fit to the scan when the browser gives them their size
        for view in self.slicer.view_manager.get_slice_views():
            view.interactor().AddObserver("WindowResizeEvent", lambda *_, view=view: self._fit_resized(view))
        self.session = Session(self.slicer.scene, self.slicer.volumes_logic, work_folder, bundle, remote)
        self._poller: Optional[asyncio.Task] = None
        self._count_pending = False
        self._cancelling = False
        self.state.update({
            "trame__title": "GEM-3D editor", "message": "", "loaded": False, "busy": False, "progress": 0,
            "status": "Load a case: Sample, Upload or the data folder.", "bundle_name": os.path.basename(bundle),
            "sampler": "", "samplers": ["", *SAMPLERS], "steps": 0, "seed": 0, "effect": "none", "brush": 6.0,
            "segments": [], "segment": None, "windows": 0, "can_export": False, "finished": False,
            "data_files": self._data_files(), "data_scan": None, "data_segmentation": None,
            "max_upload": self.max_upload_bytes,
            "mask_voxels": 0, "lesion_centre": None, "informed_slice": 0, "informed_thumb": "",
            "informed_source": "same", "has_informed": False,
            "has_slice_model": self.session.has_slice_model, "layout": "three",
            "segment_labels": [], "label_items": [{"title": "not used", "value": 0}, *(
                {"title": name, "value": value} for value, name in sorted(self.session.label_names.items()))],
        })
        self.state.change("effect")(self._on_effect)
        self.state.change("brush")(self._on_brush)
        self.state.change("segment")(self._on_segment)
        self.state.change("layout")(self._on_layout)
        self.state.change("informed_source")(lambda **_: self.session.reference is not None and self.pick_informed())
        self.ctrl.trigger("upload")(self.upload)
        self.ctrl.trigger("upload_informed")(self.upload_informed)
        self.ctrl.trigger("export_zip")(self.export_zip)
        self._build_ui()

    # ------------------------------------------------------------------ UI
    def _build_ui(self):
        with SinglePageWithDrawerLayout(self.server, theme="dark") as layout:
            layout.title.set_text("GEM-3D editor")
            layout.root.theme = "dark"
            with layout.toolbar:
                v3.VSpacer()
                with v3.VBtnToggle(v_model=("layout",), mandatory=True, density="compact", divided=True):
                    v3.VBtn("Three views", value="three", id="layout_three", size="small")
                    v3.VBtn("Side by side", value="side", id="layout_side", size="small")
                html.Div("{{ status }}", id="status", classes="text-caption mx-4")
            with layout.drawer as drawer:
                drawer.width = 320
                with v3.VContainer(classes="pa-2"):
                    self._case_controls()
                    self._edit_controls()
                    self._generate_controls()
                    v3.VAlert(v_if="message", text=("message",), type="warning", density="compact", id="message",
                              closable=True, classes="mt-2")
            with layout.content:
                with html.Div(style="position: relative; width: 100%; height: calc(100vh - 64px);", id="views"):
                    self.layout_manager.initialize_layout_grid(layout)

    def _case_controls(self):
        html.Div("Case", classes="text-subtitle-2")
        v3.VBtn("Sample", id="sample", click=self.load_sample, block=True, classes="mb-2", disabled=("busy",))
        v3.VFileInput(label="Upload scan (+ .seg.nrrd)", multiple=True, density="compact", id="upload",
                      disabled=("busy",), accept=UPLOAD_ACCEPT, show_size=True, change=UPLOAD_JS % "upload")
        with html.Div(v_if="data_files.length"):
            v3.VSelect(label="Scan in the data folder", v_model=("data_scan",), items=("data_files",),
                       density="compact", id="data_scan")
            v3.VSelect(label="Segmentation", v_model=("data_segmentation",), items=("data_files",),
                       density="compact", clearable=True, id="data_segmentation")
            v3.VBtn("Open", id="open_data", click=self.load_data_files, block=True, disabled=("busy",))

    def _edit_controls(self):
        v3.VDivider(classes="my-2")
        html.Div("Tumour ({{ mask_voxels }} mapped voxels)", classes="text-subtitle-2", id="mask_voxels")
        html.Div("centre RAS {{ lesion_centre ? lesion_centre.join(', ') : '-' }} mm", classes="text-caption",
                 id="lesion_centre")
        with html.Div(id="segment_labels"):
            with html.Div(v_for="row in segment_labels", key="row.id", classes="segment_row d-flex align-center ga-1"):
                html.Div("{{ row.name }}", classes="text-caption text-truncate", style="width: 35%")
                v3.VSelect(model_value=("row.label",), items=("label_items",), density="compact",
                           hide_details=True, disabled=("busy",), classes="label_select",
                           update_modelValue=(self.choose_label, "[row.id, $event]"))
                html.Div("{{ row.reason }}", classes="text-caption text-truncate", style="width: 25%")
        v3.VSelect(label="Segment", v_model=("segment",), items=("segments",), item_title="name",
                   item_value="id", density="compact", disabled=("!loaded",))
        with v3.VBtnToggle(v_model=("effect",), mandatory=True, density="compact", divided=True, classes="mb-2"):
            v3.VBtn("None", value="none", id="effect_none")
            v3.VBtn("Paint", value="paint", id="effect_paint")
            v3.VBtn("Erase", value="erase", id="effect_erase")
        v3.VSlider(label="Brush %", v_model=("brush",), min=1, max=20, step=1, density="compact", hide_details=True)
        with html.Div(classes="d-flex flex-wrap ga-1 my-2"):
            for key, (label, _spec) in LESION_EDITS.items():
                v3.VBtn(label, id=f"edit_{key}", size="small", disabled=("!loaded || busy",),
                        click=(self.edit_lesion, f"['{key}']"))
            v3.VBtn("Undo", id="undo", size="small", disabled=("!loaded || busy",), click=(self.undo, "[true]"))
            v3.VBtn("Redo", id="redo", size="small", disabled=("!loaded || busy",), click=(self.undo, "[false]"))

    def _generate_controls(self):
        v3.VDivider(classes="my-2")
        html.Div("Generate with {{ bundle_name }}", classes="text-subtitle-2")
        with html.Div(classes="d-flex align-center ga-2 mb-2"):
            html.Img(src=("informed_thumb",), v_if="informed_thumb", id="informed_thumb",
                     style="width: 64px; height: 64px; object-fit: contain; background: black;")
            with html.Div():
                html.Div("Informed slice {{ informed_slice }}", id="informed_slice", classes="text-caption")
                v3.VBtn("Use the axial view's slice", id="informed_pick", size="small", click=self.pick_informed,
                        disabled=("!loaded || busy",))
        with html.Div(classes="d-flex flex-wrap align-center ga-1 mb-2"):
            with v3.VBtnToggle(v_model=("informed_source",), mandatory=True, density="compact", divided=True,
                               disabled=("busy",)):
                v3.VBtn("This scan", value="same", id="informed_same", size="small")
                v3.VBtn("Other scan", value="other", id="informed_other", size="small", disabled=("!has_informed",))
                v3.VBtn("Generated", value="generated", id="informed_generated", size="small", v_if="has_slice_model",
                        title="Generated by the bundle's slice model")
            v3.VBtn("Sample other", id="informed_sample", size="small", click=self.load_informed_sample,
                    disabled=("busy",))
        v3.VFileInput(label="Upload other scan", density="compact", id="upload_informed", disabled=("busy",),
                      accept=UPLOAD_ACCEPT, show_size=True, change=UPLOAD_JS % "upload_informed")
        v3.VSelect(label="Sampler (blank: the fast default)", v_model=("sampler",), items=("samplers",),
                   density="compact", id="sampler")
        v3.VTextField(label="Steps (0: the sampler's default)", v_model_number=("steps",), type="number",
                      density="compact", id="steps")
        v3.VTextField(label="Seed", v_model_number=("seed",), type="number", density="compact", id="seed")
        with html.Div(classes="d-flex ga-1"):
            v3.VBtn("Generate", id="generate", click=self.generate, disabled=("!loaded || busy",), color="primary")
            v3.VBtn("Cancel", id="cancel", click=self.cancel, disabled=("!busy",))
            v3.VBtn("Export", id="export", disabled=("!can_export || busy",),
                    click="utils.download('gem3d_synthetic.zip', trigger('export_zip'), 'application/zip')")
        v3.VProgressLinear(model_value=("progress",), height=8, classes="mt-2", id="progress")
        html.Div("{{ windows }} windows, {{ progress }} %", id="windows", classes="text-caption")

    # ------------------------------------------------------------------ helpers
    def _say(self, message: str) -> None:
        self.state.message = message

    def _refresh_case(self) -> None:
        session = self.session
        self.state.loaded = session.reference is not None
        matches = session.matches()
        self.state.segments = [{"id": m.segment_id, "name": m.name} for m in matches]
        self.state.segment_labels = [{"id": m.segment_id, "name": m.name, "label": m.label or 0, "reason": m.reason}
                                     for m in matches]
        if session.segmentation is None:
            self.state.mask_voxels, self.state.lesion_centre = 0, None
            return
        self.state.mask_voxels, self.state.lesion_centre = session.lesion_summary()

    def _watch_segmentation(self) -> None:
        """Paint and erase change the segments without passing through this page: recount after them."""
        segmentation = self.session.segmentation.GetSegmentation()
        for event in (segmentation.SourceRepresentationModified, segmentation.SegmentModified):
            segmentation.AddObserver(event, lambda *_: self._schedule_count())

    def _schedule_count(self) -> None:
        if not self._count_pending:
            self._count_pending = True
            asynchronous.create_task(self._count_later())

    async def _count_later(self):
        await asyncio.sleep(0.3)
        self._count_pending = False
        with self.state:
            if self.session.segmentation is not None:
                self.state.mask_voxels, self.state.lesion_centre = self.session.lesion_summary()

    def _show_case(self) -> None:
        session = self.session
        self._watch_segmentation()
        editor = self.slicer.segmentation_editor
        editor.set_active_segmentation(session.segmentation, session.reference)
        self._show_volumes()
        self.slicer.display_manager.show_volume_in_slice_foreground(None)
        self.slicer.display_manager.reset_views()
        mapped = list(session.mapping()) or [s.segment_id for s in session.logic.segment_infos(session.segmentation)]
        if not mapped:
            mapped = [editor.add_empty_segment(segment_name=session.label_names[min(session.label_names)])]
        self.state.segment = mapped[-1]
        self._on_segment(self.state.segment)
        self._on_effect(self.state.effect)
        self.state.update({"progress": 0, "windows": 0, "can_export": False, "finished": False, "message": ""})
        self._refresh_case()
        self.pick_informed()

    def _informed_scan(self):
        return self.session.informed if self.state.informed_source == "other" else self.session.reference

    def _show_volumes(self) -> None:
        """The latest volume (the synthetic once generated) everywhere, but the reference on the left
        side by side."""
        session, show = self.session, self.slicer.display_manager.show_volume_in_slice_background
        latest = session.output if session.output is not None else session.reference
        show(session.reference if self.state.layout == "side" else latest, 0)
        show(latest, SYNTHETIC_GROUP)

    def _on_layout(self, layout, **_):
        """A view shown for the first time gets its size from the browser after this: it is fitted then."""
        self.layout_manager.set_layout(layout)
        self._unfitted = set(self.slicer.view_manager.get_slice_views())
        if self.session.reference is not None:
            self._show_volumes()
            self.slicer.display_manager.reset_views()

    def _fit_resized(self, view) -> None:
        if view in self._unfitted and self.session.reference is not None:
            self._unfitted.discard(view)
            view.fit_view_to_content()
            view.schedule_render()

    def pick_informed(self):
        """The informed slice is the axial view's current slice of the informed scan; its preview shows which."""
        node = self._informed_scan()
        index = self._informed_index(node)
        self.state.informed_slice, self.state.informed_thumb = index, self.session.slice_thumbnail(node, index)

    def load_informed_sample(self):
        """Another phantom scan as the informed scan (informed source "other")."""
        if self._guard(self.session.load_informed_sample, int(self.state.seed or 0)):
            self._informed_loaded()

    def _informed_loaded(self) -> None:
        self.state.has_informed = True
        self.state.status = "Other scan loaded for the informed slice."
        if self.session.reference is not None:
            self.pick_informed()

    def _guard(self, action, *args) -> bool:
        try:
            action(*args)
            return True
        except (ValueError, RuntimeError, OSError) as e:
            self._say(str(e))
            return False

    # ------------------------------------------------------------------ case
    def load_sample(self):
        if self._guard(self.session.load_sample, int(self.state.seed or 0)):
            self._show_case()
            self.state.status = "Sample phantom loaded."
            log.info("sample case loaded")

    def _data_files(self):
        if self.data_root is None:
            return []
        return sorted(str(p.relative_to(self.data_root)) for p in self.data_root.rglob("*")
                      if p.is_file() and (uploads.is_volume_file(p.name) or uploads.is_segmentation_file(p.name)))

    def load_data_files(self):
        def load():
            if not self.state.data_scan:
                raise ValueError("Choose a scan in the data folder.")
            segmentation = self.state.data_segmentation
            self.session.load_files(access.confined(self.data_root, self.state.data_scan),
                                    access.confined(self.data_root, segmentation) if segmentation else None)

        if self._guard(load):
            self._show_case()
            self.state.status = "Case loaded from the data folder."
            log.info("case loaded from the data folder")

    def _save_upload(self, files, segmentation: bool = True):
        """The uploaded scan (and .seg.nrrd) in a fresh folder of this session: (scan path, segmentation or None)."""
        return uploads.save(files, self.session._fresh_folder("upload"), self.max_upload_bytes, segmentation)

    def upload(self, files):
        def load():
            scan, segmentation = self._save_upload(files)
            try:
                self.session.load_files(scan, segmentation, "uploaded scan")
            except ValueError:
                raise ValueError(UNREADABLE) from None

        with self.state:
            if self._guard(load):
                self._show_case()
                self.state.status = "Uploaded case loaded."
                log.info("uploaded case loaded (%d files)", len(files))

    def upload_informed(self, files):
        """An uploaded scan as the informed scan (informed source "other")."""
        def load():
            scan = self._save_upload(files, segmentation=False)[0]
            try:
                self.session.load_informed(scan)
            except ValueError:
                raise ValueError(UNREADABLE) from None

        with self.state:
            if self._guard(load):
                self._informed_loaded()
                log.info("uploaded informed scan loaded")

    # ------------------------------------------------------------------ segment editor
    def _on_effect(self, effect, **_):
        if self.session.segmentation is None:
            return
        self.slicer.segmentation_editor.set_active_effect_type(EFFECTS.get(effect, SegmentationEffectNoTool))
        self._on_brush(self.state.brush)

    def _on_brush(self, brush, **_):
        active = self.slicer.segmentation_editor.active_effect
        if hasattr(active, "set_brush_diameter"):
            active.set_brush_diameter(float(brush))

    def _on_segment(self, segment, **_):
        if segment and self.session.segmentation is not None:
            self.slicer.segmentation_editor.set_active_segment_id(segment)

    def choose_label(self, segment_id: str, label: int):
        """The table's choice: the segment maps to that label (0: not used) for the mask and Generate."""
        if self._guard(self.session.choose_label, segment_id, label):
            self._refresh_case()

    # ------------------------------------------------------------------ lesion edits
    def edit_lesion(self, key: str):
        if self._guard(lambda: self._warn(self.session.edit(LESION_EDITS[key][1]))):
            self._refresh_case()

    def undo(self, undo: bool = True):
        def step():
            if not self.session.undo(bool(undo)):
                raise ValueError("Nothing to undo." if undo else "Nothing to redo.")

        if self._guard(step):
            self._refresh_case()

    def _warn(self, messages) -> None:
        self._say(" ".join(messages))

    # ------------------------------------------------------------------ generate
    def generate(self):
        if self.session.reference is None:
            self._say("Load a scan and its segmentation first (Sample, Upload or the data folder).")
            return
        def start():
            self.session.generate(self.state.sampler or None, int(self.state.steps or 0) or None,
                                  int(self.state.seed or 0), int(self.state.informed_slice),
                                  self.state.informed_source)

        if not self._guard(start):
            return
        self._show_volumes()
        self.state.update({"busy": True, "progress": 0, "windows": 0, "can_export": False, "finished": False,
                           "message": "", "status": "Starting the GEM-3D engine..."})
        log.info("generation started")
        self._cancelling = False
        self._poller = asynchronous.create_task(self._poll())

    def _informed_index(self, node) -> int:
        """The axial slice of `node` at the axial view's position (the informed slice)."""
        import numpy as np

        from GEM3DEditorLib import nodes

        ras_to_ijk = np.linalg.inv(nodes.ijk_to_ras(node))
        red = self.slicer.scene.GetNodeByID("vtkMRMLSliceNodeRed")
        centre = [red.GetSliceToRAS().GetElement(i, 3) for i in range(3)] + [1.0]
        k = int(round((ras_to_ijk @ np.asarray(centre))[2]))
        depth = node.GetImageData().GetDimensions()[2]
        return min(max(k, 0), depth - 1)

    async def _poll(self):
        while True:
            await asyncio.sleep(0.1)
            with self.state:
                try:
                    self.session.poll()
                except (ValueError, RuntimeError, OSError) as e:
                    self._say(str(e))
                job = self.session.logic.job
                if job is None:
                    self.state.busy = False
                    return
                if not (self._cancelling and not job.done):
                    self.state.status = job.status
                self.state.progress = round(100.0 * job.progress)
                self.state.windows = job.windows
                for view in self.slicer.view_manager.get_views():
                    view.schedule_render()
                if job.done:
                    self.state.busy = False
                    self.state.finished = bool(job.outputs)
                    self.state.can_export = self.session.logic.exportable(self.session.output) is not None
                    if job.error:
                        self._say(job.error)
                    log.info("generation ended: %s", job.status)
                    return

    def cancel(self):
        self._cancelling = self.session.logic.busy
        self.session.cancel()
        self.state.status = "Cancelling..."

    # ------------------------------------------------------------------ export
    def export_zip(self):
        try:
            content = self.session.export_zip()
        except (ValueError, OSError) as e:
            with self.state:
                self._say(str(e))
            return None
        log.info("export downloaded (%d bytes)", len(content))
        return self.server.protocol.addAttachment(content)
