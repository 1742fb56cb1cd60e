"""`evaluate`: one pass over a real and a synthetic dataset -> one report (dict), printed as a
table and written as JSON and CSV.

Distribution metrics (FID-A/C/S, consistency) compare all real with all synthetic cases;
with ``paired``, every synthetic case is also compared slice by slice with the real case
it was generated from (PSNR / SSIM / MS-SSIM); with a segmenter, mask adherence (Dice of
the segmentation of each synthetic image with its own conditioning mask, and of each real
image with its mask as the ceiling). Volumes are read one at a time.
"""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np

from gem3d.evaluation.adherence import PhantomBrainRule, Segmenter, dice_scores
from gem3d.evaluation.consistency import ConsistencyStats
from gem3d.evaluation.extractors import make_extractor
from gem3d.evaluation.frechet import FrechetPlanes
from gem3d.evaluation.metrics import ms_ssim_scales, paired_metrics
from gem3d import typed
from gem3d.datasets import open_dataset
from gem3d.outputs import write_text_atomically
from gem3d.evaluation.volumes import pair_cases, read_case, read_unit_case, to_unit, unit_range


def make_segmenter(spec: str, real_path) -> Optional[Segmenter]:
    """``none``, ``phantom-brain``, ``net:PATH`` (a saved SliceSegmenter), ``train[:STEPS]``
    (a SliceSegmenter trained here on the real dataset) or ``auto`` (the phantom rule when
    the real dataset is a gem3d brain-phantom dataset, else none)."""
    if spec == "none":
        return None
    if spec == "phantom-brain":
        return PhantomBrainRule()
    if spec.startswith("net:"):
        from gem3d.evaluation.segmenter import SliceSegmenter
        return SliceSegmenter.load(spec[4:])
    if spec == "train" or spec.startswith("train:"):
        from gem3d.evaluation.segmenter import train_segmenter
        dataset = open_dataset(real_path)
        cases = [read_unit_case(c) for c in dataset.cases if c.mask is not None]
        if not cases:
            raise ValueError(f"{real_path}: no case with a mask to train a segmenter on")
        steps = int(spec[6:]) if spec.startswith("train:") else 300
        return train_segmenter(cases, [v for v in dataset.label_map.values if v > 0], steps=steps)
    if spec == "auto":
        truths = sorted((Path(real_path) / "groundtruth").glob("*.json"))[:1]
        kind = typed.obj(typed.load_json(truths[0]), str(truths[0])).get("kind") if truths else None
        return PhantomBrainRule() if kind in ("brain", "mni") else None
    raise ValueError(f"unknown segmenter {spec!r}; use auto, none, phantom-brain, net:PATH or train[:STEPS]")


def _mean(rows: List[Dict[str, float]]) -> Dict[str, float]:
    return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]} if rows else {}


