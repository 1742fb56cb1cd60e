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

  python benchmarks/stripes.py                  # the shipped demo bundle, 4 phantom cases
  python benchmarks/stripes.py --smoke          # 1 case, 2 settings (seconds)

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

SETTINGS = {
    "product: DPM++ 20, known frames fixed noise": ({}, {}),
    "DPM++ 20, known frames fresh noise": ({}, {"known_noise": "fresh"}),
    "DDIM-200 eta 0, fixed noise": ({"sampler": "ddim", "steps": 200, "eta": 0.0}, {}),
    "DDIM-200 eta 1, fixed noise": ({"sampler": "ddim", "steps": 200, "eta": 1.0}, {}),
    "DDIM-200 eta 1, fresh noise (the paper)": ({"sampler": "ddim", "steps": 200, "eta": 1.0},
                                                {"known_noise": "fresh"}),
    "DPM++ 20, no known-frame replacement": ({}, {"replace_known": False}),
}


def border_pairs(windows, Z: int) -> np.ndarray:
    """True for slice pair (z, z+1) when the two slices were last written by different windows."""
    owner = np.zeros(Z, int)
    for k, w in enumerate(windows):
        owner[w["start"]:w["stop"]] = k
    return owner[1:] != owner[:-1]


def vae_round_trip(engine, reference):
    """The reference through the bundle's VAE slice by slice, back in its units."""
    from gem3d.grid import ModelGrid
    from gem3d.models import decode_latents, encode_slices

    bundle, normaliser = engine.bundle, engine.pipeline.normaliser
    grid = ModelGrid.fit(reference.geometry, reference.shape, bundle.slice_size)
    params = normaliser.fit(reference.array)
    image = grid.to_model(normaliser.forward(reference.array, params), "image", pad_value=-1.0)
    with torch.inference_mode():
        latents = encode_slices(bundle.vae, torch.from_numpy(image)[:, None].float(), bundle.config.vae.scale)
        slices = decode_latents(bundle.vae, latents, bundle.config.vae.scale)[:, 0].clamp(-1, 1).numpy()
    return grid.slab_from_model(normaliser.inverse(slices, params), 0, grid.n_slices, "image")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, default=None, help="Default: the shipped demo bundle.")
    parser.add_argument("--cases", type=int, default=4)
    parser.add_argument("--slices", type=int, default=32)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out-dir", type=Path, default=ROOT / "results")
    args = parser.parse_args(argv)
    from gem3d import phantom
    from gem3d.bundle_format import DEMO_BUNDLE
    from gem3d.datasets import open_dataset
    from gem3d.engine import Engine
    from gem3d.evaluation.consistency import stripe_profile
    from gem3d.evaluation.volumes import axial_view, to_unit, unit_range
    from gem3d.io import read_volume
    from gem3d.pipeline import Switches
    from gem3d.request import GenerateRequest, InformedSpec

    torch.set_num_threads(1)
    engine = Engine(args.bundle or DEMO_BUNDLE, "cpu")
    name = engine.bundle.path.name
    cases_n = 1 if args.smoke else args.cases
    settings = dict(list(SETTINGS.items())[:2]) if args.smoke else SETTINGS
    work = Path(tempfile.mkdtemp(prefix="gem3d_stripes_"))
    phantom.write_dataset(work, "brain", cases_n, size=engine.bundle.slice_size, slices=args.slices, seed=3)
    cases = open_dataset(work).cases
    real = {c.case_id: read_volume(c.image) for c in cases}
    masks = {c.case_id: read_volume(c.mask) for c in cases}
    scale = {k: unit_range(axial_view(v)) for k, v in real.items()}

    def profile(case_id, array):
        return stripe_profile(to_unit(axial_view(type(real[case_id])(array, real[case_id].geometry)),
                                      scale[case_id]))

    def index(profiles):
        return sum(z.sum() for z, _ in profiles) / sum(p.sum() for _, p in profiles)

    real_profiles = [profile(k, v.array) for k, v in real.items()]
    rows = {"real scan": {"ratio": 1.0}}
    vae = [profile(k, vae_round_trip(engine, v)) for k, v in real.items()]
    rows["VAE round trip of the real scan (per-slice decoding)"] = {"ratio": index(vae) / index(real_profiles)}
    for label, (request_kw, switch_kw) in settings.items():
        t0 = time.perf_counter()
        synthetic, borders = [], []
        for i, case in enumerate(cases):
            request = GenerateRequest(reference=str(case.image), mask=str(case.mask), out=str(work / "x.nii.gz"),
                                      informed=InformedSpec("same"), start=0.5, seed=i, **request_kw)
            for event in engine.pipeline.run(real[case.case_id], masks[case.case_id], request,
                                             switches=Switches(**switch_kw)):
                pass
            generated = event["result"]
            synthetic.append(profile(case.case_id, generated.image.array))
            borders.append(border_pairs(generated.record["windows"], len(synthetic[-1][0]) + 1))

        def split(profiles, at_border):
            return [(z[b == at_border], p[b == at_border]) for (z, p), b in zip(profiles, borders)]

        rows[label] = {"ratio": index(synthetic) / index(real_profiles),
                       "inside_ratio": index(split(synthetic, False)) / index(split(real_profiles, False)),
                       "border_ratio": index(split(synthetic, True)) / index(split(real_profiles, True)),
                       "seconds": round(time.perf_counter() - t0, 1)}
        print(label, rows[label], flush=True)
    result = {"bundle": name, "cases": cases_n, "slices": args.slices, "size": engine.bundle.slice_size,
              "window_length": engine.bundle.window_length, "rows": rows, "machine": machine(torch.device("cpu")),
              "command": "python benchmarks/stripes.py" + (" --smoke" if args.smoke else "")}
    lines = [f"# Stripes: {name}, {cases_n} phantom brains {engine.bundle.slice_size}x"
             f"{engine.bundle.slice_size}x{args.slices}, window {engine.bundle.window_length}, start 0.5, "
             "informed slice: the case's own", "",
             "Stripe index (`gem3d.evaluation.consistency.stripe_index`: power of differences along z over "
             "in-plane ones) of the outputs over the real scans' (1 = real). inside / border: slice pairs inside one window / across a window border, each "
             "over the real scan's same pairs.", "",
             "| setting | stripe ratio | inside windows | window borders | s (all cases) |",
             "|---|---|---|---|---|"]
    for label, row in rows.items():
        cells = [f"{row[k]:.2f}" if k in row else "-" for k in ("ratio", "inside_ratio", "border_ratio")]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {row.get('seconds', '-')} |")
    lines += ["", f"Machine: {result['machine']['cpu']}, {result['machine']['cores']} cores, no GPU, 1 torch thread."]
    text = "\n".join(lines) + "\n"
    print(text)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"stripes_{name}" + ("_smoke" if args.smoke else "")
    (args.out_dir / f"{stem}.md").write_text(text)
    (args.out_dir / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
