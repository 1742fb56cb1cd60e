"""Between-seed spread of the paper_tables comparisons: does a claim survive re-training?

Reads paper_tables_<budget>_seed<S>.json (`python benchmarks/paper_tables.py --budget B --seed S`:
GEM-3D and the baseline trained with seed S on the same phantoms and held-out cases) and prints,
per paired comparison (held-out PSNR dB), each seed's mean difference, the between-seed mean and
SD, and in how many seeds the 95 % t-interval (and the bootstrap CI) excludes 0, by direction;
then the same per distance bin from the informed slice.
No model is run, so it takes seconds.

  python benchmarks/seed_spread.py --budget default            # every seed's results found
  python benchmarks/seed_spread.py --budget paper64 --seeds 1 2 3

Writes seed_spread_<budget>.md / .json in --out-dir.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Dict, List

import numpy as np

ROOT = Path(__file__).resolve().parent


def excludes_zero(interval: List[float]) -> int:
    """+1 above 0, -1 below, 0 when the interval holds 0."""
    return 1 if interval[0] > 0 else -1 if interval[1] < 0 else 0


def spread(reports: Dict[int, dict], metric: str = "psnr") -> Dict[str, dict]:
    """Per comparison present in every seed's results: the seeds' means and the between-seed
    summary."""
    names = [n for n in next(iter(reports.values()))["paired_differences"]
             if all(n in r["paired_differences"] for r in reports.values())]
    out = {}
    for name in names:
        per_seed = {s: r["paired_differences"][name][metric] for s, r in reports.items()}
        means = np.array([d["mean"] for d in per_seed.values()])
        t_sides = [excludes_zero(d["t_ci95"]) for d in per_seed.values()]
        boot_sides = [excludes_zero(d["ci95"]) for d in per_seed.values()]
        out[name] = {"seeds": {str(s): d["mean"] for s, d in per_seed.items()},
                     "mean": float(means.mean()), "sd": float(means.std(ddof=1)) if len(means) > 1 else None,
                     "t_excludes_0": {"above": t_sides.count(1), "below": t_sides.count(-1)},
                     "bootstrap_excludes_0": {"above": boot_sides.count(1), "below": boot_sides.count(-1)},
                     "same_sign": int(max((means > 0).sum(), (means < 0).sum())), "n_seeds": len(means)}
    return out


def distance_spread(reports: Dict[int, dict]) -> List[dict]:
    """Per distance bin from the informed slice (`paper_tables.distance_profile`) and paired
    comparison: the seeds' mean differences, their mean and SD."""
    profiles = [r.get("distance") for r in reports.values()]
    if not all(profiles):
        return []
    out = []
    for k, row in enumerate(profiles[0]["bins"]):
        for name in row["paired"]:
            means = [p["bins"][k]["paired"][name]["mean"] for p in profiles if name in p["bins"][k]["paired"]]
            if len(means) == len(profiles):
                out.append({"fraction": row["fraction"], "slices": row["slices"], "comparison": name,
                            "seeds": means, "mean": float(np.mean(means)), "sd": float(np.std(means, ddof=1))})
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", default="default")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="Default: every seed's results found.")
    parser.add_argument("--results", type=Path, default=ROOT / "results")
    parser.add_argument("--out-dir", type=Path, default=ROOT / "results")
    args = parser.parse_args(argv)
    pattern = re.compile(rf"paper_tables_{re.escape(args.budget)}_seed(\d+)\.json$")
    found = {int(m.group(1)): p for p in args.results.glob(f"paper_tables_{args.budget}_seed*.json")
             if (m := pattern.search(p.name))} if args.seeds is None else \
        {s: args.results / f"paper_tables_{args.budget}_seed{s}.json" for s in args.seeds}
    missing = [str(p) for p in found.values() if not p.exists()]
    if len(found) < 2 or missing:
        raise SystemExit(f"seed_spread needs the results of at least two seeds of budget {args.budget!r} in "
                         f"{args.results}; missing: {missing or 'all but ' + str(len(found))}")
    reports = {s: json.loads(found[s].read_text()) for s in sorted(found)}
    rows = spread(reports)
    first = next(iter(reports.values()))
    seeds = list(reports)
    n = len(seeds)
    lines = [f"# Between-seed spread, budget `{args.budget}` ({n} seeds: {', '.join(map(str, seeds))})", "",
             f"`{' '.join(['python benchmarks/seed_spread.py'] + (argv if argv is not None else sys.argv[1:]))}` "
             f"over `paper_tables.py --budget {args.budget} --seed S`; machine of seed {seeds[0]}: "
             f"{first['machine']['cpu']}, {first['machine']['cores']} cores, torch {first['machine']['torch']}. "
             f"Held-out paired PSNR dB differences ({first['budget']['test']} cases per seed, the same cases and "
             "phantoms in every seed; only the training seed of GEM-3D and the baseline differs). "
             f"{len(rows)} comparisons.", "",
             "| comparison | " + " | ".join(f"seed {s}" for s in seeds)
             + " | between-seed mean | between-seed SD | seeds same sign | t 95 % excludes 0 (+/-) "
               "| bootstrap excludes 0 (+/-) |",
             "|---" * (6 + n) + "|"]
    for name, r in rows.items():
        sd = "-" if r["sd"] is None else f"{r['sd']:.3f}"
        lines.append(f"| {name} | " + " | ".join(f"{r['seeds'][str(s)]:+.3f}" for s in seeds)
                     + f" | {r['mean']:+.3f} | {sd} | {r['same_sign']}/{n} | "
                       f"{r['t_excludes_0']['above']}/{r['t_excludes_0']['below']} of {n} | "
                       f"{r['bootstrap_excludes_0']['above']}/{r['bootstrap_excludes_0']['below']} of {n} |")
    distance = distance_spread(reports)
    if distance:
        lines += ["", "PSNR by distance from the informed slice (`paper_tables.distance_profile`): each seed's "
                  "paired mean difference per bin, between-seed mean and SD.", "",
                  "| distance / window | slices | comparison | " + " | ".join(f"seed {s}" for s in seeds)
                  + " | mean | SD |", "|---" * (5 + n) + "|"]
        for r in distance:
            (lo, hi), (s0, s1) = r["fraction"], r["slices"]
            fraction = "0" if hi == 0 else f"> {lo:g}" if hi is None else f"({lo:g}, {hi:g}]"
            slices = f"{s0}" if s0 == s1 else f">= {s0}" if s1 is None else f"{s0}-{s1}"
            lines.append(f"| {fraction} | {slices} | {r['comparison']} | "
                         + " | ".join(f"{v:+.2f}" for v in r["seeds"]) + f" | {r['mean']:+.2f} | {r['sd']:.2f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / f"seed_spread_{args.budget}.md").write_text(text)
    result = {"budget": args.budget, "seeds": seeds, "files": [found[s].name for s in seeds], "comparisons": rows,
              "distance": distance}
    (args.out_dir / f"seed_spread_{args.budget}.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
