"""Sampling speed and memory of the GEM-3D engine, end to end (files in, files out).

Random weights (speed does not depend on them), a smooth random reference and a spherical
mask of Z slices. Measured per run: time to the first window event, seconds per volume,
model evaluations (UNet calls, and windows x steps), and peak memory: CUDA max allocated,
or on the CPU the peak RSS of this process during the run (VmHWM, reset through
/proc/self/clear_refs before each run). All comparisons are made in one run of this
script, on one machine, so their ratios are meaningful; absolute times only with the
machine named in the output.

  python benchmarks/speed.py                       # CPU, tiny config (64 px), Z = 32..300
  python benchmarks/speed.py --preset paper --size 512 --device cuda   # GPU, 512 x 512 x Z
  python benchmarks/speed.py --smoke --out-dir /tmp/speed              # seconds (CI)
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import sys
import tempfile
import time
from pathlib import Path

from gem3d import threads

threads.configure()  # the pools gem3d's commands use (gem3d.threads), before numpy and torch start them
import numpy as np  # noqa: E402
import torch  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent


def machine(device: torch.device) -> dict:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        found = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
        cpu = found.group(1).strip() if found else cpu
    return {"platform": platform.platform(), "python": platform.python_version(), "cpu": cpu,
            "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "load_average_1min": round(os.getloadavg()[0], 2)}  # other work on the machine skews timings


def random_bundle(preset: str, size: int, out: Path) -> Path:
    from gem3d import config
    from gem3d.bundle import save_bundle
    from gem3d.models import build_unet, build_vae

    cfg = config.preset(preset)
    cfg.data.slice_size = cfg.vae.sample_size = size
    torch.manual_seed(0)
    unet = build_unet(cfg)
    unet.add_volumetric_layers()
    return save_bundle(out / f"{preset}{size}", cfg, {"vae": build_vae(cfg), "unet": unet},
                       provenance={"command": "benchmarks/speed.py (random weights)"})


def write_case(folder: Path, slices: int, size: int, labels) -> tuple:
    """A smooth random reference (0..1000) and a sphere of nested labels, 1 mm voxels."""
    from scipy import ndimage

    from gem3d.io import write_volume
    from gem3d.volume import Geometry, Volume

    rng = np.random.default_rng(slices)
    image = ndimage.gaussian_filter(rng.standard_normal((slices, size, size)).astype(np.float32), 2)
    image = (image - image.min()) / np.ptp(image) * 1000
    z, y, x = np.ogrid[:slices, :size, :size]
    r = np.sqrt(((z - slices / 2) / (slices / 4)) ** 2 + ((y - size / 2) / (size / 4)) ** 2
                + ((x - size / 2) / (size / 4)) ** 2)
    mask = np.zeros(image.shape, np.int16)
    for value, radius in zip(sorted(labels), (1.0, 0.7, 0.4)):
        mask[r < radius] = value
    geometry = Geometry((1.0, 1.0, 1.0))
    ref = write_volume(Volume(image, geometry), folder / f"ref_{slices}.nii.gz", overwrite=True)
    msk = write_volume(Volume(mask, geometry), folder / f"mask_{slices}.nii.gz", overwrite=True)
    return str(ref), str(msk)


def _hwm_kib() -> int:
    return int(re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


@contextlib.contextmanager
def peak_memory(device: torch.device, record: dict):
    """record["peak_mib"]: CUDA max allocated, else peak RSS (``rss_reset``: whether the RSS
    peak could be reset first; if not, it is the process's lifetime peak)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    else:
        try:
            Path("/proc/self/clear_refs").write_text("5")
            record["rss_reset"] = True
        except OSError:
            record["rss_reset"] = False
    yield
    if device.type == "cuda":
        torch.cuda.synchronize()
        record["peak_mib"] = torch.cuda.max_memory_allocated(device) / 2 ** 20
    else:
        record["peak_mib"] = _hwm_kib() / 1024


def run_once(engine, ref: str, mask: str, out: Path, sampler: str, steps: int, batched: bool) -> dict:
    from gem3d.pipeline import Switches
    from gem3d.request import GenerateRequest

    calls = {"n": 0, "windows": 0}

    def count(module, args, output):
        calls["n"] += 1
        calls["windows"] += int(args[0].shape[0])

    request = GenerateRequest(reference=ref, mask=mask, out=str(out), start=0.5, sampler=sampler, steps=steps,
                              seed=0, overwrite=True, job_id="speed")
    hook = engine.bundle.unet.register_forward_hook(count)
    record, first, windows = {}, None, 0
    try:
        with peak_memory(engine.device, record):
            t0 = time.perf_counter()
            for event in engine.generate(request, switches=Switches(batch_directions=batched)):
                if event["event"] == "window":
                    windows += 1
                    first = first if first is not None else time.perf_counter() - t0
                elif event["event"] == "error":
                    raise RuntimeError(event["message"])
                elif event["event"] == "finished":
                    record["sample_s"] = event["timings"]["sample_decode"]
            if engine.device.type == "cuda":
                torch.cuda.synchronize()
            record["total_s"] = time.perf_counter() - t0
    finally:
        hook.remove()
    return {**record, "first_window_s": first, "windows": windows, "model_calls": calls["n"],
            "window_evals": calls["windows"]}


def plan(args, cuda: bool) -> list:
    """(name, Z, sampler, steps, batched, precision, compiled) of every run, in order."""
    fast, paper = ("dpm++", args.fast_steps), ("ddim", args.ddim_steps)
    mid = args.z[len(args.z) // 2]
    precision = "bf16" if cuda else "fp32"
    runs = [("z-sweep", z, *fast, True, precision, False) for z in args.z]
    runs += [("sequential", z, *fast, False, precision, False) for z in args.z]
    runs.append(("ddim", args.z[1 if len(args.z) > 1 else 0], *paper, True, precision, False))
    if cuda:
        runs.append(("fp32", mid, *fast, True, "fp32", False))
        runs.append(("compile", mid, *fast, True, precision, True))
    return runs


def table(rows: list) -> str:
    head = ("run", "Z", "sampler", "directions", "precision", "compile", "windows", "model calls",
            "window evals", "first window s", "total s", "peak MiB")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append("| " + " | ".join(str(v) for v in (
            r["name"], r["Z"], f"{r['sampler']}-{r['steps']}", "batched" if r["batched"] else "sequential",
            r["precision"], "on" if r["compiled"] else "off", r["windows"], r["model_calls"], r["window_evals"],
            f"{r['first_window_s']:.2f}", f"{r['total_s']:.2f}", f"{r['peak_mib']:.0f}")) + " |")
    return "\n".join(lines)


def ratios(rows: list, cuda: bool) -> list:
    """Comparisons within this run, as sentences."""
    def find(name, z=None):
        return next((r for r in rows if r["name"] == name and (z is None or r["Z"] == z)), None)

    out = []
    sweep = [r for r in rows if r["name"] == "z-sweep"]
    if len(sweep) > 1:
        a, b = sweep[0], sweep[-1]
        out.append(f"Memory vs Z: peak {a['peak_mib']:.0f} MiB at Z={a['Z']}, {b['peak_mib']:.0f} MiB at "
                   f"Z={b['Z']} (x{b['peak_mib'] / a['peak_mib']:.2f} for x{b['Z'] / a['Z']:.1f} slices); "
                   f"time x{b['total_s'] / a['total_s']:.2f}.")
    for r in sweep:
        s = find("sequential", r["Z"])
        if s:
            out.append(f"Z={r['Z']}: sequential / batched directions = {s['total_s'] / r['total_s']:.2f}x time, "
                       f"{s['model_calls'] / r['model_calls']:.2f}x model calls.")
    d = find("ddim")
    f = find("z-sweep", d["Z"]) if d else None
    if d and f:
        out.append(f"Z={d['Z']}: {d['sampler']}-{d['steps']} / {f['sampler']}-{f['steps']} = "
                   f"{d['total_s'] / f['total_s']:.1f}x time.")
    if cuda:
        for name, label in (("fp32", "fp32 / bf16"), ("compile", "torch.compile on / off")):
            r = find(name)
            base = find("z-sweep", r["Z"]) if r else None
            if r and base:
                out.append(f"Z={r['Z']}: {label} = {r['total_s'] / base['total_s']:.2f}x time, "
                           f"{r['peak_mib'] / base['peak_mib']:.2f}x peak memory.")
    else:
        out.append("fp32 vs bf16 and torch.compile on/off: GPU only, skipped on this CPU run.")
    return out


def plot(rows: list, path: Path) -> None:
    """Seconds per volume and peak memory against Z (batched and sequential directions)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(8, 3.2))
    for name, style in (("z-sweep", "o-"), ("sequential", "s--")):
        runs = [r for r in rows if r["name"] == name]
        label = "batched directions" if name == "z-sweep" else "sequential"
        ax_t.plot([r["Z"] for r in runs], [r["total_s"] for r in runs], style, label=label)
        ax_m.plot([r["Z"] for r in runs], [r["peak_mib"] for r in runs], style, label=label)
    ax_t.set(xlabel="slices Z", ylabel="seconds per volume", title="time vs Z")
    ax_m.set(xlabel="slices Z", ylabel="peak memory (MiB)", title="peak memory vs Z", ylim=(0, None))
    ax_t.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny", choices=("tiny", "small", "paper"))
    parser.add_argument("--size", type=int, default=None, help="Slice size (default: the preset's).")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--z", type=int, nargs="+", default=[32, 64, 155, 300])
    parser.add_argument("--fast-steps", type=int, default=20)
    parser.add_argument("--ddim-steps", type=int, default=200)
    parser.add_argument("--smoke", action="store_true", help="Tiny sizes that run in seconds (CI).")
    parser.add_argument("--out-dir", type=Path, default=ROOT / "results")
    parser.add_argument("--tag", default=None, help="Result file name: speed_<tag>.md/.json.")
    args = parser.parse_args(argv)
    if args.smoke:
        args.size, args.z, args.fast_steps, args.ddim_steps = 32, [16, 24], 1, 2

    from gem3d import config
    from gem3d.engine import Engine, resolve_device

    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    cfg = config.preset(args.preset)
    size = args.size or cfg.data.slice_size
    tag = args.tag or ("smoke" if args.smoke else f"{device.type}_{args.preset}{size}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="gem3d_speed_") as tmp:
        tmp = Path(tmp)
        engine = Engine(random_bundle(args.preset, size, tmp), str(device))
        cases = {z: write_case(tmp, z, size, cfg.data.labels) for z in sorted(set(args.z))}
        eager_unet, eager_autocast = engine.bundle.unet, engine.pipeline.autocast
        warmed = set()
        for name, z, sampler, steps, batched, precision, compiled in plan(args, cuda):
            engine.pipeline.autocast = eager_autocast if precision != "fp32" or not cuda else contextlib.nullcontext
            engine.bundle.unet = torch.compile(eager_unet) if compiled else eager_unet
            key = (precision, compiled, batched, z)
            if key not in warmed:  # lazy initialisation and compilation (batch shapes) stay out of the timings
                run_once(engine, *cases[z], tmp / "warm.nii.gz", sampler, 1, batched)
                warmed.add(key)
            result = run_once(engine, *cases[z], tmp / "out.nii.gz", sampler, steps, batched)
            row = {"name": name, "Z": z, "sampler": sampler, "steps": steps, "batched": batched,
                   "precision": precision, "compiled": compiled, **result}
            rows.append(row)
            print(f"{name:>10} Z={z:<4} {sampler}-{steps:<4} {'batched' if batched else 'sequential':<10} "
                  f"{precision} compile={compiled}: {row['total_s']:.2f} s, "
                  f"first window {row['first_window_s']:.2f} s, "
                  f"{row['model_calls']} calls, peak {row['peak_mib']:.0f} MiB", file=sys.stderr, flush=True)
    report = {"machine": machine(device), "preset": args.preset, "slice_size": size,
              "window": cfg.window_length, "weights": "random", "runs": rows, "ratios": ratios(rows, cuda),
              "command": "python benchmarks/speed.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    m = report["machine"]
    text = "\n".join([
        f"# Sampling speed: {args.preset} config, {size}x{size} slices, window {cfg.window_length}, random weights",
        "", f"Machine: {m['device']} | {m['cpu']}, {m['cores']} cores, {m['torch_threads']} torch threads | "
            f"{m['platform']} | Python {m['python']} | torch {m['torch']}",
        f"Command: `{report['command']}`", "", table(rows), "", *[f"- {line}" for line in report["ratios"]],
        "", "Peak memory: " + ("CUDA max allocated." if cuda else
                               "peak RSS of the whole process (model, libraries, volumes) during each run."), ""])
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / f"speed_{tag}.md").write_text(text)
    (args.out_dir / f"speed_{tag}.json").write_text(json.dumps(report, indent=2) + "\n")
    if not args.smoke:
        plot(rows, args.out_dir / f"speed_{tag}.png")
    print(text)
    return report


if __name__ == "__main__":
    main()
