"""The choices of the module's panel, handed to the logic as one object per action."""
from __future__ import annotations

import dataclasses
from typing import Optional


@dataclasses.dataclass(frozen=True)
class EngineSettings:
    sampler: Optional[str] = None  # None: the bundle's
    steps: Optional[int] = None  # None: the bundle's
    seed: int = 0
    device: str = "auto"
    engine_python: str = ""  # "": PythonSlicer
    server_url: str = ""  # "": the engine runs locally; else a `gem3d serve` URL
    server_token: str = ""  # from the application settings, never from the scene
    threads: int = 0  # threads of a local engine; 0: the engine's default (gem3d.threads)

    @property
    def engine_key(self) -> tuple:
        """What identifies the engine process or server these settings ask for."""
        return (self.server_url, self.server_token) if self.server_url else (self.engine_python, self.threads)


@dataclasses.dataclass(frozen=True)
class GenerateSettings:
    bundle: str
    informed_source: str = "same"  # same | other | generated
    informed_slice: int = 0
    start: Optional[float] = 0.5  # None: around the informed slice
    engine: EngineSettings = EngineSettings()
    keep_partial: bool = False  # a failed or cancelled job's output node is kept, named "... (partial)"


@dataclasses.dataclass(frozen=True)
class BatchSettings:
    mode: str  # enhance | harmonize
    dataset: str
    out: str
    bundle: Optional[str] = None
    times: int = 2
    augment: bool = False
    informed_scan: Optional[str] = None
    informed_position: float = 0.5
    engine: EngineSettings = EngineSettings()
