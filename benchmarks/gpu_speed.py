"""Paper-size speed and memory on one GPU, beside the official recipe, in one run (issue 14).

Builds the paper architecture (`paper` preset, configs/paper_brain.yaml: the 368 M-parameter
volume UNet with its volumetric layers and the kl-f8 VAE) with random weights, nothing
downloaded, and times the in-memory pipeline of one volume of Z slices: mask and informed
slice VAE-encoded, windows propagated, each window decoded as soon as it is done and copied
to the host (the engine's streaming path; reading, resampling and writing files are
`benchmarks/speed.py`'s part). Measured in the same run: the official recipe (DDIM-200,
eta 1, the two directions one after the other, fp32); ours (DPM-Solver++-20, directions
batched) in fp32 and bf16; torch.compile (its compile time apart); CUDA graphs
(torch.compile mode="reduce-overhead", CUDA only); UniPC-10; sequential directions;
decoding whole windows vs only their new slices; Z and 2Z (peak memory flat in Z); VAE
encode/decode chunk sizes and tiling; dataset-enhancement throughput with K re-samplings of
a case batched into every forward pass (gem3d.sampling.cases); UNet and VAE FLOPs counted
on the meta device; PSNR of bf16 (and compiled) vs fp32 output with the same seed.

Budget guard: the run has a budget (--budget-s, default 450 s; gpu.sh adds a hard
480 s timeout) and every measurement a cap. A case whose estimate (calibrated model calls
and VAE rates) does not fit is skipped with a line saying so; the official recipe, if it does
not fit whole, is timed on its first windows and extrapolated (marked so); a case that runs
past its cap is stopped there. Results are rewritten after every row, so even a killed run
leaves its table.

  bash benchmarks/gpu.sh                                     # one H100/H200, <= 8 min
  python benchmarks/gpu_speed.py --smoke --device cpu        # seconds, tiny config (CI)
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
from speed import machine, peak_memory  # noqa: E402

from gem3d import config  # noqa: E402
from gem3d.models import build_unet, build_vae, decode_latents, encode_masks, encode_slices, volume_condition  # noqa: E402
from gem3d.sampling import plan_windows, scheduler_factory, start_slice  # noqa: E402
from gem3d.sampling.cases import propagate_cases  # noqa: E402

START = 0.5  # start position p of every run: the first window in the middle of the volume
RESERVE_S = 5.0  # kept back from the budget for writing the results


@dataclass(frozen=True)
class Recipe:
    """One timed volume run."""

    name: str
    what: str
    sampler: str
    steps: int
    z: int
    eta: Optional[float] = None
    batched: bool = True
    precision: str = "bf16"
    compile: Optional[str] = None  # None | "default" | "reduce-overhead" (CUDA graphs)
    cases: int = 1
    decode_new_only: bool = True
    cap_s: float = 60.0
    extrapolate: bool = False  # may be timed on its first windows when the whole run does not fit


class OverCap(Exception):
    """A measurement ran past its cap."""


@contextlib.contextmanager
def time_limit(seconds: float):
    """Raise OverCap in this (main) thread after ``seconds``."""
    def alarm(signum, frame):
        raise OverCap()
    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.01))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def over_cap(err: BaseException) -> bool:
    """Whether ``err`` is, or was raised while handling, an OverCap (torch.compile wraps it)."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, OverCap):
            return True
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return False


def fits(estimate_s: float, cap_s: float, remaining_s: float) -> Optional[str]:
    """None if a case of ``estimate_s`` fits, else the reason it is skipped."""
    limit = min(cap_s, remaining_s)
    if estimate_s <= limit:
        return None
    which = "its cap" if cap_s <= remaining_s else "the budget left"
    return f"estimated {estimate_s:.0f} s > {which} ({limit:.0f} s)"


