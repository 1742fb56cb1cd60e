"""Training checkpoints: `checkpoints/<stage>/step_XXXXXXXX/` holding

- model.safetensors  the stage's network (current weights)
- ema.safetensors    the EMA of its trainable parameters, by parameter name
- state.pt           optimiser, LR schedule, step, EMA counters, smoothed loss, wall time

Everything loads with `weights_only=True` (no pickle executed). A checkpoint folder is
written under a temporary name and renamed, so a killed run never leaves a half
checkpoint that resume would pick; the two newest are kept. A checkpoint that cannot be read
(a disk error, a copy cut short) is set aside as `.step_XXXXXXXX.corrupt` and resume falls back
to the previous one, saying so.
"""
from __future__ import annotations

import os
import logging
import re
import shutil
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
from safetensors.torch import load_file, save_file

from gem3d.bundle import cpu_tensors

log = logging.getLogger("gem3d.training")
KEEP = 2
NAME = re.compile(r"^step_(\d{8})$")


def save_checkpoint(folder: Path, step: int, model: torch.nn.Module, ema: Dict[str, torch.Tensor],
                    state: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"step_{step:08d}"
    tmp = folder / f".{final.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(cpu_tensors(model.state_dict()), str(tmp / "model.safetensors"))
    save_file(cpu_tensors(ema), str(tmp / "ema.safetensors"))
    torch.save(state, tmp / "state.pt")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in _step_folders(folder)[:-KEEP]:
        shutil.rmtree(old)
    return final


def _step_folders(folder: Path) -> List[Path]:
    """Finished checkpoints, oldest first (temporary folders excluded)."""
    return sorted(p for p in folder.iterdir() if NAME.match(p.name)) if folder.is_dir() else []


def latest_checkpoint(folder: Path) -> Optional[Path]:
    found = _step_folders(folder)
    return found[-1] if found else None


def load_checkpoint(path: Path, device: torch.device) -> Tuple[dict, dict, dict]:
    """(model state dict, EMA tensors by name, training state)."""
    return (load_file(str(path / "model.safetensors"), device=str(device)),
            load_file(str(path / "ema.safetensors"), device=str(device)),
            torch.load(path / "state.pt", map_location=device, weights_only=True))


def load_latest_checkpoint(folder: Path, device: torch.device) -> Optional[Tuple[dict, dict, dict]]:
    """`load_checkpoint` of the newest readable checkpoint (None when there is none)."""
    for path in reversed(_step_folders(folder)):
        try:
            loaded = load_checkpoint(path, device)
            _check_finite(loaded[0], path / "model.safetensors")
            _check_finite(loaded[1], path / "ema.safetensors")
            return loaded
        except Exception as err:  # safetensors, torch.load and OS errors alike
            aside = path.with_name(f".{path.name}.corrupt")
            shutil.rmtree(aside, ignore_errors=True)
            os.replace(path, aside)
            message = (f"checkpoint {path} is unreadable ({type(err).__name__}: {str(err)[:200]}); "
                       f"moved it to {aside.name} and resuming from the previous checkpoint, if any")
            log.warning(message)
            warnings.warn(message, stacklevel=2)
    return None


def _check_finite(tensors: Dict[str, torch.Tensor], file: Path) -> None:
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"{file}: tensor '{name}' holds NaN/Inf values")
