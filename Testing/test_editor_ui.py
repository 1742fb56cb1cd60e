"""The Slicer module's files, checked without Slicer.

- GEM3DEditor.ui loads with Qt's QUiLoader (PySide6, offscreen). Slicer's widgets (qMRML*, ctk*)
  are unknown to plain Qt: placeholders of their <customwidgets> base class are registered so
  that every widget keeps its class name.
- Every `ui.<name>` of the Widget (GEM3DEditor.py, GEM3DEditorLib/panel.py) exists in the .ui; every "SlicerParameterName" names a
  parameter-node field whose type Slicer 5.8's parameterNodeWrapper can connect to that widget.
- The Python is Python 3.9 (Slicer 5.8) and uses only slicer.util functions that 5.8 has
  (Testing/data/slicer58_util_functions.txt, from Slicer v5.8.1's Base/Python/slicer/util.py).
"""
import ast
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULE = ROOT / "GEM3DEditor"
MODULE_PY = MODULE / "GEM3DEditor.py"
PARAMETERS_PY = MODULE / "GEM3DEditorLib" / "parameters.py"
WIDGET_FILES = [MODULE_PY, MODULE / "GEM3DEditorLib" / "panel.py"]  # the files that touch the .ui's widgets
UI_FILE = MODULE / "Resources" / "UI" / "GEM3DEditor.ui"
LIB_FILES = sorted((MODULE / "GEM3DEditorLib").glob("*.py"))
SLICER58_UTIL = ROOT / "Testing" / "data" / "slicer58_util_functions.txt"

# Widget classes Slicer 5.8's parameterNodeWrapper connects to each parameter type
# (Base/Python/slicer/parameterNodeWrapper/guiConnectors.py, canRepresent()).
CONNECTABLE = {
    "int": {"QSpinBox", "QSlider"},
    "float": {"QDoubleSpinBox", "ctkSliderWidget", "qMRMLSliderWidget", "ctkDoubleSlider",
              "ctkDoubleSpinBox", "qMRMLSpinBox"},
    "bool": {"QCheckBox", "ctkCheckBox", "QPushButton"},
    "str": {"QLineEdit", "QLabel", "QTextEdit"},
    "path": {"ctkPathLineEdit", "ctkDirectoryButton"},
    "enum": {"QComboBox", "ctkComboBox"},
    "node": {"qMRMLNodeComboBox"},
}


@pytest.fixture(scope="module")
def app():
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    from PySide6.QtWidgets import QApplication

    return QApplication.instance() or QApplication([])


def custom_widget_bases():
    """{custom class: Qt class it ultimately extends} from the .ui's <customwidgets>."""
    extends = {cw.findtext("class"): cw.findtext("extends") for cw in ET.parse(UI_FILE).getroot().iter("customwidget")}
    resolved = {}
    for name in extends:
        base = extends[name]
        while base in extends:
            base = extends[base]
        resolved[name] = base
    return extends, resolved


@pytest.fixture(scope="module")
def loaded_ui(app):
    from PySide6 import QtWidgets
    from PySide6.QtUiTools import QUiLoader

    extends, resolved = custom_widget_bases()
    loader = QUiLoader()
    classes = {}
    for name in extends:  # parents first, so that a subclass can derive from its custom parent
        chain = [name]
        while extends[chain[-1]] in extends:
            chain.append(extends[chain[-1]])
        for cls_name in reversed(chain):
            if cls_name not in classes:
                parent = classes.get(extends[cls_name]) or getattr(QtWidgets, resolved[cls_name])
                classes[cls_name] = type(cls_name, (parent,), {})
                loader.registerCustomWidget(classes[cls_name])
    widget = loader.load(str(UI_FILE))
    assert widget is not None, loader.errorString()
    return widget


def ui_widgets(widget):
    from PySide6.QtWidgets import QWidget

    return {child.objectName(): child for child in widget.findChildren(QWidget) if child.objectName()}


