"""The benchmark scripts run at their smoke sizes and write their tables (as CI runs them)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(script: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], capture_output=True,
                          text=True, env=env, timeout=600)


def test_speed_smoke_writes_its_table(tmp_path):
    result = run("speed.py", "--smoke", "--out-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "speed_smoke.json").read_text())
    names = [(r["name"], r["Z"]) for r in report["runs"]]
    assert names == [("z-sweep", 16), ("z-sweep", 24), ("sequential", 16), ("sequential", 24), ("ddim", 24)]
    batched, sequential = report["runs"][1], report["runs"][3]
    # Z=24, window 8, start 0.5: windows 12:20, up 16:24, down 5:13 and 0:8; batched -> 3 rounds
    assert (batched["windows"], sequential["windows"]) == (4, 4)
    assert (batched["model_calls"], sequential["model_calls"]) == (3 * 1, 4 * 1)
    assert report["machine"]["cores"] and report["machine"]["torch"]
    table = (tmp_path / "speed_smoke.md").read_text()
    assert "| z-sweep | 24 | dpm++-1 | batched |" in table and "skipped on this CPU run" in table


def test_paper_tables_quick_writes_its_tables(tmp_path):
    from gem3d.evaluation.volumes import source_id

    result = run("paper_tables.py", "--quick", "--out-dir", str(tmp_path), "--work", str(tmp_path / "work"))
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "paper_tables_quick.json").read_text())
    assert set(report["table1"]) == {"ic", "icma", "ig", "igma", "baseline"}
    assert set(report["table2"]) == {"GEM-3D", "baseline"}
    assert set(report["samplers"]) == {"ddim-3", "ddim-3-eta1", "dpm++-2", "unipc-2"}
    assert report["downstream"]["GEM-3D 3x"]["training_volumes"] == 3 * report["budget"]["train"]
    assert 0 < report["table2"]["GEM-3D"]["paired"]["psnr"] < 100
    text = (tmp_path / "paper_tables_quick.md").read_text()
    assert "## Table 2 analogue" in text and "## Downstream" in text
    diff = report["paired_differences"]["GEM-3D - baseline"]["psnr"]
    assert diff["cases"] == report["budget"]["test"] and 0 <= diff["ahead"] <= diff["cases"]
    assert diff["ci95"][0] <= diff["mean"] <= diff["ci95"][1] and 0 < diff["sign_p"] <= 1
    t2 = report["table2"]
    assert abs(diff["mean"] - (t2["GEM-3D"]["paired"]["psnr"] - t2["baseline"]["paired"]["psnr"])) < 1e-9
    assert "| GEM-3D - baseline | " in text and "p " in text
    # the multi-site testbed: informed slice from the same case / site / another site / the slice model,
    # the contrast check on the other-site swap, and harmonisation's across-site spread before and after
    assert set(report["informed"]) == {"same case", "another patient, same site", "another site", "slice model",
                                       "another site, kept for every window"}
    assert set(report["informed_check"]) == {"chained (default)", "kept for every window"}
    check = report["informed_check"]["chained (default)"]["wm"]
    assert check["cases"] == report["budget"]["test"] and check["mean_abs_d_in"] > 0
    assert set(report["harmonisation"]) == {"before", "after", "dice_before", "dice_after", "anatomy"}
    anatomy = {k: v["mean"] for k, v in report["harmonisation"]["anatomy"].items()}
    assert anatomy["real (ceiling)"] > anatomy["another patient's real scan (floor)"] + 0.1, anatomy
    assert report["harmonisation"]["before"]["wm_across_sites"] > 0
    assert "## Informed slice" in text and "## Harmonisation" in text
    # the informed slice's gain against a baseline calibrated on the informed slice, and by distance from it
    assert set(report["calibrated"]) == {"calibrated baseline", "tissue-calibrated baseline (oracle)"}
    assert f"{len(report['paired_differences'])} comparisons" in text and "Wilcoxon p" in text
    for name in ("GEM-3D - calibrated baseline", "another patient, same site - calibrated baseline",
                 "calibrated baseline - baseline"):
        d = report["paired_differences"][name]["psnr"]
        assert d["cases"] == report["budget"]["test"] and d["t_ci95"][0] <= d["mean"] <= d["t_ci95"][1]
        assert 0 < d["wilcoxon_p"] <= 1 and 0 < d["sign_p"] <= 1
    work = tmp_path / "work" / "synthetic"
    window, slices = report["budget"]["window"], report["budget"]["slices"]
    for image in sorted((work / "test_gem3d" / "imagesTr").glob("*_0000.nii.gz")):   # informed_z is the slice used
        record = json.loads(image.with_name(image.name.replace("_0000.nii.gz", "_0000.provenance.json")).read_text())
        assert record["informed_slice"]["model_index"] == record["start_slice"] + window // 2
        calibrated = json.loads((work / "test_baseline_intensity_calibrated" / "imagesTr" / image.name.replace(
            "_0000.nii.gz", "_0000.provenance.json")).read_text())
        assert calibrated["calibration"]["fitted_on_scan_index"] == record["informed_slice"]["scan_index"]
    bins = report["distance"]["bins"]
    sets = {"GEM-3D, same case", "GEM-3D, another patient", "baseline", "calibrated baseline",
            "tissue-calibrated baseline (oracle)"}
    for name in sets:       # every slice of every case in exactly one bin
        assert sum(row["slices_counted"][name] for row in bins) == slices * report["budget"]["test"]
    informed = bins[0]      # the informed slice itself, one per case: the calibration was fitted there
    assert informed["fraction"] == [None, 0.0] and informed["slices_counted"]["baseline"] == report["budget"]["test"]
    for case, raw in informed["cases"]["baseline"].items():
        assert informed["cases"]["calibrated baseline"][case] >= raw
    for name in sets:       # the bins' slice-weighted means give back each set's Table 2 PSNR
        scored = {**report["table2"], **report["calibrated"], "GEM-3D, same case": report["table2"]["GEM-3D"],
                  "GEM-3D, another patient": report["informed"]["another patient, same site"]}[name]
        for case, row in scored["cases"].items():
            case = source_id(case)
            psnr = sum(b["cases"][name][case] * b["case_slices"][name][case] for b in bins if case in b["cases"][name])
            assert psnr / slices == pytest.approx(row["psnr"], abs=1e-6)
    assert "## Is the informed slice's gain only contrast?" in text and "PSNR by distance" in text
    for suffix in ("montage", "table1", "samplers", "downstream", "distance"):
        assert (tmp_path / f"paper_tables_quick_{suffix}.png").stat().st_size > 1000
    # resumable by stage: a second run re-uses every stage's results instead of redoing them
    done = tmp_path / "work" / "synthetic" / "test_gem3d.done.json"
    stamp = done.stat().st_mtime_ns
    again = run("paper_tables.py", "--quick", "--stage", "generate", "--out-dir", str(tmp_path),
                "--work", str(tmp_path / "work"), "--samplers", "dpm++-2", "ddim-3-eta1")
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((tmp_path / "work" / "budget.json").read_text())["samplers"] == [["dpm++", 2], ["ddim", 3, 1.0]]
    bad = run("paper_tables.py", "--quick", "--samplers", "ddim-fast", "--work", str(tmp_path / "work"))
    assert bad.returncode == 2 and "is not a sampler like dpm++-20" in bad.stderr
    assert done.stat().st_mtime_ns == stamp and "generated test_gem3d" in again.stderr
    other_seed = run("paper_tables.py", "--quick", "--seed", "1", "--stage", "data", "--work", str(tmp_path / "work"))
    assert other_seed.returncode != 0 and "another budget or seed" in other_seed.stderr


@pytest.mark.slow
def test_demo_bundle_recipe_runs_end_to_end(tmp_path):
    """benchmarks/train_demo_bundle.sh --smoke: phantoms -> torchrun train all (2 processes) ->
    a loadable bundle whose provenance names the recipe (2 steps per stage: the pipeline, not
    the model; Testing/test_demo.py checks what the shipped bundle learned)."""
    from gem3d.bundle import load_bundle

    env = dict(os.environ, HF_HUB_OFFLINE="1", PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
               TMPDIR=str(tmp_path))  # torchrun's logs stay with the test
    result = subprocess.run(["bash", str(ROOT / "benchmarks" / "train_demo_bundle.sh"), str(tmp_path), "--smoke"],
                            capture_output=True, text=True, env=env, timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    bundle = load_bundle(tmp_path / "run" / "bundle", "cpu")
    stages = bundle.info["provenance"]["stages"]
    assert [stages[s]["steps"] for s in ("vae", "stage1", "stage2", "slice")] == [2, 2, 2, 2]
    assert "dataset_command=gem3d phantom --kind brain" in bundle.info["provenance"]["command"]
    assert "final loss" in (tmp_path / "train_demo_bundle.txt").read_text()


@pytest.mark.slow   # ~1 min on 2 shared cores
def test_stripes_smoke_writes_its_table_and_montage(tmp_path):
    result = run("stripes.py", "--smoke", "--out-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads((tmp_path / "stripes_demo_bundle_smoke.json").read_text())["rows"]
    assert rows["real scan"]["ratio"] == 1.0
    vae = rows["VAE round trip of the real scan (per-slice decoding)"]["ratio"]
    assert rows["VAE round trip + the bundle's through-plane filter"]["ratio"] < vae
    before, product = (rows[k] for k in ("before the fix: DPM++ 20, known frames fixed noise",
                                         "product: DPM++ 20 + the bundle's through-plane filter"))
    assert 0.5 < product["ratio"] < before["ratio"] < 3 and product["psnr"] > 15
    assert (tmp_path / "stripes_demo_bundle_smoke_montage.png").stat().st_size > 1000


@pytest.mark.slow   # ~1 min on 2 shared cores
def test_harmonise_strength_smoke_lowers_site_spread_with_strength(tmp_path):
    result = run("harmonise_strength.py", "--smoke", "--out-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads((tmp_path / "harmonise_strength_demo_bundle_smoke.json").read_text())["rows"]
    low, full = rows["harmonised, strength 0.25"], rows["harmonised, strength 1.0"]
    assert full["wm_across_sites"] < low["wm_across_sites"] < rows["real scans (before)"]["wm_across_sites"]


def test_paired_restats_recomputes_the_committed_means(tmp_path):
    result = run("paired_restats.py", "--out-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    restats = json.loads((tmp_path / "paired_restats.json").read_text())
    committed = json.loads((ROOT / "benchmarks" / "results" / "paper_tables_paper64.json").read_text())
    for name, diff in committed["paired_differences"].items():
        new = restats["paper64"][name]["psnr"]
        assert new["mean"] == pytest.approx(diff["psnr"]["mean"], abs=1e-9)
        assert new["ci95"] == pytest.approx(diff["psnr"]["ci95"], abs=1e-9)
        assert new["t_ci95"][0] < new["mean"] < new["t_ci95"][1] and 0 < new["wilcoxon_p"] <= 1


def test_web_smoke_writes_its_table(tmp_path):
    result = run("web.py", "--smoke", "--out-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "web_smoke.json").read_text())
    row = report["runs"][0]
    assert row["engine"] == "local worker" and report["machine"]["cores"]
    assert 0 < row["first_window_warm_s"] < row["first_window_cold_s"]
    assert 0 < row["empty_session_mb"] < row["idle_session_mb"] < row["active_session_mb"]
    assert "| local worker |" in (tmp_path / "web_smoke.md").read_text()


def test_seed_spread_summarises_the_seeds_results(tmp_path):
    def result(seed, means):
        return {"machine": {"cpu": "test CPU", "cores": 2, "torch": "2"}, "budget": {"test": 6},
                "paired_differences": {name: {"psnr": {"mean": m, "t_ci95": [m - w, m + w],
                                                       "ci95": [m - w / 2, m + w / 2]}}
                                       for name, (m, w) in means.items()},
                "distance": {"bins": [{"fraction": [None, 0.0], "slices": [0, 0],
                                       "paired": {"x - y": {"mean": float(seed)}}}]}}

    seeds = {1: {"a - b": (1.0, 0.5), "c - d": (0.2, 0.5)}, 2: {"a - b": (2.0, 0.5), "c - d": (-0.3, 0.2)},
             3: {"a - b": (3.0, 3.5), "c - d": (0.4, 0.3), "only seed 3": (1.0, 0.1)}}
    for seed, means in seeds.items():
        (tmp_path / f"paper_tables_default_seed{seed}.json").write_text(json.dumps(result(seed, means)))
    (tmp_path / "paper_tables_sites32_seed4.json").write_text(json.dumps(result(4, seeds[1])))   # another budget
    done = run("seed_spread.py", "--budget", "default", "--results", str(tmp_path), "--out-dir", str(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads((tmp_path / "seed_spread_default.json").read_text())["comparisons"]
    assert set(rows) == {"a - b", "c - d"}          # only comparisons every seed has
    assert rows["a - b"]["mean"] == pytest.approx(2.0) and rows["a - b"]["sd"] == pytest.approx(1.0)
    assert rows["a - b"]["t_excludes_0"] == {"above": 2, "below": 0}          # seed 3: t [-0.5, 6.5] holds 0
    assert rows["a - b"]["bootstrap_excludes_0"] == {"above": 3, "below": 0}
    assert rows["c - d"]["t_excludes_0"] == {"above": 1, "below": 1} and rows["c - d"]["same_sign"] == 2
    table = (tmp_path / "seed_spread_default.md").read_text()
    assert "| a - b | +1.000 | +2.000 | +3.000 | +2.000 | 1.000 | 3/3 |" in table
    assert "| 0 | 0 | x - y | +1.00 | +2.00 | +3.00 | +2.00 | 1.00 |" in table      # by distance, per bin
    one = run("seed_spread.py", "--budget", "sites32", "--results", str(tmp_path), "--out-dir", str(tmp_path))
    assert one.returncode != 0 and "at least two seeds" in one.stderr
