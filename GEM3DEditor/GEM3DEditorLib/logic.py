"""The module's logic on MRML: segments -> mask, mask edits and undo, a generation streamed into an
output node, a batch run, export. Imports only slicer (MRML + util), vtk and this package, so it
runs under the slicer-core wheel; the Widget wires the panel to it.

The scene and the volumes logic are given (slicer.mrmlScene and slicer.modules.volumes.logic() in
Slicer); the engine sits behind engine.LocalEngine's interface (submit, poll, log_lines, cancel, close).
"""
import json
import logging
import os
from typing import Callable, Dict, List, Optional

import numpy as np
import slicer
import vtk  # noqa: F401  (the MRML nodes' vtk types)

from gem3d.bundle_format import read_bundle_info
from gem3d.request import GenerateRequest, InformedSpec, RequestError, new_job_id
from gem3d.threads import ENV as THREADS_ENV

from . import batch, edits, export, geometry, label_matching, nodes, output, process
from .engine import LocalEngine, RemoteEngine
from .job import JobKind, JobState, reduce
from .mask_history import MaskHistory
from .settings import BatchSettings, EngineSettings, GenerateSettings
from .worker_client import environment_with_path, python_executable_default


def is_scalar_volume(node) -> bool:
    """A scalar volume that is not a labelmap (GetFirstNodeByClass("vtkMRMLScalarVolumeNode") can pick one)."""
    return node is not None and node.IsA("vtkMRMLScalarVolumeNode") and not node.IsA("vtkMRMLLabelMapVolumeNode")