def module_tree():
    return ast.parse(PARAMETERS_PY.read_text(encoding="utf-8"))


def parameter_fields():
    """{field: annotation source} of the class decorated with @parameterNodeWrapper."""
    tree = module_tree()
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and any(
                getattr(d, "id", getattr(d, "attr", None)) == "parameterNodeWrapper" for d in node.decorator_list):
            return {stmt.target.id: ast.unparse(stmt.annotation) for stmt in node.body
                    if isinstance(stmt, ast.AnnAssign)}
    raise AssertionError("no @parameterNodeWrapper class in GEM3DEditorLib/parameters.py")


def enum_classes():
    return {node.name for node in module_tree().body if isinstance(node, ast.ClassDef)
            and any(ast.unparse(b) in ("enum.Enum", "Enum") for b in node.bases)}


def kind_of(annotation, enums):
    inner = re.sub(r"^Annotated\[(.*?),.*\]$", r"\1", annotation)
    if inner in ("int", "float", "bool", "str"):
        return inner
    if inner in ("pathlib.Path", "Path"):
        return "path"
    if inner in enums:
        return "enum"
    if inner.startswith("vtkMRML"):
        return "node"
    return None


# ----------------------------------------------------------------------------- the .ui
def test_every_widget_the_module_uses_exists_in_the_ui(loaded_ui):
    used = set()
    for path in WIDGET_FILES:
        used |= set(re.findall(r"\bui\.(\w+)", path.read_text(encoding="utf-8")))
    assert len(used) > 40
    missing = sorted(used - set(ui_widgets(loaded_ui)))
    assert not missing, f"GEM3DEditor.py uses widgets the .ui does not have: {missing}"


def test_slicer_widgets_keep_their_classes(loaded_ui):
    widgets = ui_widgets(loaded_ui)
    expected = {"bundlePathLineEdit": "ctkPathLineEdit", "referenceVolumeSelector": "qMRMLNodeComboBox",
                "segmentationSelector": "qMRMLNodeComboBox", "editSegmentSelector": "qMRMLSegmentSelectorWidget",
                "startPositionSlider": "ctkSliderWidget", "labelMappingTable": "QTableWidget",
                "informedThumbnailLabel": "QLabel", "progressBar": "QProgressBar", "mainTabWidget": "QTabWidget",
                "batchInputFolderLineEdit": "ctkPathLineEdit", "batchProgressBar": "QProgressBar",
                "modelCollapsibleButton": "ctkCollapsibleButton"}
    assert {name: type(widgets[name]).__name__ for name in expected} == expected
    from PySide6.QtWidgets import QWidget

    assert isinstance(widgets["editSegmentSelector"], QWidget)
    tabs = widgets["mainTabWidget"]
    assert [tabs.tabText(i) for i in range(tabs.count())] == ["Generate", "Batch"]
    assert widgets["stepsSpinBox"].specialValueText() == "default"


def test_parameter_names_match_fields_and_connectable_widgets(loaded_ui):
    fields, enums = parameter_fields(), enum_classes()
    widgets = ui_widgets(loaded_ui)
    connected = {}
    for name, widget in widgets.items():
        parameter = widget.property("SlicerParameterName")
        if parameter:
            connected[parameter] = name
            assert parameter in fields, f"{name} names parameter {parameter!r}, which the parameter node lacks"
            kind = kind_of(fields[parameter], enums)
            assert kind, f"parameter {parameter}: {fields[parameter]} cannot be connected to a widget"
            cls = type(widget).__name__
            assert cls in CONNECTABLE[kind], f"{name} ({cls}) cannot show {parameter}: {fields[parameter]}"
    assert len(connected) == len(set(connected.values()))  # one widget per parameter
    # the fields without a widget are kept on purpose
    assert set(fields) - set(connected) == {"labelMapping"}


