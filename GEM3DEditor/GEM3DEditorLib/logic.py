"""The module's logic on MRML: segments -> mask, mask edits and undo, a generation streamed into an
output node, a batch run, export. Imports only slicer (MRML + util), vtk and this package, so it
runs under the slicer-core wheel; the Widget wires the panel to it.

The scene and the volumes logic are given (slicer.mrmlScene and slicer.modules.volumes.logic() in
Slicer); the engine is any `gem3d.events.EngineClient` (the stdio worker's, or a `gem3d serve` server's).
"""
import json
import logging
import os
import shutil
from typing import Callable, Dict, List, Optional

import numpy as np
import slicer
import vtk  # noqa: F401  (the MRML nodes' vtk types)

from gem3d.bundle_format import read_bundle_info
from gem3d.events import EngineClient
from gem3d.remote import RemoteClient, server_url_parts
from gem3d.request import GenerateRequest, InformedSpec, RequestError, new_job_id
from gem3d.threads import ENV as THREADS_ENV
from gem3d.worker_client import WorkerClient, environment_with_path, python_executable_default, worker_command

from . import batch, edits, export, geometry, label_matching, nodes, output, process
from .job import EventKind, JobKind, JobState, event_kind, reduce
from .mask_history import MaskHistory
from .settings import BatchSettings, EngineSettings, GenerateSettings


def is_scalar_volume(node) -> bool:
    """A scalar volume that is not a labelmap (GetFirstNodeByClass("vtkMRMLScalarVolumeNode") can pick one)
    nor a vector (RGB) volume, whose class derives from it too."""
    return node is not None and node.IsA("vtkMRMLScalarVolumeNode") and not node.IsA("vtkMRMLLabelMapVolumeNode") \
        and not node.IsA("vtkMRMLVectorVolumeNode") and _components(node) == 1


def _components(node) -> int:
    image = node.GetImageData()
    return image.GetNumberOfScalarComponents() if image is not None else 1


def scan_problem(node, role: str) -> Optional[str]:
    """Why a node cannot be the scan in this role, as one sentence, or None."""
    if node is None:
        return f"Select the {role}."
    if is_scalar_volume(node):
        return None
    if node.IsA("vtkMRMLLabelMapVolumeNode"):
        return f"{node.GetName()} is a labelmap: select a scan (a scalar volume) as the {role}."
    if node.IsA("vtkMRMLScalarVolumeNode"):
        return (f"{node.GetName()} has {_components(node)} components per voxel (a vector or RGB volume): "
                f"select a greyscale scan as the {role}, or convert it with Vector to Scalar Volume.")
    return f"{node.GetName()} is not a volume: select a scan as the {role}."


