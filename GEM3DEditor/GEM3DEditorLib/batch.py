"""Dataset enhancement and harmonisation: command lines of `gem3d enhance` / `gem3d harmonise`.

The engine plans and runs whole datasets itself (resumable: a killed run continues where it
stopped), so the module only starts the command (process.CommandRunner) and shows its progress.
"""
from __future__ import annotations

import os
from typing import List, Optional

MODES = ("enhance", "harmonize")


def batch_command(python: str, mode: str, dataset: str, out: str, bundle: Optional[str] = None,
                  times: int = 1, augment: bool = False, informed_scan: Optional[str] = None,
                  informed_slice: Optional[int] = None, informed_position: Optional[float] = None,
                  sampler: Optional[str] = None, steps: Optional[int] = None, seed: int = 0,
                  device: str = "auto") -> List[str]:
    """`python -m gem3d enhance|harmonize ...`; ValueError naming what is missing."""
    if mode not in MODES:
        raise ValueError(f"batch mode must be one of {MODES}, got {mode!r}")
    if not dataset or not os.path.isdir(dataset):
        raise ValueError(f"source dataset folder {dataset!r} does not exist")
    if not out:
        raise ValueError("choose an output folder for the synthetic dataset")
    if os.path.abspath(out) == os.path.abspath(dataset):
        raise ValueError("the output folder must differ from the source dataset")
    command = [python, "-m", "gem3d", mode, "--dataset", os.path.abspath(dataset),
               "--out", os.path.abspath(out)]
    if mode == "enhance":
        if int(times) < 1:
            raise ValueError(f"times must be at least 1, got {times}")
        command += ["--times", str(int(times))]
        if augment:
            command += ["--augment", "paper"]
    else:
        if not informed_scan or not os.path.isfile(informed_scan):
            raise ValueError(f"harmonisation needs the scan of the fixed informed slice; {informed_scan!r} "
                             "does not exist")
        command += ["--informed-from", os.path.abspath(informed_scan)]
        if informed_slice is not None:
            command += ["--informed-slice", str(int(informed_slice))]
        elif informed_position is not None:
            command += ["--informed-position", f"{float(informed_position):.6g}"]
    if bundle:
        command += ["--bundle", os.path.abspath(bundle)]
    if sampler:
        command += ["--sampler", sampler]
    if steps:
        command += ["--steps", str(int(steps))]
    command += ["--seed", str(int(seed)), "--device", device]
    return command