def test_mrml_widgets_receive_the_scene():
    root = ET.parse(UI_FILE).getroot()
    top = root.find("widget").get("name")
    mrml = {w.get("name") for w in root.iter("widget") if w.get("class", "").startswith("qMRML")} - {top}
    receivers = {c.findtext("receiver") for c in root.iter("connection")
                 if c.findtext("sender") == top and c.findtext("signal") == "mrmlSceneChanged(vtkMRMLScene*)"
                 and c.findtext("slot") == "setMRMLScene(vtkMRMLScene*)"}
    assert mrml and mrml <= receivers, f"no scene for {sorted(mrml - receivers)}"


# ----------------------------------------------------------------------------- Python 3.9, Slicer 5.8
@pytest.mark.parametrize("path", [MODULE_PY] + LIB_FILES, ids=lambda p: p.name)
def test_python_39_syntax(path):
    source = path.read_text(encoding="utf-8")
    tree = ast.parse(source, feature_version=(3, 9))
    postponed = "from __future__ import annotations" in source
    for node in ast.walk(tree):
        annotations = []
        if isinstance(node, ast.AnnAssign):
            annotations.append(node.annotation)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            annotations += [a.annotation for a in node.args.args + node.args.kwonlyargs if a.annotation]
            annotations += [node.returns] if node.returns else []
        if not postponed:  # evaluated at runtime: `X | Y` needs Python 3.10
            for annotation in annotations:
                assert not any(isinstance(n, ast.BinOp) and isinstance(n.op, ast.BitOr)
                               for n in ast.walk(annotation)), f"{path.name}:{node.lineno}: X | Y annotation"
        if isinstance(node, ast.Call) and ast.unparse(node.func).endswith("dataclass"):
            assert not {k.arg for k in node.keywords} & {"slots", "kw_only"}, f"{path.name}: 3.10 dataclass option"
        if isinstance(node, ast.Call) and ast.unparse(node.func) == "zip":
            assert "strict" not in {k.arg for k in node.keywords}, f"{path.name}: zip(strict=) is 3.10"
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            assert not any(n.split(".")[0] in ("tomllib",) for n in names), f"{path.name}: 3.11 module"


def test_slicer_util_functions_exist_in_slicer_58():
    available = {line.strip() for line in SLICER58_UTIL.read_text().splitlines()
                 if line.strip() and not line.startswith("#")}
    assert {"arrayFromVolume", "pip_install", "loadUI", "exportNode"} <= available
    used = set()
    for path in [MODULE_PY] + LIB_FILES:
        used |= set(re.findall(r"slicer\.util\.(\w+)", path.read_text(encoding="utf-8")))
        used |= {alias.name for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
                 if isinstance(node, ast.ImportFrom) and node.module == "slicer.util" for alias in node.names}
    assert len(used) > 15
    missing = sorted(used - available)
    assert not missing, f"not in Slicer 5.8's slicer.util: {missing}"


def test_apis_newer_than_slicer_58_are_guarded():
    """slicer.packaging (5.12+) is imported explicitly (nothing imports it at startup) and pip_ensure is
    used only where it exists; 5.8-5.11 get slicer.util.pip_install."""
    for path in [MODULE_PY] + LIB_FILES:
        source = path.read_text(encoding="utf-8")
        assert not re.search(r"slicer\.packaging\.\w+\(", source), f"{path.name}: slicer.packaging without import"
        assert 'hasattr(slicer, "packaging")' not in source, path.name
    install = (MODULE / "GEM3DEditorLib" / "install.py").read_text(encoding="utf-8")
    assert 'importlib.import_module("slicer.packaging")' in install
    assert 'hasattr(packaging, "pip_ensure")' in install and "slicer.util.pip_install(" in install


PURE_MODULES = ("batch", "dependencies", "edits", "export", "geometry", "mask_history", "settings",
                "sink", "thumbnail")
