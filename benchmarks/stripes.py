"""Where do the horizontal stripes of synthetic volumes come from? Each hypothesis, measured.

Stripes are slice-to-slice intensity jumps seen in coronal and sagittal views. Measure:
`gem3d.evaluation.consistency.stripe_index` (power of differences along z over in-plane ones,
pooled over the cases) of the synthetic volumes over the real scans' (ratio 1 = as smooth
along z, for its in-plane texture, as real data). Per setting, the ratio is also split into slice pairs inside
one window and pairs across a window border (the two slices from different windows).

Hypotheses and the row that tests each:
- per-slice VAE decoding: the real scan encoded and decoded slice by slice (no diffusion);
- the sampler and its noise: DPM++ 20 (the product's fast preset) vs DDIM-200 eta 0 vs eta 1
  (the paper); known frames re-noised with fixed vs fresh noise every step;
- inconsistency across windows: the border/inside split, and no known-frame replacement;
- inconsistency inside a window: the inside ratio (the volumetric layers' job);
- intensity normalisation: one min-max fit per volume (`gem3d.intensity`), never per window
  or slice, so no row; the decoder's per-slice output is covered by the VAE row.

The fix (`gem3d.through_plane`, the product since it was measured here): the 2D decoder blurs
in-plane but leaves each slice's errors independent along z, so the output is sharper along z
than in-plane (horizontal streaks in coronal/sagittal views). A [a, 1 - 2a, a] filter along z
after decoding, with a calibrated once on the VAE's round trips of its training volumes (the
bundle's `config.vae.through_plane`). The hypothesis rows run without it (`Switches(through_plane=0)`,
the product before the fix); the product rows with it. PSNR / MS-SSIM: paired against the real
scan (the informed slice is the case's own, no edit, so the real scan is the target).

  python benchmarks/stripes.py                  # the shipped demo bundle, 4 phantom cases
  python benchmarks/stripes.py --quick          # without the DDIM-200 rows (minutes)
  python benchmarks/stripes.py --smoke          # 1 case, before and after the fix (seconds)

Writes stripes_<bundle>.md / .json in --out-dir.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
from speed import machine  # noqa: E402

OFF = {"through_plane": 0.0}
SETTINGS = {   # label: (request options, pipeline switches)
    "before the fix: DPM++ 20, known frames fixed noise": ({}, OFF),
    "DPM++ 20, known frames fresh noise": ({}, {**OFF, "known_noise": "fresh"}),
    "DDIM-200 eta 0, fixed noise": ({"sampler": "ddim", "steps": 200, "eta": 0.0}, OFF),
    "DDIM-200 eta 1, fixed noise": ({"sampler": "ddim", "steps": 200, "eta": 1.0}, OFF),
    "DDIM-200 eta 1, fresh noise (the paper)": ({"sampler": "ddim", "steps": 200, "eta": 1.0},
                                                {**OFF, "known_noise": "fresh"}),
    "DDIM-20 eta 1, fixed noise": ({"sampler": "ddim", "steps": 20, "eta": 1.0}, OFF),
    "DPM++ 20, no known-frame replacement": ({}, {**OFF, "replace_known": False}),
    "product: DPM++ 20 + the bundle's through-plane filter": ({}, {}),
    "DDIM-20 eta 1 + the bundle's through-plane filter": ({"sampler": "ddim", "steps": 20, "eta": 1.0}, {}),
}
BEFORE, PRODUCT = "before the fix: DPM++ 20, known frames fixed noise", "product: DPM++ 20 + the bundle's through-plane filter"
SHORT_RUN = (BEFORE, PRODUCT)
SHORT = {"before the fix: DPM++ 20, known frames fixed noise": "before the fix",
         "DPM++ 20, known frames fresh noise": "fresh noise", "DPM++ 20, no known-frame replacement": "no replacement",
         "DDIM-20 eta 1, fixed noise": "DDIM-20 eta 1",
         "product: DPM++ 20 + the bundle's through-plane filter": "product (fixed)",
         "DDIM-20 eta 1 + the bundle's through-plane filter": "DDIM-20 eta1+filter"}   # montage row titles


def border_pairs(windows, Z: int) -> np.ndarray:
    """True for slice pair (z, z+1) when the two slices were last written by different windows."""
    owner = np.zeros(Z, int)
    for k, w in enumerate(windows):
        owner[w["start"]:w["stop"]] = k
    return owner[1:] != owner[:-1]


def vae_round_trip(engine, reference, through_plane: float = 0.0):
    """The reference through the bundle's VAE slice by slice (then the z filter), back in its units."""
    from gem3d.grid import ModelGrid
    from gem3d.models import decode_latents, encode_slices
    from gem3d.through_plane import smooth

    bundle, normaliser = engine.bundle, engine.pipeline.normaliser
    grid = ModelGrid.fit(reference.geometry, reference.shape, bundle.slice_size)
    params = normaliser.fit(reference.array)
    image = grid.to_model(normaliser.forward(reference.array, params), "image", pad_value=-1.0)
    with torch.inference_mode():
        latents = encode_slices(bundle.vae, torch.from_numpy(image)[:, None].float(), bundle.config.vae.scale)
        slices = decode_latents(bundle.vae, latents, bundle.config.vae.scale)[:, 0].clamp(-1, 1).numpy()
    slices = smooth(slices, through_plane)
    return grid.slab_from_model(normaliser.inverse(slices, params), 0, grid.n_slices, "image")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, default=None, help="Default: the shipped demo bundle.")
    parser.add_argument("--cases", type=int, default=4)
    parser.add_argument("--slices", type=int, default=32)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--quick", action="store_true", help="Leave out the DDIM-200 rows.")
    parser.add_argument("--out-dir", type=Path, default=ROOT / "results")
    args = parser.parse_args(argv)
    from gem3d import phantom
    from gem3d.bundle_format import DEMO_BUNDLE
    from gem3d.datasets import open_dataset
    from gem3d.engine import Engine
    from gem3d.evaluation.consistency import COHERENT_SIGMA, coherent_view, stripe_profile
    from gem3d.evaluation.consistency import pooled_stripe_index as index  # over cases, or their slice pairs
    from gem3d.evaluation.metrics import paired_metrics
    from gem3d.montage import montage
    from gem3d.evaluation.volumes import axial_view, to_unit, unit_range
    from gem3d.io import read_volume
    from gem3d.pipeline import Switches
    from gem3d.request import GenerateRequest, InformedSpec
    from gem3d.volume import Volume

    torch.set_num_threads(1)
    engine = Engine(args.bundle or DEMO_BUNDLE, "cpu")
    name = engine.bundle.path.name
    cases_n = 1 if args.smoke else args.cases
    settings = {k: v for k, v in SETTINGS.items() if k in SHORT_RUN} if args.smoke else SETTINGS
    if args.quick:
        settings = {k: v for k, v in settings.items() if v[0].get("steps") != 200}
    work = Path(tempfile.mkdtemp(prefix="gem3d_stripes_"))
    phantom.write_dataset(work / "data", "brain", cases_n, size=engine.bundle.slice_size, slices=args.slices,
                          seed=3)
    cases = open_dataset(work / "data").cases
    (work / "out").mkdir()
    real = {c.case_id: read_volume(c.image) for c in cases}
    scale = {k: unit_range(axial_view(v)) for k, v in real.items()}

    def unit(case_id, array):
        return to_unit(axial_view(Volume(array, real[case_id].geometry)), scale[case_id])

    def profile(case_id, array):
        return stripe_profile(unit(case_id, array))

    def coherent(case_id, array):
        return stripe_profile(coherent_view(unit(case_id, array)))

    real_profiles = [profile(k, v.array) for k, v in real.items()]
    real_coherent = [coherent(k, v.array) for k, v in real.items()]
    rows = {"real scan": {"ratio": 1.0, "coherent_ratio": 1.0}}

    def vae_row(through_plane):
        decoded = {k: vae_round_trip(engine, v, through_plane) for k, v in real.items()}
        return {"ratio": index([profile(k, d) for k, d in decoded.items()]) / index(real_profiles),
                "coherent_ratio": index([coherent(k, d) for k, d in decoded.items()]) / index(real_coherent)}

    rows["VAE round trip of the real scan (per-slice decoding)"] = vae_row(0.0)
    a = engine.bundle.config.vae.through_plane
    rows["VAE round trip + the bundle's through-plane filter"] = vae_row(a)
    examples = {}
    for label, (request_kw, switch_kw) in settings.items():
        t0 = time.perf_counter()
        synthetic, synthetic_coherent, borders, fidelity = [], [], [], []
        for i, case in enumerate(cases):
            request = GenerateRequest(reference=str(case.image), mask=str(case.mask),
                                      out=str(work / "out" / "x.nii.gz"), informed=InformedSpec("same"), start=0.5,
                                      seed=i, overwrite=True, **request_kw)
            *_, finished = engine.generate(request, switches=Switches(**switch_kw))
            if finished["event"] != "finished":
                raise RuntimeError(f"{case.case_id}: {finished.get('message')}")
            image = read_volume(finished["outputs"]["image"]).array
            record = json.loads(Path(finished["outputs"]["provenance"]).read_text())
            volume = Volume(image.astype(np.float32), real[case.case_id].geometry)
            examples.setdefault(label, volume)
            synthetic.append(profile(case.case_id, image))
            synthetic_coherent.append(coherent(case.case_id, image))
            fidelity.append(paired_metrics(to_unit(axial_view(real[case.case_id]), scale[case.case_id]),
                                           to_unit(axial_view(volume), scale[case.case_id])))
            borders.append(border_pairs(record["windows"], len(synthetic[-1][0]) + 1))

        def split(profiles, at_border):
            return [(z[b == at_border], p[b == at_border]) for (z, p), b in zip(profiles, borders)]

        rows[label] = {"ratio": index(synthetic) / index(real_profiles),
                       "coherent_ratio": index(synthetic_coherent) / index(real_coherent),
                       "inside_ratio": index(split(synthetic, False)) / index(split(real_profiles, False)),
                       "border_ratio": index(split(synthetic, True)) / index(split(real_profiles, True)),
                       "psnr": float(np.mean([f["psnr"] for f in fidelity])),
                       "ms_ssim": float(np.mean([f["ms_ssim"] for f in fidelity])),
                       "seconds": round(time.perf_counter() - t0, 1)}
        print(label, rows[label], flush=True)
    result = {"bundle": name, "through_plane": a, "cases": cases_n, "slices": args.slices, "size": engine.bundle.slice_size,
              "window_length": engine.bundle.window_length, "rows": rows, "machine": machine(torch.device("cpu")),
              "command": "python benchmarks/stripes.py" + (" --smoke" if args.smoke else
                                                           " --quick" if args.quick else "")}
    lines = [f"# Stripes: {name}, {cases_n} phantom brains {engine.bundle.slice_size}x"
             f"{engine.bundle.slice_size}x{args.slices}, window {engine.bundle.window_length}, start 0.5, "
             "informed slice: the case's own", "",
             "Stripe index (`gem3d.evaluation.consistency.stripe_index`: power of differences along z over "
             "in-plane ones) of the outputs over the real scans' (1 = real). inside / border: slice pairs "
             "inside one window / across a window border, each "
             "over the real scan's same pairs.", "",
             f"Through-plane filter (`gem3d.through_plane`): [a, 1 - 2a, a] along z after decoding, the bundle's "
             f"a = {a:.4f} (calibrated on its VAE's round trips of its training volumes); rows without it ran "
             "with a = 0. PSNR dB / MS-SSIM: paired against the real scan, mean over cases.", "",
             f"Coherent: the same ratio after smoothing every axial slice in-plane (Gaussian, sigma {COHERENT_SIGMA} px; `gem3d.evaluation.consistency.coherent_view`), "
             "so only bands that span a row of a coronal/sagittal view count, not pixel noise.", "",
             "| setting | stripe ratio | inside windows | window borders | coherent | PSNR | MS-SSIM | s (all cases) |",
             "|---|---|---|---|---|---|---|---|"]
    for label, row in rows.items():
        cells = [f"{row[k]:.2f}" if k in row else "-" for k in ("ratio", "inside_ratio", "border_ratio",
                                                                 "coherent_ratio")]
        cells += [f"{row['psnr']:.2f}" if "psnr" in row else "-", f"{row['ms_ssim']:.4f}" if "ms_ssim" in row else "-"]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {row.get('seconds', '-')} |")
    lines += ["", f"Machine: {result['machine']['cpu']}, {result['machine']['cores']} cores, no GPU, 1 torch thread."]
    text = "\n".join(lines) + "\n"
    print(text)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"stripes_{name}" + ("_smoke" if args.smoke else "_quick" if args.quick else "")
    (args.out_dir / f"{stem}.md").write_text(text)
    (args.out_dir / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    first = cases[0]
    mask = read_volume(first.mask)
    centre = np.argwhere(mask.array > 0).mean(axis=0).round().astype(int)
    montage([("real scan", real[first.case_id], "image")] + [(SHORT.get(label, label[:16]), v, "image")
                                                             for label, v in examples.items()],
            centre_index=centre, window=tuple(np.percentile(real[first.case_id].array, [1, 99.5]))
            ).save(args.out_dir / f"{stem}_montage.png")
    return result


if __name__ == "__main__":
    main()
