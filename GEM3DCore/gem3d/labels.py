"""Label maps: which integer in a mask means which structure.

A mask value that is not in the label map is an error, never a silent zero: a model
trained on BraTS 2021 (enhancing = 4) must not quietly ignore BraTS 2023's enhancing = 3.
Value 0 is always background; `outside` optionally names an extra value (e.g. -1 for
"outside the body") that masks may contain.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

import numpy as np


class UnknownLabelError(ValueError):
    """A mask holds values, or a user asked for names, that the label map does not know."""


SYNONYMS = {  # normalised query -> names it may stand for, first present wins
    "necrosis": ("necrotic core", "non-enhancing tumour"),
    "necrotic": ("necrotic core", "non-enhancing tumour"),
    "ncr": ("necrotic core", "non-enhancing tumour"),
    "net": ("non-enhancing tumour", "necrotic core"),
    "non-enhancing": ("non-enhancing tumour", "necrotic core"),
    "ed": ("edema",),
    "oedema": ("edema",),
    "et": ("enhancing tumour",),
    "enhancing": ("enhancing tumour",),
    "kidneys": ("kidney",),
}


def _normalise(name: str) -> str:
    return " ".join(name.lower().replace("_", " ").split()).replace("tumor", "tumour")


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
        if unknown:
            raise UnknownLabelError(f"{where}: label value(s) {unknown} are not in the label map ({self})")
        return present

    def by_name(self, name: str) -> int:
        """The value of a structure, by name or a usual synonym ("ET", "necrosis"...), any case."""
        query = _normalise(name)
        by_normalised = {_normalise(n): v for v, n in self.names.items()}
        for candidate in (query,) + SYNONYMS.get(query, ()):
            if candidate in by_normalised:
                return by_normalised[candidate]
        raise UnknownLabelError(f"no label named '{name}' in the label map ({self})")

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
        for key, value in labels.items():
            if isinstance(value, str):
                names[int(key)] = value
            elif isinstance(value, (list, tuple)):
                regions.append((len(value), key, [int(v) for v in value]))
            else:
                names[int(value)] = key
        for _, region, values in sorted(regions):
            for value in values:
                names.setdefault(value, region)
        names.pop(0, None)
        return cls(names)

    def __str__(self) -> str:
        text = ", ".join(f"{v} {n}" for v, n in self.names.items())
        return text + (f", {self.outside} outside" if self.outside is not None else "")


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