def first_scalar_volume(scene):
    for index in range(scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode")):
        node = scene.GetNthNodeByClass(index, "vtkMRMLScalarVolumeNode")
        if is_scalar_volume(node):
            return node
    return None


class EditorLogic:
    """Owns the one generation and the one batch run that may be going on, and the mask history."""

    def __init__(self, scene, volumes_logic, work_folder: str, gem3d_root: Optional[str] = None,
                 client_factory: Optional[Callable[[EngineSettings], EngineClient]] = None,
                 startup_environment: Optional[Dict[str, str]] = None):
        """startup_environment: the environment Slicer was started from (slicer.util.startupEnvironment(),
        which needs the application object: the Widget passes it); None: this process's own."""
        self.scene = scene
        self.startup_environment = startup_environment
        self.volumes_logic = volumes_logic
        self.work_folder = work_folder
        self.gem3d_root = gem3d_root
        self.client_factory = client_factory or self._new_client
        self.client: Optional[EngineClient] = None
        self._client_key = None
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
        base = self.startup_environment if engine_python.strip() else None
        env = environment_with_path(base, [self.gem3d_root] if self.gem3d_root else [])
        if threads:
            env[THREADS_ENV] = str(int(threads))
        return env

    def _new_client(self, settings: EngineSettings) -> EngineClient:
        """`gem3d serve` at the settings' URL, else `<python> -m gem3d worker` (started here)."""
        if settings.server_url:
            return RemoteClient(settings.server_url, settings.server_token or None)
        return WorkerClient(worker_command(self.engine_python(settings.engine_python)),
                            env=self.engine_environment(settings.engine_python, settings.threads),
                            cwd=self.work_folder).start()

    def _client_for(self, settings: EngineSettings) -> EngineClient:
        """The engine these settings ask for, kept between jobs (its models stay loaded); a worker
        that has exited is started again."""
        if (self.client is None or self._client_key != settings.engine_key
                or not self.client.running):
            if self.client is not None:
                self.client.close()
            self.client = self.client_factory(settings)
            self._client_key = settings.engine_key
        return self.client

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
        Returns (applied specs, warnings). A segment that reaches outside the reference's field of view is
        refused: moving its part inside would cut it in two."""
        for segment_id in segment_ids:
            outside = nodes.voxels_outside(segmentation_node, segment_id, reference_node)
            if outside:
                name = segmentation_node.GetSegmentation().GetSegment(segment_id).GetName()
                raise ValueError(f"Segment {name!r} reaches outside {reference_node.GetName()} ({outside} voxels): "
                                 "an edit on this reference would cut it. Choose the scan it was drawn on as the "
                                 "reference, or erase its part outside this one first.")
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
        """Check everything that can be checked from the scene and bundle.json, then write the inputs,
        send the request and prepare the output node; returns the output node. Nothing is made or
        closed (job folder, output node, previous engine) before every check has passed.
        Call process_events() (a QTimer does) until the job is done."""
        info, mask, axial = self._check_generation(settings, reference_node, segmentation_node, mapping,
                                                   informed_node, output_node)
        job_id = new_job_id()
        paths = job_paths(self.work_folder, job_id)
        os.makedirs(paths["folder"])
        try:
            req = self._write_request(settings, job_id, paths, reference_node, mask, informed_node, axial)
            engine = settings.engine
            self._client_for(engine).submit(req)
        except Exception:
            shutil.rmtree(paths["folder"], ignore_errors=True)
            raise
        made = output_node is None
        output_node = output.prepare_output_node(reference_node, output_node)
        self._stream = output.OutputStream(output_node, info.modality)
        self.job = JobState(job_id, JobKind.GENERATE, status="Starting the GEM-3D engine...")
        self._job_record = {"request": req, "paths": paths, "mapping": dict(mapping), "modality": info.modality,
                            "mask_edits": self.history.applied_specs(), "segmentation": segmentation_node.GetName(),
                            "reference_file": _stored_file(reference_node), "made_output": made,
                            "keep_partial": settings.keep_partial}
        self.last_output_node = output_node
        return output_node

    def _check_generation(self, settings: GenerateSettings, reference_node, segmentation_node, mapping,
                          informed_node, output_node):
        """(bundle info, mask, axial axis) or ValueError/RuntimeError with one sentence; makes and changes nothing."""
        if self.busy:
            raise RuntimeError("A generation is already running.")
        problem = scan_problem(reference_node, "reference scan") or \
            (None if segmentation_node is not None else "Select a segmentation.")
        if problem is None and settings.informed_source == "other":
            problem = scan_problem(informed_node, "scan that provides the informed slice")
        if problem:
            raise ValueError(problem)
        if output_node is not None and output_node in (reference_node, informed_node):
            raise ValueError("The output volume must not be an input scan: choose another output volume.")
        if output_node is not None and not is_scalar_volume(output_node):
            raise ValueError(f"{output_node.GetName()} is not a scalar volume: choose another output volume.")
        url = settings.engine.server_url
        if url:
            try:
                server_url_parts(url)
            except ValueError:
                raise ValueError(f"The server URL {url!r} must start with http:// or https:// and name a host "
                                 "(for example http://gpu-host:8000): correct it in the engine settings.") from None
        try:
            info = read_bundle_info(settings.bundle)
        except (OSError, ValueError) as e:
            raise ValueError(f"The model bundle {settings.bundle} cannot be read: {e}.") from e
        shape = slicer.util.arrayFromVolume(reference_node).shape
        axial = geometry.axial_axis(nodes.ijk_to_ras(reference_node), shape)
        if axial.n_slices < info.window_length:
            raise ValueError(f"{reference_node.GetName()} has {axial.n_slices} axial slices, fewer than the "
                             f"model's window length {info.window_length}: choose a scan with at least "
                             f"{info.window_length} slices.")
        if settings.informed_source != "other" and not 0 <= int(settings.informed_slice) < axial.n_slices:
            raise ValueError(f"The informed slice {settings.informed_slice} is outside {reference_node.GetName()}'s "
                             f"{axial.n_slices} slices (0..{axial.n_slices - 1}).")
        if settings.informed_source == "generated" and not info.has_slice_model:
            raise ValueError(f"The bundle {info.name} has no slice model, so it cannot generate the informed "
                             "slice: choose the reference or another scan as the informed source.")
        unknown = sorted({label for label in mapping.values() if label and label not in info.label_map.names})
        if unknown:
            raise ValueError(f"Labels {unknown} are not in the bundle's label map {info.label_map}: map the "
                             "segments again.")
        mask = self.compose_mask(segmentation_node, reference_node, mapping)
        if not mask.any():
            raise ValueError("No segment is mapped to a model label, or the mapped segments are empty: "
                             "the mask would be empty.")
        return info, mask, axial

    def _write_request(self, settings: GenerateSettings, job_id: str, paths: Dict[str, str], reference_node,
                       mask: np.ndarray, informed_node, axial) -> dict:
        """The job's input files and its request message."""
        nodes.write_volume(reference_node, paths["reference"])
        self._write_mask(mask, reference_node, paths["mask"])
        scan, index, position = None, int(settings.informed_slice), None
        if settings.informed_source == "other":
            scan = nodes.write_volume(informed_node, paths["informed"])
        elif settings.informed_source == "generated":
            position = float(axial.position(index))
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
        return req.to_message()

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
        if self.client is None:
            return []
        for line in self.client.log_lines():
            logging.info("gem3d: " + line)
        events = self.client.poll()
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
                self.client.cancel(self.job.job_id)
                event = {"event": "error", "job_id": self.job.job_id, "message": str(e)}
            self.job = reduce(self.job, event)
            if event_kind(event) in (EventKind.CANCELLED, EventKind.ERROR):
                self._discard_unfinished()
        return events

    def _discard_unfinished(self) -> None:
        """A failed or cancelled job leaves no zero-filled node: an output node made for it is removed, unless
        the user asked to keep partial results (then it is renamed so). A node the user chose is left as is."""
        node, record = self._stream.node if self._stream else None, self._job_record
        self._stream = None
        if node is None or not record.get("made_output") or not self.scene.IsNodePresent(node):
            return
        if record.get("keep_partial"):
            node.SetName(self.scene.GenerateUniqueName(node.GetName() + " (partial)"))
            return
        if self.last_output_node is node:
            self.last_output_node = None
        for index in reversed(range(node.GetNumberOfDisplayNodes())):
            self.scene.RemoveNode(node.GetNthDisplayNode(index))
        self.scene.RemoveNode(node)

    def _finish(self, event: dict) -> None:
        """The stream's result (the volume `finished` carries, as written to the output file) replaces
        the streamed windows; the node gets the attributes that Export and the provenance need."""
        node, outputs, record = self._stream.node, event.get("outputs") or {}, self._job_record
        if not self._stream.sink.complete:
            logging.warning(f"GEM-3D job {self.job.job_id}: only {self._stream.sink.filled_fraction:.0%} of the "
                            "slices arrived as windows")
        if event.get("slab") is not None:
            self._stream.replace(np.asarray(event["slab"], np.float32))
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
            self.client.cancel(self.job.job_id)

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
        if self.client is not None:
            self.client.close()
            self.client = None

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
