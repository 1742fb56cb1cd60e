"""Two-stage GEM-3D training: VAE, stage 1 (2D UNet), stage 2 (volumetric layers), slice model.

data -> stages (losses, previews) -> trainer (the loop, checkpoints, DDP) -> pipeline
(run folder, stage order, bundle)."""
from gem3d.training.distributed import Context, init
from gem3d.training.pipeline import STAGES, Run, train

__all__ = ["Context", "Run", "STAGES", "init", "train"]
