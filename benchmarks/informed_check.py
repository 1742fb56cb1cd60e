"""Does a bundle use its informed slice? Swap it for a case of another site and measure.

Multi-site phantom brains (`gem3d phantom --sites`); each case is generated twice from its own
mask, with its own informed slice and with one from the next case of another site. Per tissue
(healthy white / grey matter, min-max normalised means) the output's change is regressed on
the informed case's difference: slope 0 = the model ignores its informed slice, 1 = the
output takes the other site's contrast fully (`paper_tables.informed_check`).

  python benchmarks/informed_check.py                       # the shipped demo bundle, 8 cases
  python benchmarks/informed_check.py --bundle B --cases 4  # any bundle

Writes informed_check_<bundle>.md / .json in --out-dir.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
from paper_tables import generate_set, informed_check  # noqa: E402  (one definition of the check)
from speed import machine  # noqa: E402


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, default=None, help="Default: the shipped demo bundle.")
    parser.add_argument("--cases", type=int, default=8)
    parser.add_argument("--sites", type=int, default=4)
    parser.add_argument("--out-dir", type=Path, default=ROOT / "results")
    parser.add_argument("--work", type=Path, default=None)
    args = parser.parse_args(argv)
    from gem3d import phantom
    from gem3d.bundle_format import DEMO_BUNDLE
    from gem3d.datasets import open_dataset
    from gem3d.engine import Engine
    from gem3d.request import InformedSpec

    engine = Engine(args.bundle or DEMO_BUNDLE, "cpu")
    name = engine.bundle.path.name
    work = args.work or Path(tempfile.mkdtemp(prefix="gem3d_informed_check_"))
    data = work / "data"
    slices = 2 * engine.bundle.window_length + 8
    if not (data / "dataset.json").exists():
        phantom.write_dataset(data, "brain", args.cases, size=engine.bundle.slice_size, slices=slices, seed=2,
                              sites=args.sites)
    cases = open_dataset(data).cases
    site = {c.case_id: json.loads((data / "groundtruth" / f"{c.case_id}.json").read_text())["site"]
            for c in cases}
    partner = {c.case_id: next(o for o in cases[i + 1:] + cases[:i] if site[o.case_id] != site[c.case_id])
               for i, c in enumerate(cases)}
    same = work / "same"
    other = work / "other_site"
    sampler = (None, None)                                  # the bundle's default sampler and steps
    for folder, informed in ((same, lambda i, c: InformedSpec("same")),
                             (other, lambda i, c: InformedSpec("other", str(partner[c.case_id].image)))):
        if not (folder / "dataset.json").exists():
            generate_set(engine, cases, folder, informed, sampler, seed=0)
    result = informed_check(data, same, other, {k: v.case_id for k, v in partner.items()})
    report = {"bundle": str(engine.bundle.path), "cases": args.cases, "sites": args.sites,
              "grid": [engine.bundle.slice_size, slices], "machine": machine(torch.device("cpu")), "check": result}
    lines = [f"# Informed-slice check: {name}", "",
             f"{args.cases} phantom brains at {args.sites} sites, {engine.bundle.slice_size}x{engine.bundle.slice_size}"
             f"x{slices}; informed slice: own vs the next case of another site; the bundle's default sampler.", "",
             "| tissue | slope (0 ignored, 1 carried) | mean abs difference of the informed cases | "
             "mean abs change of the output [95 % CI] | same direction |", "|---|---|---|---|---|"]
    for t, r in result.items():
        ci = r["abs_d_out"]["ci95"]
        lines.append(f"| {t} | {r['slope']:+.2f} | {r['mean_abs_d_in']:.3f} | {r['mean_abs_d_out']:.3f} "
                     f"[{ci[0]:.3f}, {ci[1]:.3f}] | {r['same_sign']}/{r['cases']} |")
    text = "\n".join(lines) + "\n"
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / f"informed_check_{name}.md").write_text(text)
    (args.out_dir / f"informed_check_{name}.json").write_text(json.dumps(report, indent=1) + "\n")
    print(text)
    return report


if __name__ == "__main__":
    main()
