"""Installing the engine's packages into Slicer's Python, on first use (never at import, never
in testing mode).

Slicer 5.12+ has slicer.packaging.pip_ensure (with constraints that keep the packages Slicer has
loaded); 5.8-5.11 have only slicer.util.pip_install. Nothing imports slicer.packaging at startup,
so it is imported here explicitly. torch is installed with light-the-torch in a child process, with
the PyTorch extension's arguments (PyTorchUtils) where that extension is installed, and never
imported into Slicer's GUI process: the engine runs in its own process. (PyTorchUtilsLogic.installTorch
and torchInstalled import torch, so they are not called.)
"""
import importlib
import os
import sys
import tempfile
from typing import List

import slicer

from . import dependencies

REQUESTER = "GEM-3D Editor"


def packaging_module():
    """slicer.packaging (Slicer 5.12+) or None."""
    try:
        return importlib.import_module("slicer.packaging")
    except ImportError:
        return None


def needed(engine_python: str = "", export_only: bool = False) -> List[tuple]:
    """What Slicer's Python lacks: everything with PythonSlicer as the engine, only Export's
    packages when a user-chosen Python runs the engine (it manages its own) or for Export."""
    table = dependencies.requirements_for(sys.version_info[:2])
    if engine_python.strip() or export_only:
        table = {name: req for name, req in table.items() if name in dependencies.EXPORT_PACKAGES}
    return dependencies.missing_packages(requirements=table)


def ensure_dependencies(engine_python: str = "", export_only: bool = False, confirm=None,
                        device: str = "auto") -> bool:
    """True when generation (or Export) can start. Asks before installing (`confirm`, default: a
    dialog) and offers a restart after; in testing mode it installs nothing and says what is missing
    (a self-test must not download gigabytes)."""
    missing = needed(engine_python, export_only)
    torch_requirement, others = dependencies.split_torch(missing)
    problem = torch_requirement and dependencies.shared_torch_problem(
        dependencies.installed_versions([dependencies.TORCH]).get(dependencies.TORCH), torch_requirement,
        pytorch_utils_logic() is not None)
    if problem:
        raise RuntimeError(problem)
    if not missing:
        return True
    if slicer.app.testingEnabled():
        raise RuntimeError("Testing mode installs nothing; install these packages first:\n"
                           + dependencies.describe(missing))
    if not (confirm or ask)(dependencies.describe(missing)):
        return False
    loaded = dependencies.installed_versions(dependencies.loaded_distributions(sys.modules))
    slicer.util.showStatusMessage("Installing Python packages for GEM-3D Editor...")
    if torch_requirement:
        install_torch(torch_requirement, device)
    if others:
        install_packages(others, dependencies.pins(loaded))
    importlib.invalidate_caches()
    changed = dependencies.changed(loaded, dependencies.installed_versions(list(loaded)))
    if needed(engine_python, export_only) or changed:
        if slicer.util.confirmYesNoDisplay("The packages are installed; Slicer must restart to use them. Restart now?",
                                           windowTitle=REQUESTER):
            slicer.util.restart()
        return False
    return True


def ask(details: str) -> bool:
    return slicer.util.confirmOkCancelDisplay(
        "GEM-3D Editor needs Python packages that are not installed yet (PyTorch alone is 1-3 GB). Install them "
        "now? This takes several minutes and modifies Slicer's Python environment.",
        windowTitle=REQUESTER, detailedText=details)


def pytorch_utils_logic():
    """The PyTorch extension's PyTorchUtilsLogic class, or None when that extension is not installed."""
    try:
        return importlib.import_module("PyTorchUtils").PyTorchUtilsLogic
    except ImportError:
        return None


def install_torch(requirement: str, device: str = "auto") -> None:
    """torch through light-the-torch, run as `PythonSlicer -m light_the_torch ...` in a child process,
    with the PyTorch extension's arguments where it is installed (dependencies.torch_install_arguments)."""
    from gem3d.worker_client import python_executable_default

    utils = pytorch_utils_logic()
    arguments = getattr(utils, "_getPipInstallArguments", None)
    slicer.util.pip_install("light-the-torch>=0.5")
    process = slicer.util.launchConsoleProcess([python_executable_default(), "-m", "light_the_torch"] +
                                               dependencies.torch_install_arguments(requirement, device, arguments))
    slicer.util.logProcessOutput(process)  # raises CalledProcessError when the installation fails


def install_packages(requirements: List[str], pins: List[str]) -> None:
    """Everything but torch; packages Slicer has already loaded (numpy...) are kept as they are."""
    packaging = packaging_module()
    if packaging is not None and hasattr(packaging, "pip_ensure"):  # Slicer >= 5.12
        with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
            f.write("\n".join(pins) + "\n")
        try:
            packaging.pip_ensure(requirements, constraints=f.name, prompt_install=False,
                                 prompt_restart=False, requester=REQUESTER)
        finally:
            os.remove(f.name)
    else:  # Slicer 5.8-5.11
        slicer.util.pip_install(list(requirements) + list(pins))
