"""Slicer-free parts of the GEM-3D Editor module.

Everything here imports only the standard library and numpy at module level (gem3d and
SimpleITK are imported inside the functions that need them), so the module can list missing
dependencies before any of them is installed, and pytest can test it without Slicer.
"""
