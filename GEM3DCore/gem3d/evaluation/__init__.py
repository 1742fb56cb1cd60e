"""Evaluation of synthetic volumes against real ones, as in GEM-3D's tables: paired slice
fidelity (metrics), per-plane Frechet distances (frechet, extractors), volumetric
consistency (consistency), mask adherence (adherence, segmenter); `report.evaluate` runs
them all over two datasets (`gem3d evaluate`)."""