def psnr(a: np.ndarray, b: np.ndarray, data_range: float = 2.0) -> float:
    mse = float(np.mean((a.astype(np.float64) - b) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(data_range ** 2 / mse)


def activate_(module: torch.nn.Module) -> None:
    """Give the zero-initialised weights (residual outputs, attention projections, the output
    conv) random values: at their init the UNet predicts eps = 0 exactly, and bf16 would then
    agree with fp32 trivially."""
    with torch.no_grad():
        for p in module.parameters():
            if p.dim() > 1 and not p.any():
                p.normal_(0, 0.5 / math.sqrt(p[0].numel()))


def count_flops(cfg, n: int, latent: int) -> dict:
    """FLOPs of one UNet window forward and of the VAE per slice, counted on the meta device."""
    from torch.utils.flop_counter import FlopCounterMode

    def flops(fn):
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            fn()
        return counter.get_total_flops()

    with torch.device("meta"):
        unet, vae = build_unet(cfg, volumetric=True), build_vae(cfg)
        c = cfg.vae.latent_channels
        x, cond = torch.empty(1, n, c, latent, latent), torch.empty(1, n, unet.in_channels - c, latent, latent)
        size = latent * cfg.vae.factor
        return {"unet_window_forward": flops(lambda: unet(x, torch.zeros(1, dtype=torch.long), cond)),
                "vae_decode_slice": flops(lambda: vae.decode(torch.empty(1, c, latent, latent))),
                "vae_encode_slice": flops(lambda: vae.encode(torch.empty(1, cfg.vae.in_channels, size, size)))}


def gpu_info(device: torch.device) -> dict:
    info = {"cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
            "tf32_matmul": torch.backends.cuda.matmul.allow_tf32, "tf32_cudnn": torch.backends.cudnn.allow_tf32}
    if device.type != "cuda":
        return info
    props = torch.cuda.get_device_properties(device)
    info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2 ** 30, 1),
                capability=f"{props.major}.{props.minor}")
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                        capture_output=True, text=True, timeout=20).stdout.strip()
    return info


