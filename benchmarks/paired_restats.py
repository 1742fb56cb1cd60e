"""The paired statistics of committed `paper_tables` results, recomputed with three tests.

Reads each benchmarks/results/paper_tables_<budget>.json (its per-held-out-case PSNR, SSIM
and MS-SSIM), recomputes every paired comparison with `paper_tables.paired_differences`, and
prints mean, 95 % percentile-bootstrap CI, 95 % t-interval, cases ahead, exact sign-test p and
Wilcoxon signed-rank p. No model is run, so it takes seconds.

  python benchmarks/paired_restats.py                   # default, sites32, paper64

Writes paired_restats.md / .json in --out-dir. The number of comparisons per budget is
printed with each table: with k comparisons at 5 %, about 0.05 k false "CI excludes 0" are
expected by chance (Bonferroni: p < 0.05 / k).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
from paper_tables import paired_differences, paired_table  # noqa: E402  (one definition of the comparisons)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budgets", nargs="+", default=["default", "sites32", "paper64"])
    parser.add_argument("--results", type=Path, default=ROOT / "results")
    parser.add_argument("--out-dir", type=Path, default=ROOT / "results")
    args = parser.parse_args(argv)
    out, lines = {}, ["# Paired statistics of the committed paper_tables results, recomputed", "",
                      "`python benchmarks/paired_restats.py`: per held-out case, PSNR dB differences; "
                      "bootstrap = 95 % percentile bootstrap CI (2000 resamples, seed 0); t = 95 % t-interval; "
                      "sign = exact two-sided sign test; Wilcoxon = signed-rank test.", ""]
    for budget in args.budgets:
        path = args.results / f"paper_tables_{budget}.json"
        report = json.loads(path.read_text())
        if not isinstance(report["table2"]["GEM-3D"].get("cases"), dict) or not report["table2"]["GEM-3D"]["cases"]:
            lines += [f"{path.name}: no per-case values, skipped", ""]
            continue
        diffs = paired_differences(report)
        out[budget] = diffs
        n = next(iter(diffs.values()))["psnr"]["cases"]
        lines += [f"## {budget} ({n} held-out cases)", ""] + paired_table(diffs) + [""]
    text = "\n".join(lines)
    print(text)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "paired_restats.md").write_text(text)
    (args.out_dir / "paired_restats.json").write_text(json.dumps(out, indent=2) + "\n")
    return out


if __name__ == "__main__":
    main()
