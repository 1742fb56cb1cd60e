"""GEM-3D in a browser: a trame-slicer page (Slicer's MRML scene, slice views and Segment Editor)
over the Slicer module's MRML logic (GEM3DEditorLib.logic.EditorLogic)."""