class Bench:
    """The models, the synthetic case and the measurements of one run."""

    def __init__(self, cfg, device: torch.device, budget_s: float, seed: int = 0):
        self.cfg, self.device, self.seed = cfg, device, seed
        self.deadline = time.perf_counter() + budget_s
        torch.manual_seed(seed)
        with torch.device(device):
            self.unet = build_unet(cfg, volumetric=True).eval()
            self.vae = build_vae(cfg).eval()
        activate_(self.unet)
        self.n, self.size = cfg.window_length, cfg.data.slice_size
        self.latent = self.size // cfg.vae.factor
        self.compiled, self.warm_s, self.per_call, self.vae_rate = {}, {}, {}, {}
        self._cases = {}

    def remaining(self) -> float:
        return self.deadline - time.perf_counter() - RESERVE_S

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def autocast(self, precision: str):
        if precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def case(self, z: int, cases: int):
        """A label volume (outside-body -1, a brain disc, nested spheres of the labels) and
        ``cases`` smooth random informed slices in [-1, 1]."""
        if (z, cases) not in self._cases:
            s, labels = self.size, sorted(self.cfg.data.labels)
            zz, yy, xx = np.ogrid[:z, :s, :s]
            r_body = np.hypot((yy - s / 2) / (0.45 * s), (xx - s / 2) / (0.4 * s))
            r = np.sqrt(((zz - z / 2) / (z / 5)) ** 2 + ((yy - s / 2) / (s / 6)) ** 2 + ((xx - s / 2) / (s / 6)) ** 2)
            mask = np.where(r_body < 1, 0, -1).astype(np.int16) * np.ones((z, 1, 1), np.int16)
            for value, radius in zip(labels, (1.0, 0.7, 0.4)):
                mask[r < radius] = value
            rng = np.random.default_rng(z)
            images = torch.nn.functional.avg_pool2d(torch.from_numpy(rng.standard_normal((cases, 1, s, s))).float(),
                                                    9, 1, 4).clamp(-0.3, 0.3) / 0.3
            self._cases[(z, cases)] = (torch.from_numpy(mask), images)
        return self._cases[(z, cases)]

    def network(self, mode: Optional[str]):
        if mode is None:
            return self.unet
        if mode not in self.compiled:
            # CPU: dynamo with the eager backend, to rehearse tracing (inductor's C++ build of even
            # the tiny UNet ran past 7 minutes on 2 shared cores)
            self.compiled[mode] = (torch.compile(self.unet, mode=mode, dynamic=False) if self.device.type == "cuda"
                                   else torch.compile(self.unet, backend="eager", dynamic=False))
        return self.compiled[mode]

    def denoiser(self, recipe: Recipe, counter: dict):
        net, graphs = self.network(recipe.compile), recipe.compile == "reduce-overhead"

        def denoise(x_t, t, mask, informed):
            counter["calls"] += 1
            counter["windows"] += x_t.shape[0]
            cond = volume_condition(mask, informed if self.cfg.informed_slice else None)
            if graphs:
                torch.compiler.cudagraph_mark_step_begin()
            with self.autocast(recipe.precision):
                eps = net(x_t, t, cond)
            return eps.float().clone() if graphs else eps.float()
        return denoise

    def calibrate(self, precision: str, batch: int) -> float:
        """Seconds per eager UNet call of ``batch`` windows (median of 3 after a warm-up)."""
        key = (precision, batch)
        if key not in self.per_call:
            c, cm = self.cfg.vae.latent_channels, self.unet.in_channels - 2 * self.cfg.vae.latent_channels
            shape = (batch, self.n, c, self.latent, self.latent)
            x, mask = torch.randn(shape, device=self.device), torch.randn(shape[:2] + (cm,) + shape[3:], device=self.device)
            informed, t = torch.randn(batch, c, self.latent, self.latent, device=self.device), torch.full(
                (batch,), 500, device=self.device)
            denoise, times = self.denoiser(Recipe("calibrate", "", "ddim", 1, 0, precision=precision),
                                           {"calls": 0, "windows": 0}), []
            with torch.inference_mode():
                for i in range(4):
                    self.sync()
                    t0 = time.perf_counter()
                    denoise(x, t, mask, informed)
                    self.sync()
                    times.append(time.perf_counter() - t0)
            self.per_call[key] = float(np.median(times[1:]))
        return self.per_call[key]

    def estimate(self, r: Recipe) -> dict:
        """Seconds of a recipe from calibrated calls and VAE rates; per window for extrapolation."""
        plan = plan_windows(r.z, self.n, start_slice(START, r.z, self.n))
        groups = plan.rounds if r.batched else [(w,) for w in plan.windows]
        sample = sum(r.steps * self.calibrate(r.precision, r.cases * len(g)) for g in groups)
        decoded = r.z if r.decode_new_only else r.z + sum(len(w.known) for w in plan.windows)
        encode, decode = self.vae_rate.get(("encode", r.precision), 0.0), self.vae_rate.get(("decode", r.precision), 0.0)
        coding = encode * (r.z + r.cases) + decode * decoded * r.cases
        return {"total_s": sample + coding, "per_window_s": (sample + coding) / len(plan.windows),
                "windows": len(plan.windows)}

    def run(self, r: Recipe, max_windows: Optional[int] = None, keep: bool = False) -> dict:
        """Time the recipe end to end (encode -> propagate -> decode each window -> host)."""
        cfg, device = self.cfg, self.device
        labels, images = self.case(r.z, r.cases)
        counter, record = {"calls": 0, "windows": 0}, {}
        denoise = self.denoiser(r, counter)
        out = np.zeros((r.cases,) + tuple(labels.shape), np.float32)
        done = np.zeros(r.z, bool)
        first = None
        windows = decoded = 0
        with torch.inference_mode(), peak_memory(device, record):
            t0 = time.perf_counter()
            with self.autocast(r.precision):
                masks = encode_masks(labels.to(device), cfg, self.vae).float()
                informed = list(encode_slices(self.vae, images.to(device), cfg.vae.scale).float())
            self.sync()
            encoded = time.perf_counter() - t0
            plan = plan_windows(r.z, self.n, start_slice(START, r.z, self.n))
            factory = scheduler_factory(r.sampler, r.steps, cfg.diffusion, r.eta)
            run = propagate_cases(denoise, [masks] * r.cases, informed, plan, factory,
                                  torch.Generator().manual_seed(self.seed), batch_directions=r.batched)
            for results in run:
                a, b = results[0].start, results[0].stop
                new = np.flatnonzero(~done[a:b]) if r.decode_new_only else np.arange(b - a)
                latents = torch.cat([res.latents[torch.from_numpy(new).to(device)] for res in results])
                with self.autocast(r.precision):
                    slices = decode_latents(self.vae, latents, cfg.vae.scale).float()
                slices = slices[:, 0].clamp(-1, 1).cpu().numpy().reshape(r.cases, len(new), *labels.shape[1:])
                out[:, a + new] = slices
                done[a:b] = True
                windows += 1
                decoded += len(new) * r.cases
                if first is None:
                    first = time.perf_counter() - t0
                if max_windows is not None and windows >= max_windows:
                    break
            self.sync()
            total = time.perf_counter() - t0
        row = {"encode_s": encoded, "first_window_s": first, "total_s": total, "peak_mib": record["peak_mib"], "windows": windows,
               "plan_windows": len(plan.windows), "model_calls": counter["calls"],
               "window_evals": counter["windows"], "decoded_slices": decoded}
        if keep:
            row["output"] = out[0]
        return row

    def warm(self, r: Recipe) -> float:
        """An untimed 2-step run of the recipe's shapes (lazy init, cuDNN, compilation, CUDA graph
        recording); its seconds (with torch.compile: about the compile time)."""
        key = (r.precision, r.compile, r.batched, r.cases, r.decode_new_only)
        if key not in self.warm_s:
            t0 = time.perf_counter()
            self.run(replace(r, steps=2, z=3 * self.n))  # 3n: rounds of one and of two windows
            self.warm_s[key] = time.perf_counter() - t0
        return self.warm_s[key]


