"""benchmarks/gpu.sh: the paper-size GPU benchmark, rehearsed on the CPU at its smoke size (as CI runs it)."""
from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu.sh"


def gpu_sh(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHON=sys.executable)
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=600)


def load_module():
    spec = importlib.util.spec_from_file_location("gpu_speed", ROOT / "benchmarks" / "gpu_speed.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("gpu_speed", module)  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_bench")
    result = gpu_sh("--smoke", "--device", "cpu", "--official-windows", "2", "--out-dir", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((out / "gpu_rehearsal_cpu.json").read_text()), (out / "gpu_rehearsal_cpu.md").read_text()


def test_every_cpu_path_is_timed_and_compared_with_the_official_recipe(rehearsal):
    report, _ = rehearsal
    runs = report["runs"]
    assert list(runs) == ["ours-bf16", "ours-fp32", "official", "sequential", "whole-windows", "unipc", "ours-2Z",
                          "enhance-K2", "compile", "cuda-graphs"]
    timed = {name: r for name, r in runs.items() if "total_s" in r}
    assert set(timed) == set(runs) - {"compile", "cuda-graphs"}
    for name, r in timed.items():
        assert 0 < r["encode_s"] <= r["first_window_s"] <= r["total_s"], name
        assert math.isfinite(r["speedup_vs_official"]) and r["speedup_vs_official"] > 0, name
        assert r["peak_mib"] > 0 and r["volumes_per_min"] == pytest.approx(60 * r["cases"] / r["total_s"])
    # Z=20, window 8, start 0.5: windows 10:18, up 12:20, down 3:11 and 0:8 -> rounds of 1, 2, 1 windows
    ours, official = timed["ours-fp32"], timed["official"]
    assert (ours["windows"], ours["model_calls"], ours["window_evals"]) == (4, 3 * 2, 4 * 2)
    assert timed["sequential"]["model_calls"] == 4 * 2
    assert official["extrapolated"] and (official["windows"], official["plan_windows"]) == (2, 4)
    assert official["model_calls"] == 2 * 4 and official["eta"] == 1.0 and official["precision"] == "fp32"
    assert official["total_s"] > official["measured_s"]
    assert ours["decoded_slices"] == 20 and timed["whole-windows"]["decoded_slices"] == 4 * 8
    k2 = timed["enhance-K2"]
    assert k2["model_calls"] == ours["model_calls"] and k2["window_evals"] == 2 * ours["window_evals"]
    assert k2["decoded_slices"] == 2 * 20
    assert timed["ours-2Z"]["Z"] == 40
    assert "CUDA only" in runs["cuda-graphs"]["skipped"] and "--cpu-compile" in runs["compile"]["skipped"]


def test_quality_flops_and_machine_are_recorded(rehearsal):
    report, text = rehearsal
    quality = report["quality"]["bf16 vs fp32"]
    assert isinstance(quality, float) and 20 < quality < 200  # computed, not identical (activated weights)
    assert report["quality"]["compile vs eager"].startswith("not measured")
    flops = report["flops"]
    assert flops["unet_window_forward"] > 0 and flops["vae_decode_slice"] > flops["vae_encode_slice"] > 0
    assert report["parameters"]["unet"] > 0 and report["machine"]["cpu"] and report["machine"]["torch"]
    assert [c["batch"] for c in report["calibration"] if c["precision"] == "fp32"] == [1, 2, 4]  # K=2: 2 and 4
    vae = {(v["op"], v["precision"], v["chunk"], v["tiled"]) for v in report["vae"] if v.get("s", 0) > 0}
    assert ("decode", "fp32", 16, True) in vae and ("encode", "bf16", 16, False) in vae
    assert "Machine: no GPU: " in text and "| ours-fp32 | 20 | dpm++-2 | batched | fp32 | off | 1 | 4/4 | 6 |" in text
    assert "(extrapolated from 2/4 windows)" in text and "Quality, bf16 vs fp32: " in text
    assert "- compile: torch.compile on the CPU only" in text


def test_budget_guard_skips_and_stops():
    gpu_speed = load_module()
    assert gpu_speed.fits(3, cap_s=5, remaining_s=100) is None
    assert "its cap (5 s)" in gpu_speed.fits(10, cap_s=5, remaining_s=100)
    assert "the budget left (4 s)" in gpu_speed.fits(10, cap_s=50, remaining_s=4)
    t0 = time.perf_counter()
    with pytest.raises(gpu_speed.OverCap):
        with gpu_speed.time_limit(0.2):
            while True:
                time.sleep(0.01)
    assert time.perf_counter() - t0 < 2
    try:  # torch.compile re-raises what interrupts it inside its own error
        try:
            raise gpu_speed.OverCap()
        except gpu_speed.OverCap as err:
            raise RuntimeError("InternalTorchDynamoError") from err
    except RuntimeError as wrapped:
        assert gpu_speed.over_cap(wrapped) and not gpu_speed.over_cap(RuntimeError("other"))


def test_gpu_run_without_a_gpu_says_so():
    result = gpu_sh()
    assert result.returncode != 0 and "torch sees no CUDA GPU" in result.stderr
