"""gem3d: the Slicer-free GEM-3D engine (data, models, training, sampling, evaluation)."""
from gem3d.volume import Geometry, Volume

__all__ = ["Geometry", "Volume"]
__version__ = "0.1.0"
