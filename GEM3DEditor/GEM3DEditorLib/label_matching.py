"""Match a segmentation's segments to the labels of a model bundle's label map.

A segment matches by its name (exact or a known synonym: "necrotic core", "NCR" -> necrosis;
names and spelling rule from gem3d.labels) or its terminology (SNOMED CT codes or code meanings
of Slicer's "TerminologyEntry" tag). Never by label value or the number in "Segment_1": the
Segment Editor numbers segments in creation order, so that would map them arbitrarily. Segments
that match nothing are reported and left out until the user maps them. Then the matched segments
are composed into one label volume.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
from gem3d.labels import canonical_name
from gem3d.labels import normalise_name as normalize

# SNOMED CT code value -> canonical name
SNOMED_CODES: Dict[str, str] = {
    "6574001": "necrosis",
    "79654002": "oedema",
    "10200004": "liver",
    "64033007": "kidney",
    "9846003": "kidney",  # right kidney
    "18639004": "kidney",  # left kidney
    "78961009": "spleen",
    "15776009": "pancreas",
}


def terminology_type(entry: str) -> Optional[Tuple[str, str, str]]:
    """(scheme, code value, meaning) of the *type* of a Slicer terminology entry string, or None.

    Format: context~category~type~typeModifier~anatomicContext~region~regionModifier, each coded
    field as scheme^value^meaning. Only the type names the structure: a tumour's anatomic region
    (e.g. liver) must not make it a liver.
    """
    fields = (entry or "").split("~")
    if len(fields) < 3:
        return None
    parts = fields[2].split("^")
    if len(parts) != 3 or not (parts[1] or parts[2]):
        return None
    return parts[0], parts[1], parts[2]


@dataclass(frozen=True)
class SegmentInfo:
    segment_id: str
    name: str
    terminology: str = ""
    label_value: Optional[int] = None


@dataclass(frozen=True)
class Match:
    segment_id: str
    name: str
    label: Optional[int]  # None: unmatched
    reason: str


def bundle_label_index(label_map: Dict[int, str]) -> Dict[str, int]:
    """Normalised and canonical label names -> label value."""
    index = {}
    for value, name in label_map.items():
        index.setdefault(normalize(name), int(value))
        canonical = canonical_name(name)
        if canonical:
            index.setdefault(canonical, int(value))
    return index


def _match_text(text: str, index: Dict[str, int]) -> Optional[int]:
    if normalize(text) in index:
        return index[normalize(text)]
    canonical = canonical_name(text)
    return index.get(canonical) if canonical else None


def match_segment(segment: SegmentInfo, label_map: Dict[int, str],
                  index: Optional[Dict[str, int]] = None) -> Match:
    """One segment against the label map, without looking at other segments."""
    index = bundle_label_index(label_map) if index is None else index
    exact = {normalize(name): value for value, name in label_map.items()}
    label = exact.get(normalize(segment.name))
    if label is not None:
        return Match(segment.segment_id, segment.name, label, "name")
    label = _match_text(segment.name, index)
    if label is not None:
        return Match(segment.segment_id, segment.name, label, f"synonym of '{label_map[label]}'")
    coded = terminology_type(segment.terminology)
    if coded:
        scheme, code, meaning = coded
        canonical = SNOMED_CODES.get(code) if scheme.upper() in ("SCT", "SRT") else None
        label = index.get(canonical) if canonical else _match_text(meaning, index)
        if label is not None:
            return Match(segment.segment_id, segment.name, label, f"terminology {scheme}:{code} {meaning}")
    return Match(segment.segment_id, segment.name, None, "unmatched")


def match_segments(segments: Sequence[SegmentInfo], label_map: Dict[int, str]
                   ) -> Tuple[List[Match], List[Match]]:
    """(matches in segment order, the unmatched ones)."""
    label_map = {int(k): v for k, v in label_map.items()}
    index = bundle_label_index(label_map)
    matches = [match_segment(s, label_map, index) for s in segments]
    return matches, [m for m in matches if m.label is None]


def compose_label_mask(shape: Sequence[int], parts: Iterable[Tuple[np.ndarray, int]],
                       dtype=np.int16) -> np.ndarray:
    """One label volume from (binary array, label) pairs. Larger parts are painted first, so a
    structure inside another one (enhancing core inside oedema) keeps its own label."""
    mask = np.zeros(tuple(shape), dtype=dtype)
    parts = [(np.asarray(a) > 0, int(label)) for a, label in parts if label]
    for binary, label in sorted(parts, key=lambda p: -int(p[0].sum())):
        if binary.shape != mask.shape:
            raise ValueError(f"segment array of shape {binary.shape} does not fit the reference grid {mask.shape}")
        mask[binary] = label
    return mask
