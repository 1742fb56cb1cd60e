#!/usr/bin/env bash
# Reproduce the demo bundle (GEM3DCore/gem3d/resources/demo_bundle) end to end on 2 CPU cores:
# phantom brains -> `gem3d train all` with configs/demo.yaml (two 1-thread processes under
# torchrun: tiny models are dispatch-bound, so two processes use two cores far better than
# two threads) -> a table of steps, final losses and wall times, printed and written to
# WORK/train_demo_bundle.txt.
#
#   benchmarks/train_demo_bundle.sh [WORK] [--install] [--smoke]
#     WORK       working folder (default: out/demo_train); the run is resumed if it exists
#     --install  copy WORK/run/bundle to GEM3DCore/gem3d/resources/demo_bundle
#     --smoke    2 steps per stage (CI): checks the pipeline, not the model
set -euo pipefail
cd "$(dirname "$0")/.."
work=out/demo_train install=0 smoke=0
for arg in "$@"; do
  case $arg in
    --install) install=1 ;;
    --smoke) smoke=1 ;;
    -*) echo "unknown option $arg" >&2; exit 2 ;;
    *) work=$arg ;;
  esac
done
data=$work/demo_brain run=$work/run config=configs/demo.yaml
mkdir -p "$work"
if [ "$smoke" = 1 ]; then
  config=$work/smoke.yaml
  python -c "
from gem3d.config import load_config, save_config
cfg = load_config('configs/demo.yaml')
for stage in ('vae', 'stage1', 'stage2', 'slice'):
    setattr(cfg.train, stage + '_steps', 2)
save_config(cfg, '$config')"
fi
phantom="gem3d phantom --kind brain --cases 24 --size 64 --slices 32 --seed 1 --out $data"
start=$(date +%s)
[ -f "$data/dataset.json" ] || $phantom > /dev/null
OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 -m gem3d train all --config "$config" \
  --dataset "$data" --out "$run" --note "dataset_command=$phantom"
wall=$(( $(date +%s) - start ))
python - "$run/bundle" "$wall" "$work/train_demo_bundle.txt" <<'PY'
import json, sys
from pathlib import Path
info = json.loads((Path(sys.argv[1]) / "bundle.json").read_text())
prov = info["provenance"]
size = sum(f.stat().st_size for f in Path(sys.argv[1]).iterdir()) / 2 ** 20
lines = [f"{'stage':<8}{'steps':>7}{'final loss':>12}{'wall s':>9}"]
lines += [f"{name:<8}{r['steps']:>7}{r['final_loss']:>12.4g}{r['wall_s']:>9.0f}" for name, r in prov["stages"].items()]
lines += [f"script wall time {sys.argv[2]} s (phantoms + training + bundle); bundle {size:.1f} MiB",
          f"machine: {prov['machine']}", f"command: {prov['command']}"]
text = "\n".join(lines)
print(text)
Path(sys.argv[3]).write_text(text + "\n")
PY
if [ "$install" = 1 ]; then
  rm -rf GEM3DCore/gem3d/resources/demo_bundle && mkdir -p GEM3DCore/gem3d/resources
  cp -r "$run/bundle" GEM3DCore/gem3d/resources/demo_bundle
  echo "installed GEM3DCore/gem3d/resources/demo_bundle"
fi
