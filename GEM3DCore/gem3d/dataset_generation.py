"""Whole-dataset generation: enhancement (K re-samples per case with other patients'
informed slices) and harmonisation (every case from one fixed informed slice).

The output is an nnU-Net raw dataset: `imagesTr/<id>_0000.nii.gz`, the masks that
were used in `labelsTr/<id>.nii.gz`, a provenance JSON per case in `provenance/`
and `dataset.json` (written at the end, listing the generated cases; not written when none
was). The source dataset is never written to: an output folder equal to it, inside it or
around it is refused. A case counts as done when its provenance file (written last,
atomically) and its image and mask read back complete, so an interrupted run resumes where it
stopped and redoes a half-written case; without `overwrite` an existing file is replaced only
when it is a gem3d synthetic output of that unfinished case. Under torchrun, jobs are sharded
by rank: job i belongs to rank i % world_size.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Optional

import numpy as np

from gem3d import typed
from gem3d.datasets import Dataset
from gem3d.io import read_description, read_volume
from gem3d.outputs import OutputError, write_text_atomically
from gem3d.request import GenerateRequest, InformedSpec


@dataclass(frozen=True)
class Job:
    out_id: str
    case_id: str
    request: GenerateRequest


def _request(case, out_dir: Path, out_id: str, informed: InformedSpec, seed: int, **options) -> GenerateRequest:
    return GenerateRequest(reference=str(case.image), mask=str(case.mask), job_id=out_id,
                           out=str(out_dir / "imagesTr" / f"{out_id}_0000.nii.gz"),
                           mask_out=str(out_dir / "labelsTr" / f"{out_id}.nii.gz"),
                           informed=informed, seed=seed, **options)


def check_output_folder(source: Path, out_dir: Path, overwrite: bool = False) -> None:
    """The output dataset must be separate from the source dataset, in both directions, and not
    another dataset: only a synthetic dataset of gem3d's is resumed (or replaced with --overwrite)."""
    source, out = Path(source).resolve(), Path(out_dir).resolve()
    if out == source or source in out.parents:
        raise OutputError(f"--out {out_dir} is inside the source dataset {source}, which is never written to; "
                          "choose an output folder outside it")
    if out in source.parents:
        raise OutputError(f"the source dataset {source} is inside --out {out_dir}; choose an output folder "
                          "that does not contain the source")
    meta = out / "dataset.json"
    if meta.exists() and not overwrite:
        try:
            synthetic = typed.obj(typed.load_json(meta), str(meta)).get("synthetic") is True
        except ValueError:
            synthetic = False
        if not synthetic:
            raise OutputError(f"--out {out_dir} holds a dataset that gem3d did not generate ({meta}); choose an "
                              "empty output folder, or allow replacing its files (--overwrite)")


def _labelled(dataset: Dataset):
    cases = [c for c in dataset.cases if c.mask is not None]
    if not cases:
        raise ValueError(f"{dataset.root}: no case has a mask; generation needs masks")
    return cases


def plan_enhance(dataset: Dataset, out_dir: Path, times: int, seed: int = 0, **options) -> List[Job]:
    """K re-samples of each case, each informed by a slice of another (seeded) case at the same
    normalised height, with a random start."""
    if times < 1:
        raise ValueError(f"--times must be at least 1, got {times}")
    cases = _labelled(dataset)
    if len(cases) < 2:
        raise ValueError("enhancement takes informed slices from other cases: it needs at least 2 cases")
    rng = np.random.default_rng(seed)
    jobs = []
    for i, case in enumerate(cases):
        for k in range(times):
            other = cases[(i + 1 + int(rng.integers(len(cases) - 1))) % len(cases)]
            out_id = f"{case.case_id}_syn{k:02d}"
            informed = InformedSpec("other", str(other.image))
            jobs.append(Job(out_id, case.case_id, _request(case, out_dir, out_id, informed,
                                                           int(rng.integers(2 ** 31)), **options)))
    return jobs