def evaluate(real, synthetic, paired: bool = False, extractor: str = "default", planes_per_volume: int = 32,
             segmenter: str = "auto", progress: Callable[[str], None] = lambda text: None) -> dict:
    real_set = open_dataset(real)
    real_cases, synthetic_cases = list(real_set.cases), list(open_dataset(synthetic).cases)
    labels = [v for v in real_set.label_map.values if v > 0]
    pairs = pair_cases(real_cases, synthetic_cases) if paired else [(c, None) for c in synthetic_cases]
    net = make_extractor(extractor)
    judge = make_segmenter(segmenter, real)
    fid, consistency = FrechetPlanes(net, planes_per_volume), ConsistencyStats()
    rows, real_dice, synthetic_dice, scales = [], [], [], set()

    for i, case in enumerate(real_cases, 1):
        progress(f"real {i}/{len(real_cases)} {case.case_id}")
        volume, mask = read_unit_case(case)
        fid.add("real", volume)
        consistency.add("real", volume)
        if judge is not None and mask is not None:
            real_dice.append(dice_scores(judge(volume), mask, labels))
    for i, (case, partner) in enumerate(pairs, 1):
        progress(f"synthetic {i}/{len(pairs)} {case.case_id}")
        image, mask = read_case(case)
        row = {"case": case.case_id}
        if partner is not None:
            truth, _ = read_case(partner)
            if truth.shape != image.shape:
                raise ValueError(f"{case.case_id} {image.shape} and its real case {partner.case_id} "
                                 f"{truth.shape} differ in shape; paired metrics need the same grid")
            value_range = unit_range(truth)
            scales.add(ms_ssim_scales(*truth.shape[1:]))
            row.update({"source": partner.case_id, **paired_metrics(to_unit(truth, value_range),
                                                                    to_unit(image, value_range))})
        volume = to_unit(image, unit_range(image))
        fid.add("synthetic", volume)
        consistency.add("synthetic", volume)
        if judge is not None and mask is not None:
            score = dice_scores(judge(volume), mask, labels)
            row.update({f"dice_{k}": v for k, v in score.items()})
            synthetic_dice.append(score)
        rows.append(row)

    report = {
        "real": {"path": str(real), "cases": len(real_cases)},
        "synthetic": {"path": str(synthetic), "cases": len(synthetic_cases)},
        "extractor": {"spec": extractor, "name": net.name, "dim": int(net.dim), "input_size": int(net.input_size),
                      "planes_per_volume": planes_per_volume},
        "fid": fid.distances(),
        "consistency": consistency.distances(),
        "paired": None,
        "adherence": None,
        "cases": rows,
    }
    if paired and rows:
        report["paired"] = {**_mean([{k: r[k] for k in ("psnr", "ssim", "ms_ssim")} for r in rows]),
                            "pairs": len(rows), "ms_ssim_scales": "/".join(map(str, sorted(scales)))}
    if judge is not None and synthetic_dice:
        report["adherence"] = {"segmenter": getattr(judge, "name", type(judge).__name__),
                               "synthetic": _mean(synthetic_dice), "real": _mean(real_dice)}
    return report


def table(report: dict) -> str:
    """The report as an aligned two-column text table."""
    lines = [("real", f"{report['real']['path']} ({report['real']['cases']} cases)"),
             ("synthetic", f"{report['synthetic']['path']} ({report['synthetic']['cases']} cases)"),
             ("extractor", f"{report['extractor']['name']} ({report['extractor']['dim']}-d; distances "
                           "comparable only within one extractor)")]
    lines += [(f"FID-{p[0].upper()} ({p})", f"{v:.4g}") for p, v in report["fid"].items()]
    lines += [(f"consistency {k}", f"{v:.4g}") for k, v in report["consistency"].items()]
    if report["paired"]:
        p = report["paired"]
        lines += [("PSNR (dB, axial pairs)", f"{p['psnr']:.2f}"), ("SSIM", f"{p['ssim']:.4f}"),
                  (f"MS-SSIM ({p['ms_ssim_scales']} scales)", f"{p['ms_ssim']:.4f}")]
    if report["adherence"]:
        a = report["adherence"]
        for k in a["synthetic"]:
            real = a["real"].get(k, float("nan"))
            lines.append((f"Dice {k} ({a['segmenter']})", f"{a['synthetic'][k]:.3f} (real: {real:.3f})"))
    width = max(len(k) for k, _ in lines)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in lines)


def _flat(report: dict):
    """(scope, case, metric, value) rows: dataset-level metrics, then per-case ones."""
    for group in ("fid", "consistency", "paired"):
        for k, v in (report[group] or {}).items():
            yield "dataset", "", f"{group}.{k}", v
    if report["adherence"]:
        for side in ("synthetic", "real"):
            for k, v in report["adherence"][side].items():
                yield "dataset", "", f"adherence.{side}.dice_{k}", v
    for row in report["cases"]:
        for k, v in row.items():
            if k not in ("case", "source"):
                yield "case", row["case"], k, v


def write_json(report: dict, path) -> None:
    write_text_atomically(path, json.dumps(report, indent=2) + "\n")


def write_csv(report: dict, path) -> None:
    text = io.StringIO(newline="")
    writer = csv.writer(text)
    writer.writerow(["scope", "case", "metric", "value"])
    writer.writerows(_flat(report))
    write_text_atomically(path, text.getvalue())