def first_scalar_volume(scene):
    for index in range(scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode")):
        node = scene.GetNthNodeByClass(index, "vtkMRMLScalarVolumeNode")
        if is_scalar_volume(node):
            return node
    return None


class EditorLogic:
    """Owns the one generation and the one batch run that may be going on, and the mask history."""

    def __init__(self, scene, volumes_logic, work_folder: str, gem3d_root: Optional[str] = None,
                 engine_factory: Optional[Callable[[EngineSettings], object]] = None):
        self.scene = scene
        self.volumes_logic = volumes_logic
        self.work_folder = work_folder
        self.gem3d_root = gem3d_root
        self.engine_factory = engine_factory or self._new_engine
        self.engine = None
        self._engine_key = None
        self.history = MaskHistory()
        self.job: Optional[JobState] = None
        self.batch: Optional[JobState] = None
        self._batch_runner = None
        self._stream: Optional[output.OutputStream] = None
        self._job_record: dict = {}
        self.last_output_node = None
        self._reported: set = set()

    def take_errors(self) -> List[str]:
        """The error messages of jobs that ended with one, each returned once (to show a dialog)."""
        errors = []
        for state in (self.job, self.batch):
            if state is not None and state.error and (state.job_id, state.error) not in self._reported:
                self._reported.add((state.job_id, state.error))
                errors.append(state.error)
        return errors

    # ------------------------------------------------------------------ engine
    @staticmethod
    def engine_python(engine_python: str = "") -> str:
        return engine_python.strip() or python_executable_default()

    def engine_environment(self, engine_python: str = "", threads: int = 0) -> Dict[str, str]:
        """PythonSlicer runs in Slicer's environment; another Python in the one Slicer was started from.
        Both find the gem3d package shipped with the module first, and get the panel's thread count."""
        base = slicer.util.startupEnvironment() if engine_python.strip() else None
        env = environment_with_path(base, [self.gem3d_root] if self.gem3d_root else [])
        if threads:
            env[THREADS_ENV] = str(int(threads))
        return env

    def _new_engine(self, settings: EngineSettings):
        if settings.server_url:
            return RemoteEngine(settings.server_url, settings.server_token)
        return LocalEngine(self.engine_python(settings.engine_python),
                           self.engine_environment(settings.engine_python, settings.threads), cwd=self.work_folder)

    def _engine_for(self, settings: EngineSettings):
        """The engine these settings ask for, kept between jobs (its models stay loaded)."""
        if self.engine is None or self._engine_key != settings.engine_key:
            if self.engine is not None:
                self.engine.close()
            self.engine = self.engine_factory(settings)
            self._engine_key = settings.engine_key
        return self.engine

    @property
    def busy(self) -> bool:
        return self.job is not None and not self.job.done

    @property
    def batch_busy(self) -> bool:
        return self.batch is not None and not self.batch.done

    # ------------------------------------------------------------------ segments
    @staticmethod
    def segment_infos(segmentation_node) -> List[label_matching.SegmentInfo]:
        segmentation = segmentation_node.GetSegmentation()
        infos = []
        for index in range(segmentation.GetNumberOfSegments()):
            segment_id = segmentation.GetNthSegmentID(index)
            segment = segmentation.GetSegment(segment_id)
            terminology = vtk.mutable("")
            segment.GetTag("TerminologyEntry", terminology)
            infos.append(label_matching.SegmentInfo(segment_id, segment.GetName() or segment_id, terminology.get(),
                                                    int(segment.GetLabelValue())))
        return infos

    @staticmethod
    def compose_mask(segmentation_node, reference_node, mapping: Dict[str, int]) -> np.ndarray:
        """Label array on the reference's grid from the mapped segments (read through parent transforms)."""
        shape = slicer.util.arrayFromVolume(reference_node).shape
        parts = [(nodes.segment_array(segmentation_node, segment_id, reference_node), label)
                 for segment_id, label in mapping.items() if label]
        return label_matching.compose_label_mask(shape, parts)

    def edit_segments(self, segmentation_node, segment_ids: List[str], reference_node, specs: List[dict],
                      seed: Optional[int] = None):
        """Apply mask edits to segments (moved as one lesion) on the reference's grid; recorded for undo.
        Returns (applied specs, warnings)."""
        arrays = {s: nodes.segment_array(segmentation_node, s, reference_node) for s in segment_ids}
        lps = geometry.geometry_from_ijk_to_ras(nodes.ijk_to_ras(reference_node))
        edited, applied, messages = edits.apply_to_segments(arrays, lps, specs, seed)
        names = [segmentation_node.GetSegmentation().GetSegment(s).GetName() for s in segment_ids]
        self.history.record(arrays, {"edits": applied, "segments": names})
        nodes.set_segment_arrays(edited, segmentation_node, reference_node)
        return applied, messages

    def undo_redo(self, segmentation_node, reference_node, undo: bool) -> Optional[dict]:
        def current(segment_id):
            return nodes.segment_array(segmentation_node, segment_id, reference_node)

        result = self.history.undo(current) if undo else self.history.redo(current)
        if result is None:
            return None
        arrays, spec = result
        nodes.set_segment_arrays(arrays, segmentation_node, reference_node)
        return spec

    # ------------------------------------------------------------------ generate
    def start_generation(self, settings: GenerateSettings, reference_node, segmentation_node,
                         mapping: Dict[str, int], informed_node=None, output_node=None):
        """Write the inputs, send the request and prepare the output node; returns the output node.
        Call process_events() (a QTimer does) until the job is done."""
        if self.busy:
            raise RuntimeError("A generation is already running.")
        if not is_scalar_volume(reference_node) or segmentation_node is None:
            raise ValueError("Select a reference scan (a scalar volume, not a labelmap) and a segmentation.")
        if settings.informed_source == "other" and not is_scalar_volume(informed_node):
            raise ValueError("Select the scan that provides the informed slice.")
        if output_node is not None and output_node in (reference_node, informed_node):
            raise ValueError("The output volume must not be an input scan: choose another output volume.")
        info = read_bundle_info(settings.bundle)
        mask = self.compose_mask(segmentation_node, reference_node, mapping)
        if not mask.any():
            raise ValueError("No segment is mapped to a model label, or the mapped segments are empty: "
                             "the mask would be empty.")
        job_id = new_job_id()
        paths = job_paths(self.work_folder, job_id)
        os.makedirs(paths["folder"])
        nodes.write_volume(reference_node, paths["reference"])
        self._write_mask(mask, reference_node, paths["mask"])
        scan, index, position = None, int(settings.informed_slice), None
        if settings.informed_source == "other":
            scan = nodes.write_volume(informed_node, paths["informed"])
        elif settings.informed_source == "generated":
            shape = slicer.util.arrayFromVolume(reference_node).shape
            position = float(geometry.axial_axis(nodes.ijk_to_ras(reference_node), shape).position(index))
            index = None  # the slice model generates the slice at that height
        engine = settings.engine
        try:
            informed = InformedSpec(settings.informed_source, scan=scan, slice=index, position=position)
            req = GenerateRequest(paths["reference"], paths["mask"], paths["out"], bundle=settings.bundle,
                                  job_id=job_id, informed=informed, start=settings.start, sampler=engine.sampler,
                                  steps=engine.steps, seed=engine.seed, device=engine.device).with_absolute_paths()
            problems = req.path_problems()
            if problems:
                raise RequestError("; ".join(problems))
        except RequestError as e:
            raise ValueError(f"The generation cannot start: {e}.") from e
        req = req.to_message()
        output_node = output.prepare_output_node(reference_node, output_node)
        self._stream = output.OutputStream(output_node, info.modality)
        self._engine_for(engine).submit(req)
        self.job = JobState(job_id, JobKind.GENERATE, status="Starting the GEM-3D engine...")
        self._job_record = {"request": req, "paths": paths, "mapping": dict(mapping), "modality": info.modality,
                            "mask_edits": self.history.applied_specs(), "segmentation": segmentation_node.GetName(),
                            "reference_file": _stored_file(reference_node)}
        self.last_output_node = output_node
        return output_node

    def _write_mask(self, mask: np.ndarray, reference_node, path: str) -> None:
        labelmap = self.scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__gem3d_mask__")
        try:
            labelmap.CopyOrientation(reference_node)
            labelmap.SetAndObserveImageData(nodes.image_data_from_array(mask))
            nodes.write_volume(labelmap, path)
        finally:
            self.scene.RemoveNode(labelmap)

    def process_events(self) -> List[dict]:
        """Apply the engine's and the batch run's events; returns the generation's events."""
        if self._batch_runner is not None and self.batch is not None:
            for event in self._batch_runner.poll():
                self.batch = reduce(self.batch, event)
        if self.engine is None:
            return []
        for line in self.engine.log_lines():
            logging.info("gem3d: " + line)
        events = self.engine.poll()
        for event in events:
            if self.job is None or self.job.done or event.get("job_id") not in (self.job.job_id, None):
                continue
            try:
                if event["event"] == "started":
                    self._stream.started(event)
                elif event["event"] == "window":
                    self._stream.window(event)
                elif event["event"] == "finished":
                    self._finish(event)
            except ValueError as e:  # a grid mismatch or a deleted node: stop rather than write wrong voxels
                self.engine.cancel(self.job.job_id)
                event = {"event": "error", "job_id": self.job.job_id, "message": str(e)}
            self.job = reduce(self.job, event)
        return events

    def _finish(self, event: dict) -> None:
        """The output file is the result: the node gets its voxels (the streamed windows were a preview)
        and the attributes that Export and the provenance need."""
        node, outputs, record = self._stream.node, event.get("outputs") or {}, self._job_record
        if not self._stream.sink.complete:
            logging.warning(f"GEM-3D job {self.job.job_id}: only {self._stream.sink.filled_fraction:.0%} of the "
                            "slices arrived as windows")
        if os.path.isfile(outputs.get("image", "")):
            from gem3d.io import read_volume

            self._stream.replace(np.asarray(read_volume(outputs["image"]).array, np.float32))
        node.SetAttribute("GEM3D.Image", outputs.get("image", record["paths"]["out"]))
        node.SetAttribute("GEM3D.Mask", record["paths"]["mask"])
        node.SetAttribute("GEM3D.Provenance", outputs.get("provenance", ""))
        node.SetAttribute("GEM3D.ReferenceFile", record["reference_file"])
        node.SetAttribute("GEM3D.Modality", record["modality"])
        node.SetAttribute("GEM3D.Slicer", json.dumps({
            "segmentation": record["segmentation"], "label_mapping": record["mapping"],
            "mask_edits_in_slicer": record["mask_edits"], "request": record["request"]}))

    def cancel(self) -> None:
        if self.busy:
            self.engine.cancel(self.job.job_id)

    # ------------------------------------------------------------------ batch
    def start_batch(self, settings: BatchSettings) -> None:
        if self.batch_busy:
            raise RuntimeError("A batch run is already going on.")
        engine = settings.engine
        command = batch.batch_command(
            self.engine_python(engine.engine_python), settings.mode, settings.dataset, settings.out,
            bundle=settings.bundle, times=settings.times, augment=settings.augment,
            informed_scan=settings.informed_scan, informed_position=settings.informed_position,
            sampler=engine.sampler, steps=engine.steps, seed=engine.seed, device=engine.device)
        logging.info("GEM-3D batch: " + " ".join(command))
        env = self.engine_environment(engine.engine_python, engine.threads)
        self._batch_runner = process.CommandRunner(command, env=env, what=f"gem3d {settings.mode}").start()
        self.batch = JobState("batch", JobKind.BATCH, status="Starting...")

    def cancel_batch(self) -> None:
        if self._batch_runner is not None:
            self._batch_runner.cancel()  # a batch run resumes where it stopped

    # ------------------------------------------------------------------ lifetime
    def abandon(self) -> None:
        """The scene is closing: cancel, and never touch the output node again."""
        self.cancel()
        if self.job is not None:
            self.job = reduce(self.job, {"event": "cancelled", "job_id": self.job.job_id})
        self._stream = None
        self.last_output_node = None
        self.history.clear()

    def shutdown(self) -> None:
        self.abandon()
        self.cancel_batch()
        if self.engine is not None:
            self.engine.close()
            self.engine = None

    # ------------------------------------------------------------------ export
    def exportable(self, selected=None):
        """The volume Export writes: the selected output volume if it was generated here, else the last one."""
        for node in (selected, self.last_output_node):
            if node is not None and self.scene.IsNodePresent(node) and node.GetAttribute("GEM3D.Image"):
                return node
        return None

    def export_case(self, output_node, folder: str, image_format: str = "nii.gz", dicom: bool = False,
                    patient_name: str = export.DEFAULT_PATIENT_NAME) -> Dict[str, Optional[str]]:
        """Write the engine's output for this node (volume, segmentation, provenance, optionally DICOM)."""
        if output_node is None or not output_node.GetAttribute("GEM3D.Image"):
            raise ValueError("Generate a volume first: only volumes generated here can be exported.")
        from gem3d.io import read_volume

        image = read_volume(output_node.GetAttribute("GEM3D.Image"))
        mask = read_volume(output_node.GetAttribute("GEM3D.Mask"))
        provenance = {}
        provenance_path = output_node.GetAttribute("GEM3D.Provenance")
        if provenance_path and os.path.isfile(provenance_path):
            with open(provenance_path, encoding="utf-8") as f:
                provenance = json.load(f)
        provenance["slicer"] = json.loads(output_node.GetAttribute("GEM3D.Slicer") or "{}")
        req = provenance["slicer"].get("request") or {}
        label_names = {}
        if req.get("bundle"):
            try:
                label_names = read_bundle_info(req["bundle"]).label_map.names
            except ValueError:
                pass
        protected = [req.get("reference"), req.get("mask"), output_node.GetAttribute("GEM3D.ReferenceFile")]
        return export.export_case(
            image, folder, name=export.safe_name(output_node.GetName()), mask=mask, provenance=provenance,
            image_format=image_format, label_names=label_names, dicom=dicom, patient_name=patient_name,
            modality=export.dicom_modality(output_node.GetAttribute("GEM3D.Modality") or ""),
            description=f"GEM-3D {output_node.GetName()}", protected=[p for p in protected if p])


def job_paths(work_dir: str, job_id: str) -> Dict[str, str]:
    """Where a job's inputs are written (uncompressed NRRD, which Slicer writes in LPS) and its output goes."""
    folder = os.path.abspath(os.path.join(work_dir, job_id))
    return {"folder": folder, "reference": os.path.join(folder, "reference.nrrd"),
            "mask": os.path.join(folder, "mask.nrrd"), "informed": os.path.join(folder, "informed.nrrd"),
            "out": os.path.join(folder, "synthetic.nii.gz")}


def _stored_file(node) -> str:
    storage = node.GetStorageNode()
    return (storage.GetFileName() or "") if storage is not None else ""
