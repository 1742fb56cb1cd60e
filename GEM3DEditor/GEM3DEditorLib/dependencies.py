"""What the engine needs in the Python that runs it, per Slicer/Python version, and what is missing.

Pure functions; the Slicer side (asking the user, PyTorchUtils, pip) is in install.py.
REQUIREMENTS mirrors `[project] dependencies` of pyproject.toml (a test keeps them equal); the
Python 3.9 rows of INSTALL_TABLE are what pip can resolve for Slicer 5.8 (a test asks pip).

| Slicer      | Python | numpy, scipy                | torch      | diffusers    | torchmetrics |
|-------------|--------|-----------------------------|------------|--------------|--------------|
| 5.8         | 3.9    | Slicer's 1.26.4, 1.13.1     | >=2.1,<2.9 | >=0.30,<0.37 | >=1.3,<2     |
| 5.10 and up | 3.12   | Slicer's (kept as they are) | >=2.1,<3   | >=0.30,<0.43 | >=1.3,<2     |
(torch 2.8 and diffusers 0.36 are the last releases with Python 3.9 wheels.)

Tested: CI runs torch 2.13.0 with the newest of the rest; the oldest-versions run (Testing/
test_install_sets.py) runs torch 2.13.0 (the only CPU wheel offline) with numpy 1.26.4, scipy 1.13.1,
diffusers 0.30.0 and torchmetrics 1.3.0. torch below 2.13 is resolved for Python 3.9, not run.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import re
from typing import Callable, Dict, Iterable, List, Optional, Tuple

# import name -> pip requirement (same bounds as pyproject.toml)
REQUIREMENTS: Dict[str, str] = {
    "torch": "torch>=2.1,<3",
    "numpy": "numpy>=1.26,<3",
    "scipy": "scipy>=1.13,<2",
    "SimpleITK": "SimpleITK>=2.3,<3",
    "slicerio": "slicerio>=1.0,<2",
    "nrrd": "pynrrd>=1.0,<2",
    "diffusers": "diffusers>=0.30,<0.43",
    "safetensors": "safetensors>=0.4,<1",
    "einops": "einops>=0.7,<0.9",
    "click": "click>=8.1,<9",
    "tqdm": "tqdm>=4.66,<5",
    "torchmetrics": "torchmetrics>=1.3,<2",
    "yaml": "PyYAML>=6,<7",
    "PIL": "Pillow>=9,<13",
}

# Python 3.9 (Slicer 5.8): narrower bounds where newer releases dropped 3.9
PYTHON39_OVERRIDES: Dict[str, str] = {
    "torch": "torch>=2.1,<2.9",
    "diffusers": "diffusers>=0.30,<0.37",
}

# What Export needs in Slicer's own Python even when a user-chosen Python runs the engine.
EXPORT_PACKAGES = ("SimpleITK", "slicerio", "nrrd")

# Installed separately, with light-the-torch (it picks the CUDA build that fits the driver): through
# the PyTorch extension's PyTorchUtils where it is installed (the torch it shares with other AI
# extensions), else directly. Never imported into Slicer's GUI process.
TORCH = "torch"

# Packages Slicer has already imported: pip must not replace them under a running Slicer.
PINNED_WHEN_LOADED = ("numpy", "SimpleITK")


def requirements_for(python_version: Tuple[int, int]) -> Dict[str, str]:
    """The INSTALL_TABLE row for a Python version: {import name: pip requirement}."""
    table = dict(REQUIREMENTS)
    if tuple(python_version[:2]) < (3, 10):
        table.update(PYTHON39_OVERRIDES)
    return table


def _release(version: str) -> Tuple[int, ...]:
    """'2.13.0+cpu' -> (2, 13, 0); '0.30.0.dev1' -> (0, 30, 0)."""
    parts = []
    for part in re.split(r"[.+]", version):
        digits = re.match(r"\d+", part)
        if not digits:
            break
        parts.append(int(digits.group()))
        if digits.group() != part:
            break
    return tuple(parts)


def satisfies(version: str, requirement: str) -> bool:
    """Whether `version` meets the >=, <, ==, <=, > bounds of `requirement` (release numbers only)."""
    have = _release(version)
    for op, bound in re.findall(r"(>=|<=|==|<|>)\s*([0-9][0-9.]*)", requirement):
        want = _release(bound)
        width = max(len(have), len(want))
        a, b = have + (0,) * (width - len(have)), want + (0,) * (width - len(want))
        if not {">=": a >= b, "<=": a <= b, "==": a == b, "<": a < b, ">": a > b}[op]:
            return False
    return True


def missing_packages(find_spec: Callable[[str], object] = importlib.util.find_spec,
                     requirements: Optional[Dict[str, str]] = None,
                     version: Callable[[str], str] = importlib.metadata.version) -> List[Tuple[str, str]]:
    """(import name, pip requirement) of every package that cannot be imported or whose installed
    version is outside the requirement's bounds."""
    requirements = REQUIREMENTS if requirements is None else requirements
    missing = []
    for name, requirement in requirements.items():
        try:
            found = find_spec(name) is not None
        except (ImportError, ValueError):  # a broken half-installed package
            found = False
        if found:
            try:
                found = satisfies(version(distribution_name(requirement)), requirement)
            except importlib.metadata.PackageNotFoundError:
                pass  # importable without metadata (a source checkout): accepted
        if not found:
            missing.append((name, requirement))
    return missing


