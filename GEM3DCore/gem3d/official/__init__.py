"""The published GEM-3D checkpoints (HKU-MedAI/GEM-3D): safe loading, key mapping,
import into model bundles and export back to the official layout."""
from gem3d.official.export import export_official, save_official
from gem3d.official.importer import ct_window_from_plans, import_official, official_config
from gem3d.official.keymap import MappingError, ldm_vae_layout, load_manifest, plan_checkpoint
from gem3d.official.safe_load import UnsafeCheckpointError, load_checkpoint

__all__ = [
    "MappingError", "UnsafeCheckpointError", "ct_window_from_plans", "export_official", "import_official",
    "ldm_vae_layout", "load_checkpoint", "load_manifest", "official_config", "plan_checkpoint", "save_official",
]