def plan_harmonize(dataset: Dataset, out_dir: Path, scan: str, slice_index: Optional[int],
                   position: Optional[float] = None, seed: int = 0, **options) -> List[Job]:
    """Every case generated from one fixed informed slice (dataset-level de-enhancement)."""
    informed = InformedSpec("fixed", str(scan), slice_index, position)
    return [Job(c.case_id, c.case_id, _request(c, out_dir, c.case_id, informed, seed + i, **options))
            for i, c in enumerate(_labelled(dataset))]


def provenance_file(out_dir: Path, job: Job) -> Path:
    return out_dir / "provenance" / f"{job.out_id}.json"


def outputs_of(out_dir: Path, job: Job) -> List[Path]:
    """The files a finished job leaves: image, mask, provenance."""
    return [Path(job.request.out), Path(job.request.mask_out), provenance_file(out_dir, job)]


def is_complete(out_dir: Path, job: Job) -> bool:
    """Provenance, image and mask present and readable in full (a killed run can leave a case
    with some of them)."""
    image, mask, record = outputs_of(out_dir, job)
    try:
        if not typed.obj(typed.load_json(record), str(record)).get("synthetic"):
            return False
        read_volume(image)
        read_volume(mask)
    except (OSError, ValueError):
        return False
    return True


def pending(jobs: List[Job], out_dir: Path, rank: int = 0, world_size: int = 1,
            overwrite: bool = False) -> List[Job]:
    """This rank's share of the jobs that are not done yet (all of them with `overwrite`)."""
    return [job for i, job in enumerate(jobs)
            if i % world_size == rank and (overwrite or not is_complete(out_dir, job))]


def _own_leftovers(job: Job) -> bool:
    """Every existing file of an unfinished job is a synthetic output of gem3d (safe to redo)."""
    from gem3d.io import provenance_path

    for path in (Path(job.request.out), Path(job.request.mask_out)):
        try:
            if path.exists() and not (read_description(path) or "").startswith("SYNTHETIC"):
                return False
        except ValueError:  # unreadable: a partial write of ours would be a hidden temp file
            return False
    sidecar = provenance_path(job.request.out)
    try:
        return not sidecar.exists() or bool(typed.obj(typed.load_json(sidecar), str(sidecar)).get("synthetic"))
    except (OSError, ValueError):
        return False


def run_jobs(engine, jobs: List[Job], out_dir: Path) -> Iterator[tuple]:
    """Run jobs one by one; yields (job, finished-or-error event). Provenance moves to provenance/."""
    from gem3d.io import provenance_path

    for folder in ("imagesTr", "labelsTr", "provenance"):
        (out_dir / folder).mkdir(parents=True, exist_ok=True)
    for job in jobs:
        last = None
        request = job.request if job.request.overwrite or not _own_leftovers(job) else \
            dataclasses.replace(job.request, overwrite=True)
        for event in engine.generate(request):
            last = event
        if last is not None and last["event"] == "finished":
            os.replace(provenance_path(job.request.out), provenance_file(out_dir, job))
        yield job, last


def write_dataset_json(out_dir: Path, source: Dataset, modality: str, jobs: List[Job], kind: str) -> Optional[dict]:
    """nnU-Net's dataset.json listing the generated cases, each marked synthetic; None (and no
    file) when no case was generated."""
    done = [job for job in jobs if is_complete(out_dir, job)]
    if not done:
        return None
    labels = {"background": 0, **{name: value for value, name in source.label_map.names.items()}}
    info = {"channel_names": {"0": "CT" if modality == "ct" else "FLAIR"}, "labels": labels,
            "numTraining": len(done), "file_ending": ".nii.gz", "synthetic": True,
            "description": f"SYNTHETIC dataset: GEM-3D {kind} of {source.root} ({len(done)} of "
                           f"{len(jobs)} cases generated); not patient data",
            "training": [{"image": f"./imagesTr/{Path(job.request.out).name}",
                          "label": f"./labelsTr/{Path(job.request.mask_out).name}",
                          "source_case": job.case_id, "synthetic": True} for job in done]}
    write_text_atomically(out_dir / "dataset.json", json.dumps(info, indent=2) + "\n")
    return info
