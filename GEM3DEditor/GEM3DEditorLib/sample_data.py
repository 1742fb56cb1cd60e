"""The "GEM-3D phantom" sample: a synthetic brain case (a FLAIR-like scan and its BraTS-labelled
tumour segmentation) made on this computer by gem3d.phantom, so nothing is downloaded, and loaded
into the scene. Slicer's Sample Data module calls it through the module's registration; it needs
only MRML, so it runs (and is tested) under the slicer-core wheel.
"""
import os
from typing import Tuple

from . import nodes

SAMPLE_NAME = "GEM-3D phantom"
CATEGORY = "GEM-3D"


def make_phantom_case(folder: str, seed: int = 0, size: int = 96, slices: int = 48) -> Tuple[str, str]:
    """(scan path, segmentation path) of phantom case `seed`, written once: the same arguments
    always give the same voxels, so files already there are reused."""
    from gem3d.io import write_segmentation, write_volume
    from gem3d.phantom import LABELS, SYNTHETIC_NOTE, make_case

    stem = os.path.join(folder, f"gem3d_phantom_brain_{seed}_{size}x{slices}")
    image_path, segmentation_path = stem + ".nrrd", stem + ".seg.nrrd"
    if not (os.path.isfile(image_path) and os.path.isfile(segmentation_path)):
        os.makedirs(folder, exist_ok=True)
        image, labels, _truth = make_case("brain", seed=seed, size=size, slices=slices)
        segments = [{"name": name, "label_value": value} for value, name in sorted(LABELS["brain"].names.items())]
        write_volume(image, image_path, description=SYNTHETIC_NOTE, overwrite=True)
        write_segmentation(labels, segmentation_path, segments, overwrite=True, description=SYNTHETIC_NOTE)
    return image_path, segmentation_path


def load_phantom_case(scene, volumes_logic, folder: str, seed: int = 0, size: int = 96, slices: int = 48):
    """(scan node, segmentation node) of the phantom case, made if needed; segment names match the
    demo bundle's labels, so the module maps them without asking."""
    image_path, segmentation_path = make_phantom_case(folder, seed, size, slices)
    scan = nodes.load_volume(volumes_logic, image_path, "GEM-3D phantom FLAIR")  # made unique by the logic
    segmentation = nodes.load_segmentation(scene, segmentation_path,
                                           scene.GenerateUniqueName("GEM-3D phantom tumour"))
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(scan)
    return scan, segmentation
