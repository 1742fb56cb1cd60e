"""The training loop shared by all stages: AdamW with linear warm-up, gradient-norm
clipping, EMA of the trained parameters, bf16 autocast on CUDA, DDP under torchrun,
a tqdm bar, periodic previews and checkpoints, and exact resume.

Exact resume: the batch order comes from (seed, epoch) and skips consumed batches
(`data.batches`), and torch's RNG is re-seeded at every step from (seed, stage, rank,
step), so the RNG state at a step is the same whether the run was interrupted or not.
With the optimiser, LR schedule and EMA restored, a resumed run is bitwise the run
that was never stopped (on the same machine and device).
"""
from __future__ import annotations

import math
import shutil
import time
import zlib
from pathlib import Path

import numpy as np
import torch
from diffusers.training_utils import EMAModel
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from gem3d.config import Config
from gem3d.training.checkpoint import load_latest_checkpoint, save_checkpoint
from gem3d.training.data import batches
from gem3d.training.distributed import Context
from gem3d.training.stages import Stage

LOSS_SMOOTHING = 0.99  # EMA of the logged loss (bias-corrected): the reported "final loss"


def seed_step(seed: int, stage: str, rank: int, step: int) -> None:
    torch.manual_seed(int(np.random.SeedSequence([seed, zlib.crc32(stage.encode()), rank, step])
                          .generate_state(1)[0]))


def _to(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def fit(stage: Stage, cfg: Config, run_dir: Path, ctx: Context, resume: bool = True) -> dict:
    """Train `stage` to `stage.steps` (continuing its last checkpoint); leaves the EMA
    weights in `stage.model` and returns {steps, final_loss, wall_s}."""
    t = cfg.train
    stage.objective.to(ctx.device).train()
    names, params = list(stage.trainable), list(stage.trainable.values())
    optimizer = torch.optim.AdamW(params, lr=stage.lr)
    warmup = max(t.warmup_steps, 1)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup))
    ema = EMAModel(params, decay=t.ema_decay)
    state = {"step": 0, "loss_ema": 0.0, "wall_s": 0.0}
    folder = run_dir / "checkpoints" / stage.name
    if not resume and ctx.main:
        shutil.rmtree(folder, ignore_errors=True)
    ctx.barrier()
    last = load_latest_checkpoint(folder, ctx.device) if resume else None
    if last is not None:
        model_state, ema_state, state = last
        stage.model.load_state_dict(model_state)
        ema.load_state_dict({**state.pop("ema"), "shadow_params": [ema_state[k] for k in names]})
        optimizer.load_state_dict(state.pop("optimizer"))
        schedule.load_state_dict(state.pop("schedule"))
    start = int(state["step"])
    cuda = ctx.device.type == "cuda"
    net = stage.objective
    if ctx.world > 1:
        net = DistributedDataParallel(stage.objective, device_ids=[ctx.device.index] if cuda else None)
    data = batches(stage.dataset, stage.batch_size, t.seed, start, ctx.rank, ctx.world)
    autocast = torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=t.bf16 and cuda)
    bar = tqdm(total=stage.steps, initial=start, desc=stage.name, disable=not ctx.main, dynamic_ncols=True)
    began = time.perf_counter()

    def smoothed(step: int) -> float:
        return state["loss_ema"] / (1 - LOSS_SMOOTHING ** step) if step else math.nan

    def checkpoint(step: int) -> None:
        if ctx.main:
            extra = {"ema": {k: v for k, v in ema.state_dict().items() if k != "shadow_params"},
                     "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict()}
            save_checkpoint(folder, step, stage.model, dict(zip(names, ema.shadow_params)),
                            {**state, "wall_s": state["wall_s"] + time.perf_counter() - began, **extra})
        ctx.barrier()

    def preview(step: int) -> None:
        ema.store(params)
        ema.copy_to(params)
        stage.objective.eval()
        stage.preview(run_dir / "previews" / f"{stage.name}_{step:06d}.png")
        stage.objective.train()
        ema.restore(params)

    for step in range(start, stage.steps):
        seed_step(t.seed, stage.name, ctx.rank, step)
        batch = _to(next(data), ctx.device)
        with autocast:
            loss = net(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, t.grad_clip)
        optimizer.step()
        schedule.step()
        ema.step(params)
        value = float(ctx.mean(loss.detach()))
        if not math.isfinite(value):
            raise FloatingPointError(f"{stage.name}: the loss is {value} at step {step + 1}; "
                                     "lower the learning rate or check the data")
        state["loss_ema"] = LOSS_SMOOTHING * state["loss_ema"] + (1 - LOSS_SMOOTHING) * value
        state["step"] = done = step + 1
        bar.update(1)
        bar.set_postfix(loss=f"{smoothed(done):.4f}", refresh=False)
        if ctx.main and t.preview_every and (done % t.preview_every == 0 or done == stage.steps):
            preview(done)
        if (t.checkpoint_every and done % t.checkpoint_every == 0) or done == stage.steps:
            checkpoint(done)
    bar.close()
    ema.copy_to(params)
    return {"steps": int(state["step"]), "final_loss": float(f"{smoothed(int(state['step'])):.6g}"),
            "wall_s": round(state["wall_s"] + time.perf_counter() - began, 1)}
