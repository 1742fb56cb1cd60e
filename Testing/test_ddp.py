"""DistributedDataParallel: two CPU processes (gloo) under torchrun train on different shards
of the data and still end with bitwise identical weights, which only rank 0 writes."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import torch
from safetensors.torch import load_file

from gem3d.config import load_config, save_config
from gem3d.phantom import write_dataset

WORKER = textwrap.dedent("""
    import sys
    from safetensors.torch import save_file
    from gem3d.config import load_config
    from gem3d.training import Run, init

    config, dataset, run_dir = sys.argv[1:]
    ctx = init("cpu")
    run = Run(load_config(config), dataset, run_dir, ctx)
    for name in ("vae", "stage1"):
        stage = run.stage(name)
        run.run_stage(stage)
        state = {k: v.contiguous() for k, v in stage.model.state_dict().items()}
        save_file(state, f"{run_dir}/{name}_rank{ctx.rank}.safetensors")
    print(f"world {ctx.world} rank {ctx.rank}", flush=True)  # one write: the ranks share stdout
""")


def test_two_processes_stay_in_sync(tmp_path):
    write_dataset(tmp_path / "data", "brain", cases=4, size=32, slices=12)
    cfg = load_config("tiny")
    cfg.data.slice_size = 32
    cfg.window_length, cfg.train.batch_size, cfg.train.warmup_steps = 4, 2, 1
    cfg.train.vae_steps, cfg.train.stage1_steps, cfg.train.lr = 3, 4, 1e-3
    cfg.train.checkpoint_every, cfg.train.preview_every = 2, 0
    save_config(cfg, tmp_path / "cfg.yaml")
    (tmp_path / "worker.py").write_text(WORKER)
    run_dir = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TMPDIR=str(tmp_path))  # torchrun's logs
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(tmp_path / "worker.py"), str(tmp_path / "cfg.yaml"), str(tmp_path / "data"),
                           str(run_dir)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "world 2 rank 0" in done.stdout and "world 2 rank 1" in done.stdout
    for name in ("vae", "stage1"):
        ranks = [load_file(str(run_dir / f"{name}_rank{r}.safetensors")) for r in (0, 1)]
        written = load_file(str(run_dir / "models" / f"{name}.safetensors"))
        assert ranks[0].keys() == ranks[1].keys() == written.keys()
        assert all(torch.equal(ranks[0][k], ranks[1][k]) and torch.equal(ranks[0][k], written[k]) for k in written)
    assert sorted(p.name for p in (run_dir / "checkpoints" / "stage1").iterdir()) == ["step_00000002", "step_00000004"]