def split_torch(missing: Iterable[Tuple[str, str]]) -> Tuple[Optional[str], List[str]]:
    """(torch requirement or None, the other requirements)."""
    torch = None
    others = []
    for name, requirement in missing:
        if name == TORCH:
            torch = requirement
        else:
            others.append(requirement)
    return torch, others


def torch_install_arguments(requirement: str, device: str = "auto",
                            pytorch_utils_arguments: Optional[Callable[[Optional[str], str], List[str]]] = None
                            ) -> List[str]:
    """light-the-torch's arguments for the torch `requirement`. With the PyTorch extension,
    `pytorch_utils_arguments` (PyTorchUtilsLogic._getPipInstallArguments: its package set and
    computation-backend option) builds them; the "cpu" device asks for the CPU build (no CUDA
    download), any other lets light-the-torch pick the build for the driver, as the extension's
    "automatic" does."""
    backend = "cpu" if device == "cpu" else None
    if pytorch_utils_arguments is not None:
        return list(pytorch_utils_arguments(backend, requirement[len(distribution_name(requirement)):]))
    return ["install", requirement] + ([f"--pytorch-computation-backend={backend}"] if backend else [])


def shared_torch_problem(installed: Optional[str], requirement: str, pytorch_extension: bool) -> Optional[str]:
    """Why the installed torch cannot be used, when the PyTorch extension manages it (it is shared with
    other AI extensions, so it is not replaced behind their back); None when it fits or is absent, or
    without the extension (then the module installs its own)."""
    if installed is None or not pytorch_extension or satisfies(installed, requirement):
        return None
    return (f"PyTorch {installed} (installed by the PyTorch extension) is outside what GEM-3D needs ({requirement}): "
            "install a fitting version in the PyTorch Utils module, restart Slicer and try again.")


def distribution_name(requirement: str) -> str:
    """'PyYAML>=6,<7' -> 'PyYAML'."""
    return re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0]


def loaded_distributions(modules: Iterable[str],
                         requirements: Optional[Dict[str, str]] = None) -> List[str]:
    """Distributions of our requirements whose import name is among `modules` (e.g. sys.modules)."""
    requirements = REQUIREMENTS if requirements is None else requirements
    modules = set(modules)
    return [distribution_name(req) for name, req in requirements.items() if name in modules]


def installed_versions(distributions: Iterable[str],
                       version: Callable[[str], str] = importlib.metadata.version) -> Dict[str, str]:
    """{distribution: version} of those installed (absent ones are left out)."""
    result = {}
    for name in distributions:
        try:
            result[name] = version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return result


def pins(loaded_versions: Dict[str, str]) -> List[str]:
    """`name==version` constraints that keep already loaded packages as they are."""
    return [f"{name}=={version}" for name, version in sorted(loaded_versions.items())]


def changed(before: Dict[str, str], after: Dict[str, str]) -> List[str]:
    """Distributions whose version changed (or that vanished): a restart is needed to use them."""
    return sorted(name for name, version in before.items() if after.get(name) != version)


def describe(missing: Iterable[Tuple[str, str]]) -> str:
    return "\n".join(f"- {requirement}" for _, requirement in missing)