def recipes(args) -> list:
    """Every volume run, in order: the main ratios first, compilation last (slowest to warm).
    The variants run in ``args.precision`` and compare with ``ours-<precision>``."""
    z, z2 = args.z
    fast = {"sampler": "dpm++", "steps": args.fast_steps, "z": z, "precision": args.precision}
    ours = f"ours-{args.precision}"
    runs = [
        Recipe("ours-bf16", "DPM-Solver++, directions batched, bf16 autocast, new slices decoded",
               **{**fast, "precision": "bf16"}),
        Recipe("ours-fp32", "as ours-bf16 in fp32", **{**fast, "precision": "fp32"}),
        Recipe("official", "DDIM eta 1, directions one after the other, fp32, whole windows decoded",
               "ddim", args.official_steps, z, eta=1.0, batched=False, precision="fp32", decode_new_only=False,
               cap_s=args.official_cap_s, extrapolate=True),
        Recipe("sequential", f"{ours}, directions one after the other", batched=False, **fast),
        Recipe("whole-windows", f"{ours}, every window decoded whole (overlap decoded twice)",
               decode_new_only=False, **fast),
        Recipe("unipc", f"{ours} with UniPC", **{**fast, "sampler": "unipc", "steps": args.unipc_steps}),
        Recipe("ours-2Z", f"{ours} at Z = {z2}", cap_s=90, **{**fast, "z": z2}),
    ]
    runs += [Recipe(f"enhance-K{k}", f"dataset enhancement: {k} re-samplings of the case in every forward pass",
                    cases=k, cap_s=90, **fast) for k in args.cases if k > 1]
    runs.append(Recipe("compile", f"{ours} with torch.compile (default mode)", compile="default",
                       cap_s=args.compile_cap_s, **fast))
    runs.append(Recipe("cuda-graphs", f"{ours} with torch.compile mode='reduce-overhead' (CUDA graphs)",
                       compile="reduce-overhead", cap_s=args.compile_cap_s, **fast))
    return runs


def skip_reason(r: Recipe, args, cuda: bool) -> Optional[str]:
    if r.compile == "reduce-overhead" and not cuda:
        return "CUDA graphs are CUDA only (torch.compile mode='reduce-overhead'); skipped on the CPU"
    if r.compile and not cuda and not args.cpu_compile:
        return ("torch.compile on the CPU only with --cpu-compile (dynamo with the eager backend: inductor's "
                "C++ build of the tiny UNet ran past 7 min on 2 shared cores); skipped")
    return None


def vae_rows(bench: Bench, z: int, chunks, precision: str, cap_s: float) -> list:
    """Encode and decode z slices in fp32 and bf16, then chunk sizes and tiling in ``precision``."""
    cfg, device = bench.cfg, bench.device
    size, c = bench.size, cfg.vae.latent_channels
    images = torch.rand(z, 1, size, size, device=device) * 2 - 1
    latents = torch.randn(z, c, bench.latent, bench.latent, device=device)
    cases = [("encode", p, 16, False) for p in ("fp32", "bf16")] + [("decode", p, 16, False) for p in ("fp32", "bf16")]
    cases += [("decode", precision, k, False) for k in chunks if k != 16] + [("decode", precision, 16, True)]
    rows = []
    for op, precision, chunk, tiled in cases:
        row = {"op": op, "precision": precision, "chunk": chunk, "tiled": tiled, "slices": z}
        if bench.remaining() < cap_s:
            rows.append({**row, "skipped": f"budget left {bench.remaining():.0f} s < cap {cap_s:.0f} s"})
            continue
        bench.vae.use_tiling = tiled
        work = (lambda x: encode_slices(bench.vae, x, cfg.vae.scale, chunk)) if op == "encode" else (
            lambda x: decode_latents(bench.vae, x, cfg.vae.scale, chunk))
        data = images if op == "encode" else latents
        try:
            with time_limit(cap_s), torch.inference_mode(), bench.autocast(precision):
                work(data[:chunk])
                record = {}
                with peak_memory(device, record):
                    t0 = time.perf_counter()
                    work(data)
                    bench.sync()
                    seconds = time.perf_counter() - t0
        except OverCap:
            rows.append({**row, "skipped": f"stopped at its cap of {cap_s:.0f} s"})
            continue
        finally:
            bench.vae.use_tiling = False
        rows.append({**row, "s": seconds, "slices_per_s": z / seconds, "peak_mib": record["peak_mib"]})
        if chunk == 16 and not tiled:
            bench.vae_rate[(op, precision)] = seconds / z
    return rows


