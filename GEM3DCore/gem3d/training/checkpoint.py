"""Training checkpoints: `checkpoints/<stage>/step_XXXXXXXX/` holding

- model.safetensors  the stage's network (current weights)
- ema.safetensors    the EMA of its trainable parameters, by parameter name
- state.pt           optimiser, LR schedule, step, EMA counters, smoothed loss, wall time

Everything loads with `weights_only=True` (no pickle executed). A checkpoint folder is
written under a temporary name and renamed, so a killed run never leaves a half
checkpoint that resume would pick; the two newest are kept.
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
from safetensors.torch import load_file, save_file

from gem3d.bundle import cpu_tensors

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
