"""Label maps: which integer in a mask means which structure.

A mask value that is not in the label map is an error, never a silent zero: a model
trained on BraTS 2021 (enhancing = 4) must not quietly ignore BraTS 2023's enhancing = 3.
Value 0 is always background; `outside` optionally names an extra value (e.g. -1 for
"outside the body") that masks may contain.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np

from gem3d import typed

MAX_LABEL = 32767  # masks are int16 on the model grid
SHOWN_VALUES = 5


class UnknownLabelError(ValueError):
    """A mask holds values, or a user asked for names, that the label map does not know."""


# canonical name -> the names a structure goes by, in `normalise_name` form (one spelling rule)
SYNONYMS: Dict[str, Tuple[str, ...]] = {
    "necrosis": ("necrosis", "necrotic", "necrotic core", "necrotic tumour core", "ncr", "net",
                 "ncr net", "non enhancing", "non enhancing tumour", "non enhancing tumour core",
                 "necrotic and non enhancing tumour core", "necrotic non enhancing tumour core"),
    "oedema": ("oedema", "ed", "peritumoral oedema", "snfh", "flair hyperintensity",
               "surrounding non enhancing flair hyperintensity", "surrounding flair hyperintensity"),
    "enhancing": ("enhancing", "enhancing tumour", "et", "enhancing core", "enhancing tumour core",
                  "gd enhancing tumour", "contrast enhancing tumour", "neoplasm primary"),
    "liver": ("liver", "hepar"),
    "kidney": ("kidney", "kidneys", "left kidney", "right kidney", "kidney left", "kidney right", "renal"),
    "spleen": ("spleen", "lien"),
    "pancreas": ("pancreas", "pancreatic"),
}
_SPELLINGS = ((r"\btumor\b", "tumour"), (r"\bedema\b", "oedema"), (r"\bnonenhancing\b", "non enhancing"))


def normalise_name(name: str) -> str:
    """The one spelling rule for structure names: lower case, punctuation to single spaces,
    British spellings ("Enhancing_Tumor" -> "enhancing tumour")."""
    text = re.sub(r"[^a-z0-9]+", " ", (name or "").lower()).strip()
    for pattern, british in _SPELLINGS:
        text = re.sub(pattern, british, text)
    return text


_CANONICAL = {normalise_name(s): canonical for canonical, names in SYNONYMS.items() for s in names}


def canonical_name(name: str) -> Optional[str]:
    """'Necrotic core' -> 'necrosis'; None when the name is no known structure."""
    return _CANONICAL.get(normalise_name(name))


@dataclass(frozen=True)
class LabelMap:
    """value -> name for the non-zero labels of a mask."""

    names: Dict[int, str] = field(default_factory=dict)
    outside: Optional[int] = None

    def __post_init__(self):
        names = {int(value): str(name) for value, name in self.names.items()}
        if 0 in names or (self.outside is not None and (self.outside == 0 or self.outside in names)):
            raise ValueError(f"label 0 is background and `outside` must differ from the labels: {names}, "
                             f"outside={self.outside}")
        object.__setattr__(self, "names", dict(sorted(names.items())))

    @property
    def values(self) -> List[int]:
        return list(self.names)

    def allowed(self) -> List[int]:
        """Every value a mask may contain: background, labels and the outside label."""
        return sorted({0, *self.names} | ({self.outside} if self.outside is not None else set()))

    def validate(self, array, where: str) -> List[int]:
        """The sorted values present in `array`; UnknownLabelError naming `where` if any is unknown."""
        present, allowed = present_values(array), self.allowed()
        unknown = [v for v in present if v not in allowed]
        if unknown:  # a few values, not all: a file that is not a mask must not be echoed back
            shown = str(unknown[:SHOWN_VALUES]) + (
                f" and {len(unknown) - SHOWN_VALUES} more" if len(unknown) > SHOWN_VALUES else "")
            raise UnknownLabelError(f"{where}: label value(s) {shown} are not in the label map ({self})")
        return present

    def match(self, name: str) -> Optional[int]:
        """The value of a structure by name or a usual synonym ("ET", "necrosis"...), any case
        or spelling; an exact name wins over a synonym. None when nothing matches."""
        query = normalise_name(name)
        for value, label in self.names.items():
            if normalise_name(label) == query:
                return value
        canonical = canonical_name(query)
        for value, label in self.names.items():
            if canonical is not None and canonical_name(label) == canonical:
                return value
        return None

    def by_name(self, name: str) -> int:
        """`match`, or UnknownLabelError naming the label map."""
        value = self.match(name)
        if value is None:
            raise UnknownLabelError(f"no label named '{name}' in the label map ({self})")
        return value

    def to_dict(self) -> dict:
        return {"labels": {str(v): n for v, n in self.names.items()}, "outside": self.outside}

    @classmethod
    def from_dict(cls, d: dict) -> "LabelMap":
        return cls({int(v): n for v, n in d["labels"].items()}, d.get("outside"))

    @classmethod
    def from_dataset_json(cls, labels: dict) -> "LabelMap":
        """From a dataset.json "labels" entry: nnU-Net v1/MSD {"1": "edema"} or v2 {"edema": 1}.

        nnU-Net v2 region entries ({"whole tumor": [1, 2, 3]}) name each value that has no
        name of its own after the smallest region holding it.
        """
        names: Dict[int, str] = {}
        regions = []
        for key, value in typed.obj(labels, "dataset.json", "labels").items():
            where = f"labels.{key}"
            if isinstance(value, str):
                names[_label_value(key, where)] = value
            elif isinstance(value, (list, tuple)):
                regions.append((len(value), key, [_label_value(v, where) for v in value]))
            else:
                names[_label_value(value, where)] = key
        for _, region, values in sorted(regions):
            for value in values:
                names.setdefault(value, region)
        names.pop(0, None)
        return cls(names)

    def __str__(self) -> str:
        text = ", ".join(f"{v} {n}" for v, n in self.names.items())
        return text + (f", {self.outside} outside" if self.outside is not None else "")


def label_array(array, where: str) -> np.ndarray:
    """Mask voxels as the int16 labels masks are on the model grid: non-integer values and values
    int16 cannot hold are refused, never rounded or wrapped (65540 would become 4)."""
    array = np.asarray(array)
    if array.dtype == np.int16 or not array.size:
        return array.astype(np.int16)
    if array.dtype.kind == "f" and not np.array_equal(array, np.round(array)):
        raise ValueError(f"{where}: the mask holds non-integer values (or NaN); give a label volume")
    low, high = array.min(), array.max()
    if low < -MAX_LABEL - 1 or high > MAX_LABEL:
        raise ValueError(f"{where}: the mask holds label values from {low:g} to {high:g}, outside the "
                         f"{-MAX_LABEL - 1}..{MAX_LABEL} a mask can hold; give a label volume with small labels")
    return array.astype(np.int16)


def _label_value(value, where: str) -> int:
    """A label value of a document: an integer (or its string) that fits the int16 masks."""
    if isinstance(value, str) and re.fullmatch(r"-?\d{1,6}", value.strip()):
        value = int(value)
    return typed.number(value, "dataset.json", where, 0, MAX_LABEL, integer=True)


def present_values(array) -> List[int]:
    """Sorted distinct values of a mask (bincount for the usual small non-negative ints: fast)."""
    array = np.asarray(array)
    if array.size and array.dtype.kind in "uib" and array.min() >= 0 and array.max() < 1 << 16:
        return np.flatnonzero(np.bincount(array.reshape(-1).astype(np.intp, copy=False))).tolist()
    values = np.unique(array)
    return [int(v) if float(v).is_integer() else float(v) for v in values]


BRATS = LabelMap({1: "necrotic core", 2: "edema", 4: "enhancing tumour"})
BRATS2023 = LabelMap({1: "necrotic core", 2: "edema", 3: "enhancing tumour"})
MSD_BRAIN = LabelMap({1: "edema", 2: "non-enhancing tumour", 3: "enhancing tumour"})
ABDOMEN_CT1K = LabelMap({1: "liver", 2: "kidney", 3: "spleen", 4: "pancreas"})
PRESETS = {"brats": BRATS, "brats2023": BRATS2023, "msd-brain": MSD_BRAIN, "abdomen": ABDOMEN_CT1K}


def preset(name: str) -> LabelMap:
    try:
        return PRESETS[name.lower()]
    except KeyError:
        raise UnknownLabelError(f"no label map preset '{name}'; choose one of {', '.join(PRESETS)}") from None