def ratios(rows: dict, quality: dict, flops: dict, precision: str, cuda: bool) -> list:
    """Comparisons measured in this run, as sentences."""
    out = []
    ok = {k: r for k, r in rows.items() if "total_s" in r}
    base = ok.get("official")
    if base:
        for name, r in ok.items():
            if name != "official" and r.get("cases", 1) == 1 and r["Z"] == base["Z"]:
                out.append(f"{name}: official / this = {base['total_s'] / r['total_s']:.2f}x end to end"
                           f"{' (official extrapolated)' if base.get('extrapolated') else ''}, "
                           f"{base['first_window_s'] / r['first_window_s']:.2f}x to the first window, peak memory "
                           f"x{r['peak_mib'] / base['peak_mib']:.2f}.")
    ours = f"ours-{precision}"
    pairs = (("ours-fp32", "ours-bf16", "bf16 autocast vs fp32 (speed-up)"),
             ("sequential", ours, "batched vs sequential directions"),
             ("whole-windows", ours, "decoding only new slices vs whole windows"),
             (ours, "unipc", "UniPC vs DPM-Solver++"),
             (ours, "compile", "torch.compile vs eager"),
             (ours, "cuda-graphs", "CUDA graphs vs eager"))
    for slow, fast, label in pairs:
        if slow in ok and fast in ok:
            a, b = ok[slow], ok[fast]
            out.append(f"{label}: {a['total_s'] / b['total_s']:.2f}x ({a['sampler']}-{a['steps']} "
                       f"{a['total_s']:.2f} s vs {b['sampler']}-{b['steps']} {b['total_s']:.2f} s).")
    for name in ("compile", "cuda-graphs"):
        if name in ok:
            out.append(f"{name}: warm-up (compilation{', graph capture' if name == 'cuda-graphs' else ''} and a "
                       f"2-step run) {ok[name]['warm_s']:.1f} s, apart from the timed run"
                       f"{'' if cuda else '; on the CPU dynamo with the eager backend (tracing only)'}.")
    one, two = ok.get(ours), ok.get("ours-2Z")
    if one and two:
        out.append(f"Memory vs Z: peak {one['peak_mib']:.0f} MiB at Z={one['Z']}, {two['peak_mib']:.0f} MiB at "
                   f"Z={two['Z']} (x{two['peak_mib'] / one['peak_mib']:.2f} for x{two['Z'] / one['Z']:.1f} slices); "
                   f"time x{two['total_s'] / one['total_s']:.2f}.")
    if one:
        for name, r in ok.items():
            if name.startswith("enhance-"):
                out.append(f"{name}: {r['volumes_per_min']:.1f} volumes/min vs {one['volumes_per_min']:.1f} one "
                           f"at a time ({r['volumes_per_min'] / one['volumes_per_min']:.2f}x), "
                           f"peak {r['peak_mib']:.0f} MiB.")
    for label, value in quality.items():
        if isinstance(value, float):
            out.append(f"Quality, {label}: {'identical' if math.isinf(value) else f'{value:.1f} dB'}"
                       f"{'' if math.isinf(value) or value >= 40 else ' (below the 40 dB guard)'}.")
    out.append(f"UNet: {flops['unet_window_forward'] / 1e12:.4g} TFLOP per window forward (counted); "
               f"VAE decode {flops['vae_decode_slice'] / 1e12:.4g}, encode {flops['vae_encode_slice'] / 1e12:.4g} "
               f"TFLOP per slice.")
    if not cuda:
        out.append("Peak memory on the CPU is the process's peak RSS (model and libraries included), "
                   "not comparable with CUDA max allocated.")
    return out


