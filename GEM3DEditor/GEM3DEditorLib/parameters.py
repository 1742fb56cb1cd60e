"""The module's parameter node (Slicer's parameterNodeWrapper) and the choices of its combo boxes.
Widget side: imported by GEM3DEditor.py only (parameterNodeWrapper needs the Slicer application)."""
import enum
import pathlib
from typing import Annotated, Dict

from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.parameterNodeWrapper import Minimum, WithinRange, parameterNodeWrapper

from .export import DEFAULT_PATIENT_NAME
from .settings import BatchSettings, EngineSettings, GenerateSettings


class InformedSource(enum.Enum):
    SAME = "same"
    OTHER = "other"
    GENERATED = "generated"

    def label(self):
        return {"same": "this scan", "other": "another loaded scan", "generated": "generated (slice model)"}[self.value]


class Sampler(enum.Enum):
    DEFAULT = ""
    DPMPP = "dpm++"
    DDIM = "ddim"
    UNIPC = "unipc"

    def label(self):
        return self.value or "fast default (DPM-Solver++)"


class Device(enum.Enum):
    AUTO = "auto"
    CPU = "cpu"
    CUDA = "cuda"

    def label(self):
        return {"auto": "auto (CUDA if available)", "cpu": "CPU", "cuda": "CUDA"}[self.value]


class ExportFormat(enum.Enum):
    NIFTI = "nii.gz"
    NRRD = "nrrd"

    def label(self):
        return {"nii.gz": "NIfTI (.nii.gz)", "nrrd": "NRRD (.nrrd)"}[self.value]


class BatchMode(enum.Enum):
    ENHANCE = "enhance"
    HARMONIZE = "harmonize"

    def label(self):
        return {"enhance": "Enhance (K samples per case)",
                "harmonize": "Harmonise (one fixed informed slice)"}[self.value]


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
    serverURL: str = ""
    outputVolume: vtkMRMLScalarVolumeNode
    keepPartial: bool = False
    exportFolder: pathlib.Path
    exportFormat: ExportFormat = ExportFormat.NIFTI
    exportDicom: bool = False
    patientName: str = DEFAULT_PATIENT_NAME
    batchMode: BatchMode = BatchMode.ENHANCE
    batchInputFolder: pathlib.Path
    batchOutputFolder: pathlib.Path
    batchTimes: Annotated[int, WithinRange(1, 100)] = 2
    batchAugment: bool = False
    batchInformedScan: pathlib.Path
    batchInformedPosition: Annotated[float, WithinRange(0.0, 1.0)] = 0.5


def path_text(path) -> str:
    """A parameter node path as text; '' for unset (pathlib.Path() is '.')."""
    text = str(path) if path is not None else ""
    return "" if text in ("", ".") else text


def engine_settings(p: GEM3DEditorParameterNode, server_token: str = "") -> EngineSettings:
    return EngineSettings(p.sampler.value or None, p.steps or None, p.seed, p.device.value, p.enginePython,
                          p.serverURL.strip(), server_token)


def generate_settings(p: GEM3DEditorParameterNode, server_token: str = "") -> GenerateSettings:
    start = None if (p.startAtInformed and p.informedSource == InformedSource.SAME) else p.startPosition
    return GenerateSettings(path_text(p.bundlePath), p.informedSource.value, p.informedSlice, start,
                            engine_settings(p, server_token), p.keepPartial)


def batch_settings(p: GEM3DEditorParameterNode) -> BatchSettings:
    return BatchSettings(p.batchMode.value, path_text(p.batchInputFolder), path_text(p.batchOutputFolder),
                         path_text(p.bundlePath) or None, p.batchTimes, p.batchAugment,
                         path_text(p.batchInformedScan) or None, p.batchInformedPosition, engine_settings(p))
