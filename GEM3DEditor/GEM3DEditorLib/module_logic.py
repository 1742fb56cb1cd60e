"""The module's logic as the Widget (GEM3DEditor.py) uses it: `logic.EditorLogic` implements it on MRML,
and a stand-in may take its place (`GEM3DEditorWidget(parent, logic=...)`), as in SlicerNNUnet's widget
tests. Pure Python: the Widget's wiring can be checked without the logic's MRML and engine."""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Protocol, Tuple, runtime_checkable

from .job import JobState
from .mask_history import MaskHistory


@runtime_checkable
class ModuleLogic(Protocol):
    job: Optional[JobState]  # the generation going on or last run
    batch: Optional[JobState]  # the batch run going on or last run
    history: MaskHistory  # undo / redo of mask edits

    @property
    def busy(self) -> bool: ...

    @property
    def batch_busy(self) -> bool: ...

    def segment_infos(self, segmentation_node) -> list: ...

    def edit_segments(self, segmentation_node, segment_ids: List[str], reference_node, specs: List[dict],
                      seed: Optional[int] = None) -> Tuple[List[dict], List[str]]: ...

    def undo_redo(self, segmentation_node, reference_node, undo: bool) -> Optional[dict]: ...

    def start_generation(self, settings, reference_node, segmentation_node, mapping: Dict[str, int],
                         informed_node=None, output_node=None) -> Any:
        """Returns the output volume node; `process_events` (a QTimer) fills it."""

    def process_events(self) -> List[dict]: ...

    def cancel(self) -> None: ...

    def start_batch(self, settings) -> None: ...

    def cancel_batch(self) -> None: ...

    def take_errors(self) -> List[str]: ...

    def exportable(self, selected=None) -> Any: ...

    def export_case(self, output_node, folder: str, image_format: str = "nii.gz", dicom: bool = False,
                    patient_name: str = "") -> Dict[str, str]: ...

    def abandon(self) -> None: ...

    def shutdown(self) -> None: ...