def fmt(value, digits=2) -> str:
    if value is None:
        return "—"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def markdown(report: dict) -> str:
    m, g = report["machine"], report["gpu"]
    device = (f"{g['gpu']} ({g['gpu_memory_gib']} GiB, sm {g['capability']}), driver {g.get('driver', '?')}, "
              f"CUDA {g['cuda']}, cuDNN {g['cudnn']}" if "gpu" in g else f"no GPU: {m['cpu']}")
    lines = [f"# GPU benchmark: {report['preset']} config, {report['slice_size']}x{report['slice_size']} slices, "
             f"window {report['window']}, random weights", "",
             f"Machine: {device} | {m['cores']} cores, {m['torch_threads']} torch threads | {m['platform']} | "
             f"Python {m['python']} | torch {m['torch']} | TF32 matmul {g['tf32_matmul']}, cuDNN {g['tf32_cudnn']}",
             f"Command: `{report['command']}`", f"UNet {report['parameters']['unet'] / 1e6:.1f} M parameters "
             f"(with volumetric layers), VAE {report['parameters']['vae'] / 1e6:.1f} M. Wall time "
             f"{report['wall_s']:.0f} s of a {report['budget_s']:.0f} s budget.", "",
             "| run | Z | sampler | directions | precision | compile | K | windows | model calls | "
             "first window s | total s | vs official | volumes/min | TFLOP | TFLOP/s | peak MiB |", "|" + "---|" * 16]
    for name, r in report["runs"].items():
        if "skipped" in r:
            lines.append(f"| {name} | {r['Z']} | {r['sampler']}-{r['steps']} | — | {r['precision']} | "
                         f"{r['compile'] or 'off'} | {r['cases']} | skipped: {r['skipped']} |" + " |" * 8)
            continue
        total = f"{r['total_s']:.2f}" + (f" (extrapolated from {r['windows']}/{r['plan_windows']} windows)"
                                         if r.get("extrapolated") else "")
        lines.append("| " + " | ".join([
            name, str(r["Z"]), f"{r['sampler']}-{r['steps']}", "batched" if r["batched"] else "sequential",
            r["precision"], r["compile"] or "off", str(r["cases"]), f"{r['windows']}/{r['plan_windows']}",
            str(r["model_calls"]), fmt(r["first_window_s"]), total, fmt(r.get("speedup_vs_official"), 1) + "x",
            fmt(r["volumes_per_min"], 1), f"{r['tflop']:.4g}", f"{r['tflops_achieved']:.3g}",
            f"{r['peak_mib']:.0f}"]) + " |")
    lines += ["", "| UNet call | precision | windows per call | ms | TFLOP/s |", "|---|---|---|---|---|"]
    for c in report["calibration"]:
        lines.append(f"| eager | {c['precision']} | {c['batch']} | {c['s'] * 1e3:.1f} | {c['tflops']:.3g} |")
    lines += ["", "| VAE | precision | chunk | tiled | slices | s | slices/s | TFLOP/s | peak MiB |",
              "|---|---|---|---|---|---|---|---|---|"]
    for v in report["vae"]:
        if "skipped" in v:
            lines.append(f"| {v['op']} | {v['precision']} | {v['chunk']} | {v['tiled']} | {v['slices']} | "
                         f"skipped: {v['skipped']} | | | |")
        else:
            lines.append(f"| {v['op']} | {v['precision']} | {v['chunk']} | {'yes' if v['tiled'] else 'no'} | "
                         f"{v['slices']} | {v['s']:.2f} | {v['slices_per_s']:.1f} | {v['tflops']:.3g} | "
                         f"{v['peak_mib']:.0f} |")
    lines += ["", *[f"- {line}" for line in report["ratios"]], "", "Skipped or capped:" if report["skips"] else "",
              *[f"- {line}" for line in report["skips"]], "",
              "Times: the in-memory pipeline (VAE encode of the mask and informed slice, propagation, each window "
              "decoded and copied to the host as it finishes); file I/O and resampling are benchmarks/speed.py's. "
              "Compile rows: the warm-up (compilation, graph capture) is reported apart, in `warm_s`. "
              "PSNR on decoded slices in [-1, 1] (range 2), same seed; random weights, so it bounds numerical drift "
              "of this architecture, not the error of trained weights. Peak memory: "
              + ("CUDA max allocated." if "gpu" in g else "peak RSS of the process."), ""]
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default=None, choices=sorted(config.PRESETS))
    parser.add_argument("--size", type=int, default=None, help="Slice size (default: the preset's).")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--z", type=int, nargs=2, default=None, help="Z and the larger Z (default 155 310).")
    parser.add_argument("--fast-steps", type=int, default=None)
    parser.add_argument("--unipc-steps", type=int, default=None)
    parser.add_argument("--official-steps", type=int, default=None)
    parser.add_argument("--cases", type=int, nargs="+", default=None, help="K of the enhancement runs (2 4).")
    parser.add_argument("--precision", choices=("bf16", "fp32"), default=None,
                        help="Of the variant runs (default: bf16 on CUDA, fp32 on the CPU, which lacks fast bf16).")
    parser.add_argument("--runs", nargs="+", default=None,
                        help="Only these volume runs (names as in the table; the official one is always run).")
    parser.add_argument("--budget-s", type=float, default=450.0)
    parser.add_argument("--official-cap-s", type=float, default=120.0)
    parser.add_argument("--compile-cap-s", type=float, default=150.0)
    parser.add_argument("--official-windows", type=int, default=None,
                        help="Time the official recipe on its first N windows and extrapolate.")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (--smoke: 1; a shared small CPU spins with more).")
    parser.add_argument("--cpu-compile", action="store_true",
                        help="On the CPU, rehearse the compile path: torch.compile with the eager backend.")
    parser.add_argument("--smoke", action="store_true", help="Tiny config, few steps: seconds on a CPU (CI).")
    parser.add_argument("--out-dir", type=Path, default=ROOT / "results")
    parser.add_argument("--tag", default=None, help="Result files: gpu_<tag>.md/.json.")
    args = parser.parse_args(argv)
    small = args.smoke
    defaults = {"preset": "tiny" if small else "paper", "size": 32 if small else None,
                "z": [20, 40] if small else [155, 310], "cases": [2] if small else [2, 4],
                "precision": "bf16" if args.device.startswith("cuda") else "fp32",
                "fast_steps": 2 if small else 20, "unipc_steps": 2 if small else 10,
                "official_steps": 4 if small else 200, "threads": 1 if small else None}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA GPU (use --device cpu for the rehearsal)")
    cuda = device.type == "cuda"
    cfg = config.load_config(str(ROOT.parent / "configs" / "paper_brain.yaml") if args.preset == "paper"
                             else args.preset)
    if args.size:
        cfg.data.slice_size = args.size
    if args.smoke:
        cfg.vae.sample_size = cfg.data.slice_size // 2  # so that the tiled decode really tiles
    tag = args.tag or f"{'rehearsal' if args.smoke else args.preset}_{device.type}"
    bench = Bench(cfg, device, args.budget_s)
    report = {"machine": machine(device), "gpu": gpu_info(device), "preset": args.preset,
              "slice_size": cfg.data.slice_size, "window": bench.n, "weights": "random (zero-init layers activated)",
              "parameters": {"unet": sum(p.numel() for p in bench.unet.parameters()),
                             "vae": sum(p.numel() for p in bench.vae.parameters())},
              "flops": count_flops(cfg, bench.n, bench.latent), "budget_s": args.budget_s,
              "command": "python benchmarks/gpu_speed.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "calibration": [], "vae": [], "runs": {}, "quality": {}, "skips": [], "ratios": []}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    flops = report["flops"]

    def save():
        report["wall_s"] = time.perf_counter() - t_start
        report["ratios"] = ratios(report["runs"], report["quality"], flops, args.precision, cuda)
        report["calibration"] = [{"precision": p, "batch": b, "s": s,
                                  "tflops": b * flops["unet_window_forward"] / s / 1e12}
                                 for (p, b), s in sorted(bench.per_call.items())]
        (args.out_dir / f"gpu_{tag}.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
        (args.out_dir / f"gpu_{tag}.md").write_text(markdown(report))

    def log(text):
        print(f"[{time.perf_counter() - t_start:6.1f} s] {text}", file=sys.stderr, flush=True)

    log(f"built {cfg.name}: UNet {report['parameters']['unet'] / 1e6:.1f} M parameters, "
        f"{flops['unet_window_forward'] / 1e12:.4g} TFLOP per window forward")
    report["vae"] = vae_rows(bench, args.z[0], (4, 16, 32), args.precision, cap_s=30.0)
    for v in report["vae"]:
        if "s" in v:
            per = flops[f"vae_{v['op']}_slice"]
            v["tflops"] = v["slices"] * per / v["s"] / 1e12
    save()
    log("VAE rows done")
    outputs = {}
    ours = f"ours-{args.precision}"
    for r in recipes(args):
        if args.runs and r.name not in args.runs and r.name != "official":
            continue
        row = {"Z": r.z, "sampler": r.sampler, "steps": r.steps, "eta": r.eta, "batched": r.batched,
               "precision": r.precision, "compile": r.compile, "cases": r.cases,
               "decode_new_only": r.decode_new_only, "what": r.what}
        reason = skip_reason(r, args, cuda)
        max_windows = args.official_windows if r.extrapolate else None
        if reason is None and not r.compile:
            est = bench.estimate(r)
            reason = fits(est["total_s"], r.cap_s, bench.remaining())
            if reason and r.extrapolate:
                room = min(r.cap_s, bench.remaining())
                max_windows = max(1, int(room / est["per_window_s"]))
                reason = None if max_windows < est["windows"] else reason
        elif reason is None and bench.remaining() < r.cap_s / 3:
            reason = f"budget left {bench.remaining():.0f} s < a third of its cap ({r.cap_s:.0f} s)"
        if reason:
            report["runs"][r.name] = {**row, "skipped": reason}
            report["skips"].append(f"{r.name}: {reason}")
            log(f"{r.name}: skipped, {reason}")
            save()
            continue
        try:
            with time_limit(min(r.cap_s, bench.remaining())):
                warm = bench.warm(r)
                result = bench.run(r, max_windows=max_windows, keep=r.name in ("ours-bf16", "ours-fp32", "compile",
                                                                               "cuda-graphs"))
        except Exception as err:  # noqa: BLE001 - one failed row must not cost the GPU session the rest
            first_line = (str(err).strip().splitlines() or [""])[0][:300]
            reason = (f"stopped at its cap of {min(r.cap_s, bench.remaining()):.0f} s" if over_cap(err)
                      else f"failed: {type(err).__name__}: {first_line}")
            report["runs"][r.name] = {**row, "skipped": reason}
            report["skips"].append(f"{r.name}: {reason}")
            log(f"{r.name}: {reason}")
            save()
            continue
        if "output" in result:
            outputs[r.name] = result.pop("output")
        coded = r.z * (cfg.mask.encoding == "vae") + r.cases  # VAE-encoded slices: masks, informed slices
        done_tflop = (result["window_evals"] * flops["unet_window_forward"] + result["decoded_slices"]
                      * flops["vae_decode_slice"] + coded * flops["vae_encode_slice"]) / 1e12
        if result["windows"] < result["plan_windows"]:
            measured = result["total_s"]
            result.update(extrapolated=True, measured_s=measured, total_s=result["encode_s"] + (
                measured - result["encode_s"]) * result["plan_windows"] / result["windows"])
            report["skips"].append(f"{r.name}: timed on its first {result['windows']} of {result['plan_windows']} "
                                   f"windows ({measured:.1f} s) and extrapolated")
        result["volumes_per_min"] = 60 * r.cases / result["total_s"]
        result["tflops_achieved"] = done_tflop / result.get("measured_s", result["total_s"])
        result["tflop"] = done_tflop * result["plan_windows"] / result["windows"]
        report["runs"][r.name] = {**row, "warm_s": warm, **result}
        official = report["runs"].get("official", {})
        for other in report["runs"].values():
            if "total_s" in other and "total_s" in official:
                other["speedup_vs_official"] = official["total_s"] / other["total_s"]
        log(f"{r.name}: {result['total_s']:.2f} s, first window {result['first_window_s']:.2f} s, "
            f"{result['model_calls']} calls, peak {result['peak_mib']:.0f} MiB (warm-up {warm:.1f} s)")
        for label, a, b in (("bf16 vs fp32", "ours-bf16", "ours-fp32"), ("compile vs eager", "compile", ours),
                            ("CUDA graphs vs eager", "cuda-graphs", ours)):
            if a in outputs and b in outputs and label not in report["quality"]:
                report["quality"][label] = psnr(outputs[a], outputs[b])
        save()
    for label in ("bf16 vs fp32", "compile vs eager", "CUDA graphs vs eager"):
        report["quality"].setdefault(label, "not measured (a run was skipped)")
    save()
    text = (args.out_dir / f"gpu_{tag}.md").read_text()
    print(text)
    return report


if __name__ == "__main__":
    main()
