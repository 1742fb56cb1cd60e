"""How much do phantom patients and sites differ once each volume is normalised?

The informed slice can only carry a patient prior if patients differ after the model's
per-volume normalisation. Per tissue this prints the mean normalised intensity's spread
(standard deviation on the [-1, 1] scale) across cases, across sites (site means, case i
at site i % SITES; without sites the same grouping shows what chance alone gives) and,
for scale, within a case; for the default phantoms and for `--sites`.

  python benchmarks/phantom_variation.py                   # 24 cases, 4 sites, 48x48x24
  python benchmarks/phantom_variation.py --cases 8 --size 32 --slices 16   # seconds

MR volumes are normalised per volume (min-max, the default `data.normalisation`); CT
with the fixed HU window [-1000, 1000] (`data.hu_window`), so CT spreads are HU / 1000.
Writes phantom_variation.md / .json in --out-dir.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Dict

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
from speed import machine  # noqa: E402  (one definition of "the machine")

PURE = 0.95                                 # tissue fraction for a voxel to count as that tissue
REGIONS = {
    "brain": {"white matter": ("tissue", "wm"), "grey matter": ("tissue", "gm"),
              "CSF": ("tissue", ("csf", "ventricle")), "edema (2)": ("label", 2), "enhancing (4)": ("label", 4),
              "necrosis (1)": ("label", 1)},
    "abdomen": {"liver (1)": ("label", 1), "kidney (2)": ("label", 2), "spleen (3)": ("label", 3),
                "pancreas (4)": ("label", 4), "fat": ("tissue", "fat"), "muscle": ("tissue", "muscle"),
                "aorta/IVC": ("tissue", "vessel")},
}


def normaliser(kind: str):
    from gem3d.config import DataConfig
    from gem3d.intensity import make_normaliser

    data = DataConfig()
    if kind == "abdomen":
        low, high = data.hu_window
        return make_normaliser({"kind": "ct_window", "low": low, "high": high})
    return make_normaliser({"kind": data.normalisation})


def case_means(kind: str, cases: int, size: int, slices: int, sites: int, groups: int, seed: int = 0):
    """Per case: its site (or group i % groups) and {region: (mean, sd)} of the normalised
    intensities."""
    from gem3d import phantom

    norm = normaliser(kind)
    rows = []
    for index in range(cases):
        image, labels, truth = phantom.make_case(kind, seed, index, size, slices, sites=sites)
        tissue = phantom.build_anatomy(kind, truth["patient"], image.shape, image.geometry.spacing)
        x = norm.forward(image.array, norm.fit(image.array))
        healthy = labels.array == 0
        stats = {}
        for region, (source, key) in REGIONS[kind].items():
            if source == "label":
                where = labels.array == key
            else:
                where = healthy & (sum(tissue[k] for k in np.atleast_1d(key)) > PURE)
            if where.sum() >= 5:
                stats[region] = (float(x[where].mean()), float(x[where].std()))
        rows.append((truth.get("site", index % groups), stats))
    return rows


def spread(rows, groups: int) -> Dict[str, dict]:
    """Across-case sd, across-site sd (of the group means), within-case sd, per region."""
    out = {}
    for region in rows[0][1]:
        means = np.array([s[region][0] for _, s in rows if region in s])
        within = np.array([s[region][1] for _, s in rows if region in s])
        site = np.array([g for g, s in rows if region in s])
        site_means = [means[site == g].mean() for g in range(groups) if (site == g).any()]
        out[region] = {"mean": float(means.mean()), "across_cases": float(means.std(ddof=1)),
                       "across_sites": float(np.std(site_means, ddof=1)) if len(site_means) > 1 else 0.0,
                       "within_case": float(within.mean()), "cases": int(len(means))}
    return out


def measure(kind: str, cases: int, size: int, slices: int, sites: int) -> dict:
    return {mode: spread(case_means(kind, cases, size, slices, k, sites), sites)
            for mode, k in (("default", 0), (f"sites={sites}", sites))}


def markdown(report: dict) -> str:
    a = report["args"]
    lines = ["# Phantom variation after per-volume normalisation", "",
             f"Machine: {report['machine']['cpu']}, {report['machine']['cores']} cores; {a['cases']} cases per kind, "
             f"{a['size']}x{a['size']}x{a['slices']}, "
             f"seed 0; sites: case i at site i % {a['sites']} (default phantoms grouped the same way). "
             f"Standard deviations on the [-1, 1] scale; {report['wall_s']:.0f} s.", ""]
    for kind, modes in report["kinds"].items():
        names = list(modes)
        lines += [f"## {kind} ({'min-max per volume' if kind != 'abdomen' else 'HU window [-1000, 1000]'})", "",
                  "| tissue | " + " | ".join(f"{n}: across cases | {n}: across sites" for n in names)
                  + " | within a case (default) |",
                  "|---|" + "---|---|" * len(names) + "---|"]
        for region in modes[names[0]]:
            cells = []
            for n in names:
                r = modes[n].get(region)
                cells += [f"{r['across_cases']:.3f}", f"{r['across_sites']:.3f}"] if r else ["n/a", "n/a"]
            lines.append(f"| {region} | " + " | ".join(cells) + f" | {modes[names[0]][region]['within_case']:.3f} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=24)
    parser.add_argument("--sites", type=int, default=4)
    parser.add_argument("--size", type=int, default=48)
    parser.add_argument("--slices", type=int, default=24)
    parser.add_argument("--kinds", nargs="+", default=["brain", "abdomen"], choices=sorted(REGIONS))
    parser.add_argument("--out-dir", type=Path, default=ROOT / "results")
    args = parser.parse_args(argv)
    began = time.perf_counter()
    report = {"args": {k: v for k, v in vars(args).items() if k != "out_dir"},
              "machine": machine(torch.device("cpu")),
              "kinds": {kind: measure(kind, args.cases, args.size, args.slices, args.sites) for kind in args.kinds}}
    report["wall_s"] = time.perf_counter() - began
    text = markdown(report)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "phantom_variation.md").write_text(text)
    (args.out_dir / "phantom_variation.json").write_text(json.dumps(report, indent=1) + "\n")
    print(text)
    return report


if __name__ == "__main__":
    sys.exit(main() and 0)
