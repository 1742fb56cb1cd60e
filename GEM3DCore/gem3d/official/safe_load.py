"""Load PyTorch Lightning `.ckpt` files without running their pickles' code.

A `.ckpt` is a pickle: loading it the usual way can run anything the file names
(`os.system`, ...). We use torch's own restricted unpickler
(`torch.load(weights_only=True)`): it rebuilds tensors, storages and plain
containers only, and refuses every other global *before* touching it. Lightning
checkpoints also pickle training-framework objects (a callback's class as a
dictionary key, omegaconf hyper-parameters, numpy scalars in callback state).
We list the file's globals statically first (`get_unsafe_globals_in_checkpoint`
disassembles the pickle, nothing runs) and:
- map those in known training-framework namespaces (`SKIPPED_NAMESPACES`) to
  fresh inert placeholder classes (the real ones are never imported or called),
  so the rest of the file, the `state_dict`, loads;
- refuse the file if any other global remains, naming it.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Dict, List, Union

import torch

# module prefixes of objects that only carry training state we do not use
SKIPPED_NAMESPACES = ("pytorch_lightning.", "lightning.", "lightning_fabric.", "omegaconf.")
# harmless data constructors seen in callback / hyper-parameter state
SKIPPED_GLOBALS = ("numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar", "numpy.dtype",
                   "typing.Any", "pathlib.PosixPath", "pathlib.WindowsPath")


class UnsafeCheckpointError(ValueError):
    """A checkpoint that cannot be loaded without trusting its code, with the reason."""


class Skipped:
    """Stands in for a skipped training-framework object: accepts anything, keeps nothing."""

    original = ""

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass

    def __repr__(self) -> str:
        return f"<skipped {self.original}>"


def is_skipped(name: str) -> bool:
    return name.startswith(SKIPPED_NAMESPACES) or name in SKIPPED_GLOBALS or name.startswith("numpy.dtypes.")


def placeholder(name: str) -> type:
    """A new inert class per skipped global (distinct classes keep distinct dictionary keys)."""
    return type(name.rsplit(".", 1)[-1], (Skipped,), {"original": name, "__module__": __name__})


def load_checkpoint(path: Union[str, Path]) -> dict:
    """The checkpoint's top-level object (Lightning: a dict with 'state_dict'), on the CPU.

    Storages are memory-mapped, so a multi-GB file costs little memory until read."""
    path = Path(path)
    if not path.is_file():
        raise UnsafeCheckpointError(f"{path}: no such file")
    if not hasattr(torch.serialization, "get_unsafe_globals_in_checkpoint"):
        raise UnsafeCheckpointError(f"{path}: loading official checkpoints safely needs torch >= 2.6 "
                                    f"(found {torch.__version__})")
    try:
        foreign = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception as err:  # not a torch zip checkpoint, or an opcode torch's scanner refuses
        raise UnsafeCheckpointError(f"{path}: not a checkpoint that can be loaded safely "
                                    f"(torch.save zip format expected): {err}") from None
    refused = sorted(name for name in foreign if not is_skipped(name))
    if refused:
        raise UnsafeCheckpointError(
            f"{path}: refusing to load: the pickle references {refused}, which a weights checkpoint "
            f"has no reason to contain (nothing was executed). Re-save the weights from a trusted "
            f"environment with torch.save({{'state_dict': model.state_dict()}}, ...).")
    stand_ins = [(placeholder(name), name) for name in sorted(foreign)]
    try:
        with torch.serialization.safe_globals(stand_ins):
            return torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:
        raise UnsafeCheckpointError(f"{path}: could not be loaded safely: {err}") from None


def state_dict_of(checkpoint: object, where: str) -> Dict[str, torch.Tensor]:
    """The tensors of a Lightning checkpoint ('state_dict') or of a bare state dict."""
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("state_dict"), dict):
        checkpoint = checkpoint["state_dict"]
    if not isinstance(checkpoint, dict) or not checkpoint:
        raise ValueError(f"{where}: no state dict found (expected a Lightning checkpoint or a dict of tensors)")
    odd: List[str] = [k for k, v in checkpoint.items() if not isinstance(k, str) or not torch.is_tensor(v)]
    if odd:
        raise ValueError(f"{where}: the state dict holds non-tensor entries {odd[:5]}")
    return dict(checkpoint)


def training_info(checkpoint: object) -> dict:
    """epoch / global_step / Lightning version of a checkpoint, where present (for provenance)."""
    if not isinstance(checkpoint, dict):
        return {}
    keys = ("epoch", "global_step", "pytorch-lightning_version")
    return {k: checkpoint[k] for k in keys if isinstance(checkpoint.get(k), (int, str))}


def sha256(path: Union[str, Path], chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()
