"""Render what the module shows after a Generate: the Red, Yellow and Green slice views of a phantom
brain (top) and the synthetic volume the demo bundle made from its lesion mask (bottom), with the
mask's outline, through MRML's slice logic (slicer-core, no GUI). Writes GEM3DEditor-1.png here.

    PYTHONPATH=GEM3DCore python Resources/Screenshots/make_screenshot.py [--steps 20]
"""
import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "GEM3DEditor"))
sys.path.insert(0, str(ROOT / "GEM3DCore"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", default=str(Path(__file__).with_name("GEM3DEditor-1.png")))
    args = parser.parse_args()

    from PIL import Image

    from gem3d import phantom
    from gem3d.io import write_volume
    from gem3d.bundle_format import read_bundle_info
    from GEM3DEditorLib import label_matching, nodes, slice_views
    from GEM3DEditorLib.headless import HeadlessSlicer
    from GEM3DEditorLib.logic import EditorLogic
    from GEM3DEditorLib.settings import EngineSettings, GenerateSettings

    folder = Path(tempfile.mkdtemp(prefix="gem3d_screenshot_"))
    image, labels, _truth = phantom.make_case("brain", seed=3, index=0, size=64, slices=32)
    write_volume(image, folder / "phantom_flair.nrrd")
    write_volume(labels, folder / "lesion.nrrd")
    slicer = HeadlessSlicer()
    reference = nodes.load_volume(slicer.volumes_logic, str(folder / "phantom_flair.nrrd"), "phantom FLAIR")
    segmentation = nodes.load_segmentation(slicer.scene, str(folder / "lesion.nrrd"), "lesion")
    bundle = str(ROOT / "GEM3DCore" / "gem3d" / "resources" / "demo_bundle")
    matches, _ = label_matching.match_segments(EditorLogic.segment_infos(segmentation),
                                               read_bundle_info(bundle).label_map.names)
    mapping = {m.segment_id: m.label for m in matches}
    logic = EditorLogic(slicer.scene, slicer.volumes_logic, str(folder), str(ROOT / "GEM3DCore"))
    settings = GenerateSettings(bundle, start=0.5, engine=EngineSettings(steps=args.steps, seed=0, device="cpu"))
    output = logic.start_generation(settings, reference, segmentation, mapping)
    try:
        while logic.busy:
            logic.process_events()
            time.sleep(0.1)
    finally:
        logic.shutdown()
    if logic.job.error:
        raise SystemExit(logic.job.error)

    mask = EditorLogic.compose_mask(segmentation, reference, mapping)
    label = slicer.scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "mask")
    label.CopyOrientation(reference)
    label.SetAndObserveImageData(nodes.image_data_from_array(mask.astype(np.int16)))
    label.CreateDefaultDisplayNodes()
    k, j, i = np.nonzero(mask)
    centre = (nodes.ijk_to_ras(reference) @ np.array([i.mean(), j.mean(), k.mean(), 1.0]))[:3]
    offsets = {"Red": centre[2], "Yellow": centre[0], "Green": centre[1]}
    rows = []
    with slice_views.SliceViews(slicer, size=256) as views:
        for logic_ in views.logics.values():
            logic_.GetSliceNode().SetUseLabelOutline(True)
        for volume in (reference, output):
            images = views.render({name: volume for name in slice_views.ORIENTATIONS}, label=label, offsets=offsets,
                                  label_opacity=1.0)
            rows.append(np.concatenate([images[name][..., :3] for name in slice_views.ORIENTATIONS], axis=1))
    Image.fromarray(np.concatenate(rows, axis=0)).save(args.out)
    print(f"wrote {args.out}: top the phantom scan, bottom the synthetic volume ({logic.job.status})")


if __name__ == "__main__":
    main()