CONTRACT_MODULES = ("job", "label_matching", "module_logic", "process")  # gem3d's torch-free contract, no Slicer
MRML_MODULES = ("headless", "install", "logic", "nodes", "output", "sample_data", "slice_views")
WIDGET_MODULES = ("panel", "parameters")  # Qt and parameterNodeWrapper: the Slicer application only


def test_every_library_module_is_classified():
    names = {p.stem for p in LIB_FILES} - {"__init__"}
    assert names == set(PURE_MODULES + CONTRACT_MODULES + MRML_MODULES + WIDGET_MODULES)
    assert not (MODULE / "GEM3DEditorLib" / "request.py").exists()  # gem3d.request is the one schema
    assert not (MODULE / "GEM3DEditorLib" / "bundle_info.py").exists()  # gem3d.bundle_format is the format


def import_blocked(modules, blocked) -> str:
    """Import GEM3DEditorLib.<modules> in a fresh Python where the `blocked` packages cannot be imported."""
    code = ("import importlib, sys\n"
            f"for name in {tuple(blocked)!r}:\n"
            "    sys.modules[name] = None\n"
            f"sys.path[:0] = [{str(MODULE)!r}, {str(ROOT / 'GEM3DCore')!r}]\n"
            f"for name in {tuple(modules)!r}:\n"
            "    importlib.import_module('GEM3DEditorLib.' + name)\n"
            "print('imported', len(sys.modules))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("imported")
    return result.stdout


def test_pure_modules_import_without_slicer_torch_or_gem3d():
    """The module lists missing dependencies before any is installed: these need none of them."""
    import_blocked(PURE_MODULES, ("slicer", "qt", "vtk", "ctk", "torch", "gem3d", "diffusers", "SimpleITK"))


def test_contract_modules_import_without_slicer_or_torch():
    import_blocked(CONTRACT_MODULES, ("slicer", "qt", "vtk", "ctk", "torch", "diffusers"))


def test_mrml_modules_import_under_slicer_core_without_qt():
    pytest.importorskip("slicer", reason="slicer-core is in the test extra")
    import_blocked(MRML_MODULES, ("qt", "ctk", "PySide6", "PyQt5", "torch", "diffusers", "slicer.ScriptedLoadableModule"))


def test_module_file_is_thin():
    assert len(MODULE_PY.read_text(encoding="utf-8").splitlines()) <= 350


# ----------------------------------------------------------------------------- packaging
def test_cmake_ships_every_module_file():
    cmake = (MODULE / "CMakeLists.txt").read_text()
    for path in LIB_FILES:
        assert f"${{MODULE_NAME}}Lib/{path.name}" in cmake, f"{path.name} is not in GEM3DEditor/CMakeLists.txt"
    assert "Resources/UI/${MODULE_NAME}.ui" in cmake and "Resources/Icons/${MODULE_NAME}.png" in cmake
    assert "GEM3DCore/gem3d" in cmake  # the engine package ships inside the module
    assert "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in cmake and "WITH_GENERIC_TESTS" in cmake
    top = (ROOT / "CMakeLists.txt").read_text()
    assert "add_subdirectory(GEM3DEditor)" in top and 'EXTENSION_DEPENDS "PyTorch"' in top
    screenshot = re.search(r'EXTENSION_SCREENSHOTURLS "\$\{GEM3D_RAW_URL\}/([^"]+)"', top).group(1)
    assert (ROOT / screenshot).is_file(), f"EXTENSION_SCREENSHOTURLS names {screenshot}, which does not exist"


@pytest.mark.parametrize("path", [ROOT / "Resources" / "Icons" / "GEM3DEditor.png",
                                  MODULE / "Resources" / "Icons" / "GEM3DEditor.png"])
def test_icons_are_128_pixel_pngs(app, path):
    from PySide6.QtGui import QImage

    image = QImage(str(path))
    assert not image.isNull() and (image.width(), image.height()) == (128, 128)
