"""gem3d: the Slicer-free GEM-3D engine (data, models, training, sampling, evaluation).

`Geometry` and `Volume` load on first use, so that `gem3d`'s command line sets the thread pools
(gem3d.threads) before numpy starts its own."""
__all__ = ["Geometry", "Volume"]
__version__ = "0.1.0"


def __getattr__(name):
    if name in __all__:
        from gem3d import volume

        return getattr(volume, name)
    raise AttributeError(f"module 'gem3d' has no attribute {name!r}")
