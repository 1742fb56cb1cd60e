"""Filling the panel's table and thumbnail, and its edit buttons (Qt side; imported by the Widget only)."""
import os
import tempfile
from typing import Dict, List

import numpy as np
import qt
import slicer

from . import edits, geometry, label_matching, nodes, sample_data, thumbnail

THUMBNAIL = os.path.join(tempfile.gettempdir(), f"gem3d_thumbnail_{os.getpid()}.pgm")
SERVER_TOKEN_SETTING = "GEM3DEditor/ServerToken"  # application settings: a token never goes into a scene file


def keep_server_token(line_edit) -> None:
    """Show the saved server token in `line_edit` and save it whenever the user changes it."""
    line_edit.text = qt.QSettings().value(SERVER_TOKEN_SETTING, "") or ""
    line_edit.connect("editingFinished()", lambda: qt.QSettings().setValue(SERVER_TOKEN_SETTING, line_edit.text))


def fill_label_table(table, segments: List[label_matching.SegmentInfo], label_map: Dict[int, str],
                     chosen: Dict[str, int], on_change) -> List[str]:
    """One row per segment: name, a model-label combo box, why it matched. Returns the names of the
    segments that match no label (and that the user did not map)."""
    matches, unmatched = label_matching.match_segments(segments, label_map)
    table.setRowCount(0)
    table.setRowCount(len(matches))
    for row, match in enumerate(matches):
        combo = qt.QComboBox()
        for value, text in [(0, "(ignore)")] + [(v, f"{v}: {n}") for v, n in sorted(label_map.items())]:
            combo.addItem(text, value)
        combo.setCurrentIndex(max(combo.findData(chosen.get(match.segment_id, match.label or 0)), 0))
        combo.connect("currentIndexChanged(int)",
                      lambda index, s=match.segment_id, c=combo: on_change(s, int(c.itemData(c.currentIndex))))
        table.setCellWidget(row, 1, combo)
        reason = match.reason if match.segment_id not in chosen else "set by you"
        for column, text in ((0, match.name), (2, reason)):
            item = qt.QTableWidgetItem(text)
            item.setFlags(qt.Qt.ItemIsEnabled)
            item.setData(qt.Qt.UserRole, match.segment_id)
            table.setItem(row, column, item)
    return [m.name for m in unmatched if not chosen.get(m.segment_id)]


def table_mapping(table) -> Dict[str, int]:
    """{segment ID: model label} as the table shows it (0: ignored)."""
    mapping = {}
    for row in range(table.rowCount):
        combo = table.cellWidget(row, 1)
        mapping[table.item(row, 0).data(qt.Qt.UserRole)] = int(combo.itemData(combo.currentIndex))
    return mapping


def show_informed_slice(label, spin_box, node, index: int) -> None:
    """Thumbnail of axial slice `index` of `node`, the spin box's range, and the Red view moved there."""
    if node is None or node.GetImageData() is None:
        label.setPixmap(qt.QPixmap())
        return
    array, ijk_to_ras = slicer.util.arrayFromVolume(node), nodes.ijk_to_ras(node)
    axis = geometry.axial_axis(ijk_to_ras, array.shape).axis
    spin_box.maximum = max(array.shape[axis] - 1, 0)
    index = min(index, array.shape[axis] - 1)
    thumbnail.write_thumbnail(THUMBNAIL, array, ijk_to_ras, axis, index)
    label.setPixmap(qt.QPixmap(THUMBNAIL))
    red = red_slice_node()
    if red is not None:
        red.JumpSliceByOffsetting(*[float(c) for c in geometry.slice_center_ras(ijk_to_ras, array.shape, axis, index)])


def red_view_slice_index(node):
    """Index (along the volume's axial axis) of the slice the Red view shows, or None."""
    red = red_slice_node()
    if node is None or red is None:
        return None
    ijk_to_ras = nodes.ijk_to_ras(node)
    shape = slicer.util.arrayFromVolume(node).shape
    axis = geometry.axial_axis(ijk_to_ras, shape).axis
    point = [red.GetSliceToRAS().GetElement(i, 3) for i in range(3)]
    return geometry.slice_index_at(ijk_to_ras, point, axis, shape[axis])


def red_slice_node():
    manager = slicer.app.layoutManager()
    widget = manager.sliceWidget("Red") if manager is not None else None
    return widget.mrmlSliceNode() if widget is not None else None


def connect_edit_buttons(ui, on_edit, modality) -> None:
    """Each mask-edit button calls on_edit(specs) with gem3d mask-edit specs from its fields (RAS -> LPS)."""
    specs = {
        ui.flipButton: lambda: [{"op": "flip", "axis": "LR"}],
        ui.rotateButton: lambda: [edits.rotate_ras([ui.rotateXSpinBox.value, ui.rotateYSpinBox.value,
                                                    ui.rotateZSpinBox.value])],
        ui.translateButton: lambda: [edits.translate_ras([ui.translateXSpinBox.value, ui.translateYSpinBox.value,
                                                          ui.translateZSpinBox.value])],
        ui.scaleButton: lambda: [{"op": "scale", "factor": ui.scaleSpinBox.value}],
        ui.moveToCenterButton: lambda: [{"op": "move_toward_center", "max_px": ui.moveToCenterSpinBox.value}],
        ui.augmentButton: lambda: edits.paper_augmentation(modality(), np.random.default_rng()),
    }
    for button, make in specs.items():
        button.connect("clicked(bool)", lambda checked=False, make=make: on_edit(make()))


def work_folder() -> str:
    """The module's folder for job inputs and outputs and the sample case, in Slicer's temporary folder."""
    folder = os.path.join(slicer.app.temporaryPath, "GEM3DEditor")
    os.makedirs(folder, exist_ok=True)
    return folder


def register_sample_data(thumbnail_file: str) -> None:
    """The "GEM-3D phantom" entry of the Sample Data module: made here by gem3d, nothing downloaded."""
    import SampleData

    def load(source=None):
        with slicer.util.tryWithErrorDisplay("The GEM-3D phantom could not be made.", waitCursor=True):
            scan, _segmentation = sample_data.load_phantom_case(slicer.mrmlScene, slicer.modules.volumes.logic(),
                                                                work_folder())
            slicer.util.setSliceViewerLayers(background=scan, fit=True)

    SampleData.SampleDataLogic.registerCustomSampleDataSource(
        category=sample_data.CATEGORY, sampleName=sample_data.SAMPLE_NAME, customDownloader=load,
        thumbnailFileName=thumbnail_file)
