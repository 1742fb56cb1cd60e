"""What the engine needs in the Python that runs it, and what is missing.

Pure functions; the Slicer side (asking the user, PyTorchUtils, pip) is in GEM3DEditor.py.
The table mirrors `[project] dependencies` of pyproject.toml (a test keeps them equal).
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import re
from typing import Callable, Dict, Iterable, List, Optional, Tuple

# import name -> pip requirement (same bounds as pyproject.toml)
REQUIREMENTS: Dict[str, str] = {
    "torch": "torch>=2.1,<3",
    "numpy": "numpy>=1.24,<3",
    "scipy": "scipy>=1.10,<2",
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

# Installed separately: PyTorchUtils (PyTorch extension) picks the CUDA build that fits the driver.
TORCH = "torch"

# Packages Slicer has already imported: pip must not replace them under a running Slicer.
PINNED_WHEN_LOADED = ("numpy", "SimpleITK")


def missing_packages(find_spec: Callable[[str], object] = importlib.util.find_spec,
                     requirements: Optional[Dict[str, str]] = None) -> List[Tuple[str, str]]:
    """(import name, pip requirement) of every package that cannot be imported."""
    requirements = REQUIREMENTS if requirements is None else requirements
    missing = []
    for name, requirement in requirements.items():
        try:
            found = find_spec(name) is not None
        except (ImportError, ValueError):  # a broken half-installed package
            found = False
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
