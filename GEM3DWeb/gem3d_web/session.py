"""One browser session's GEM-3D case on its MRML scene: the scan and segmentation it edits, the
lesion edits with undo, one generation streamed into an output node, and the export zip.

Everything goes through the module's EditorLogic (via .engine); nothing here draws a page.
"""
from __future__ import annotations

import dataclasses
import io
import os
import zipfile
from typing import Dict, List, Optional, Tuple

import numpy as np

from GEM3DEditorLib import label_matching, nodes

from . import engine


def slicer_array(node) -> np.ndarray:
    import slicer

    return slicer.util.arrayFromVolume(node)


class Session:
    """The case of one browser session: reference scan, segmentation, last output."""

    def __init__(self, scene, volumes_logic, work_folder: str, bundle: str, remote: Tuple[str, str] = ("", "")):
        engine.register_segmentation_converters()
        self.scene = scene
        self.volumes_logic = volumes_logic
        self.work_folder = work_folder
        self.bundle = bundle
        self.remote = remote  # (gem3d serve URL, token); ("", ""): a local worker
        self.label_names, self.has_slice_model = engine.bundle_labels(bundle)
        self.logic = engine.new_logic(scene, volumes_logic, os.path.join(work_folder, "jobs"))
        os.makedirs(self.logic.work_folder, exist_ok=True)
        self.reference = None
        self.segmentation = None
        self.output = None
        self.informed = None  # another scan that provides the informed slice (informed source "other")
        self.chosen: Dict[str, int] = {}  # segment ID -> label chosen in the page's table (0: not used)

    # ------------------------------------------------------------------ loading
    def _phantom(self, seed: int, index: int):
        """A phantom brain case made here (gem3d.phantom): (scan file, label volume, its folder)."""
        from gem3d import phantom
        from gem3d.io import write_volume

        image, labels, _truth = phantom.make_case("brain", seed=int(seed), index=index, size=64, slices=16)
        folder = self._fresh_folder("sample")
        scan = os.path.join(folder, "scan.nrrd")
        write_volume(image, scan)
        return scan, labels, folder

    def load_sample(self, seed: int = 0):
        """A phantom case, its segments named with the bundle's labels."""
        from gem3d.io import write_segmentation

        scan, labels, folder = self._phantom(seed, 0)
        segmentation = os.path.join(folder, "lesion.seg.nrrd")
        values = sorted(int(v) for v in np.unique(labels.array) if v > 0)
        write_segmentation(labels, segmentation,
                           [{"name": self.label_names.get(v, f"label {v}"), "label_value": v} for v in values])
        return self.load_files(scan, segmentation, "sample scan")

    def load_files(self, scan: str, segmentation: Optional[str], name: str = "scan"):
        """Replace the case with a scan and (optionally) its segmentation; on a bad file the old case stays."""
        reference = nodes.load_volume(self.volumes_logic, scan, name)
        try:
            seg = nodes.load_segmentation(self.scene, segmentation, "lesion") if segmentation else None
        except ValueError:
            self.scene.RemoveNode(reference)
            raise
        if seg is None:
            seg = self.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "lesion")
            seg.CreateDefaultDisplayNodes()
        seg.SetReferenceImageGeometryParameterFromVolumeNode(reference)
        self.clear()
        self.reference, self.segmentation = reference, seg
        return reference, seg

    def load_informed_sample(self, seed: int = 0):
        """Another phantom scan (the next seed, same grid) as the scan that provides the informed slice."""
        return self.load_informed(self._phantom(int(seed) + 1, 1)[0])

    def load_informed(self, scan: str):
        """A scan that provides the informed slice (informed source "other"); on a bad file the old one stays."""
        informed = nodes.load_volume(self.volumes_logic, scan, "informed scan")
        if self.informed is not None and self.scene.IsNodePresent(self.informed):
            self.scene.RemoveNode(self.informed)
        self.informed = informed
        return informed

    def clear(self) -> None:
        """Remove this session's nodes (a new case replaces the old one)."""
        self.logic.abandon()
        for node in (self.output, self.segmentation, self.reference):
            if node is not None and self.scene.IsNodePresent(node):
                self.scene.RemoveNode(node)
        self.reference = self.segmentation = self.output = None
        self.chosen = {}

    def _fresh_folder(self, stem: str) -> str:
        index = 0
        while os.path.exists(os.path.join(self.work_folder, f"{stem}{index}")):
            index += 1
        folder = os.path.join(self.work_folder, f"{stem}{index}")
        os.makedirs(folder)
        return folder

    # ------------------------------------------------------------------ segments
    def matches(self) -> List[label_matching.Match]:
        """Each segment with its label: the one chosen in the page, else the module's matching rules
        (label None: not used)."""
        if self.segmentation is None:
            return []
        matches, _unmatched = label_matching.match_segments(self.logic.segment_infos(self.segmentation),
                                                            self.label_names)
        return [dataclasses.replace(m, label=self.chosen[m.segment_id] or None, reason="chosen")
                if m.segment_id in self.chosen else m for m in matches]

    def choose_label(self, segment_id: str, label: int) -> None:
        if label and int(label) not in self.label_names:
            raise ValueError(f"Label {label} is not in the bundle's label map: choose one of the listed labels.")
        self.chosen[segment_id] = int(label or 0)

    def mapping(self) -> Dict[str, int]:
        """Segment ID -> bundle label, for the mask the model sees."""
        return {m.segment_id: m.label for m in self.matches() if m.label}

    def mask(self) -> np.ndarray:
        return self.logic.compose_mask(self.segmentation, self.reference, self.mapping())

    def lesion_summary(self) -> Tuple[int, Optional[List[float]]]:
        """(mapped voxels, RAS centre in mm or None) of the lesion the model will see."""
        mask = self.mask()
        k, j, i = np.nonzero(mask)
        if not len(k):
            return 0, None
        ijk = np.stack([i, j, k, np.ones_like(i)]).astype(float)
        return int(len(k)), [round(float(v), 1) for v in (nodes.ijk_to_ras(self.reference) @ ijk)[:3].mean(axis=1)]

    def slice_thumbnail(self, node, index: int, max_size: int = 96) -> str:
        """Axial slice `index` of a scan as the views show it, a PNG data URL (the informed slice's preview)."""
        import base64

        from PIL import Image
        from GEM3DEditorLib import thumbnail

        image = thumbnail.display_slice(slicer_array(node), nodes.ijk_to_ras(node), 0, index)
        buffer = io.BytesIO()
        Image.fromarray(thumbnail.resize_nearest(thumbnail.to_uint8(image), max_size)).save(buffer, "PNG")
        return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()

    def edit(self, spec: dict) -> List[str]:
        """Edit the mapped segments as one lesion (move, flip, rotate, scale); returns warnings (voxels pushed
        outside)."""
        self._need_case()
        ids = list(self.mapping())
        if not ids:
            raise ValueError("No segment is mapped to a model label: there is no lesion to move.")
        _applied, messages = self.logic.edit_segments(self.segmentation, ids, self.reference, [spec])
        return messages

    def undo(self, undo: bool = True) -> bool:
        self._need_case()
        return self.logic.undo_redo(self.segmentation, self.reference, undo) is not None

    def _need_case(self) -> None:
        if self.reference is None or self.segmentation is None:
            raise ValueError("Load a scan and its segmentation first (Sample, Upload or the data folder).")

    # ------------------------------------------------------------------ generate
    def generate(self, sampler: Optional[str], steps: Optional[int], seed: int, informed_slice: int,
                 informed_source: str = "same"):
        """informed_source "same": the slice of the reference; "other": of the informed scan;
        "generated": the bundle's slice model makes the slice at that height of the reference."""
        self._need_case()
        settings = engine.generate_settings(self.bundle, sampler, steps, seed, informed_slice, informed_source,
                                            *self.remote)
        self.output = self.logic.start_generation(settings, self.reference, self.segmentation, self.mapping(),
                                                  informed_node=self.informed if informed_source == "other" else None)
        return self.output

    def poll(self) -> List[dict]:
        return self.logic.process_events()

    def cancel(self) -> None:
        self.logic.cancel()

    def export_zip(self) -> bytes:
        """The synthetic volume, the edited segmentation and the provenance, zipped (all marked synthetic)."""
        node = self.logic.exportable(self.output)
        if node is None:
            raise ValueError("Generate a volume first: only a finished generation can be exported.")
        folder = self._fresh_folder("export")
        paths = self.logic.export_case(node, folder, "nrrd")
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
            for path in (paths["image"], paths["segmentation"], paths["provenance"]):
                if path:
                    archive.write(path, os.path.basename(path))
        return buffer.getvalue()

    def close(self) -> None:
        self.logic.shutdown()
