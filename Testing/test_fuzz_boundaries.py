"""Property-based fuzzing of the typed layer (issue 21, docs/faults.md class G): generated
documents (bundle.json, dataset.json, edits, configs, requests), NRRD/MetaImage headers and
option values. Each either parses or is refused with one sentence (a ValueError or OSError
with a one-line message); never another exception, never a traceback, nothing written."""
from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gem3d import typed

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
SCALARS = st.none() | st.booleans() | st.integers(-2 ** 70, 2 ** 70) | st.floats(allow_nan=False) | st.text(max_size=12)
JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                        max_size=4), max_leaves=12)
NUMBERS = st.floats(allow_nan=True, allow_infinity=True) | st.integers(-2 ** 40, 2 ** 40)


def refused_in_one_sentence(call):
    """Run `call`; an error must be a ValueError/OSError with a one-line message."""
    try:
        return call()
    except (ValueError, OSError) as err:
        text = str(err)
        assert text and "\n" not in text.strip() and "Traceback" not in text, text
        return None


def files_in(folder: Path) -> list:
    return sorted(p.name for p in folder.rglob("*"))


def document(key_values):
    """A JSON document that mixes known keys with generated values (so fuzzing reaches the
    field checks, not only the first type check)."""
    return st.fixed_dictionaries({}, optional={k: v for k, v in key_values.items()}) | JSON


@FAST
@given(document({"format": st.just("gem3d-bundle") | JSON, "format_version": st.just(1) | JSON,
                 "config": JSON, "weights": st.dictionaries(st.sampled_from(["vae", "unet", "x"]), JSON) | JSON,
                 "provenance": JSON, "volumetric": JSON}))
def test_fuzz_bundle_json(value):
    from gem3d.bundle_format import read_info

    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "bundle.json").write_text(json.dumps(value))
        refused_in_one_sentence(lambda: read_info(folder))
        assert files_in(Path(folder)) == ["bundle.json"]


@FAST
@given(document({"labels": JSON | st.dictionaries(st.text(max_size=4), st.integers() | st.text(max_size=4)),
                 "file_ending": st.just(".nii.gz") | JSON, "channel_names": JSON, "training": JSON, "test": JSON}))
def test_fuzz_dataset_json(value):
    from gem3d.datasets import open_dataset

    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "dataset.json").write_text(json.dumps(value))
        refused_in_one_sentence(lambda: open_dataset(folder))
        assert files_in(Path(folder)) == ["dataset.json"]


EDIT = st.fixed_dictionaries({"op": st.sampled_from(["flip", "rotate", "translate", "scale", "move_toward_center",
                                                     "relabel", "copy_lesion", "bogus"])},
                             optional={"axis": JSON, "degrees": st.lists(NUMBERS, max_size=4) | JSON,
                                       "mm": st.lists(NUMBERS, max_size=4) | JSON, "factor": NUMBERS | JSON,
                                       "max_px": NUMBERS, "fraction": NUMBERS, "labels": JSON,
                                       "mapping": st.dictionaries(st.text(max_size=3), NUMBERS | JSON, max_size=2),
                                       "max_degrees": NUMBERS | JSON})


@FAST
@given(st.lists(EDIT, max_size=3) | JSON)
def test_fuzz_edits_file_and_applying_it(value):
    import warnings

    from gem3d.mask_edits import apply_edits, read_edits
    from gem3d.volume import Geometry, Volume

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "edits.json"
        path.write_text(json.dumps(value, allow_nan=True))
        specs = refused_in_one_sentence(lambda: read_edits(path))
        if specs is not None:
            mask = np.zeros((6, 8, 8), np.int16)
            mask[2:4, 3:5, 3:5] = 1
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                refused_in_one_sentence(lambda: apply_edits(Volume(mask, Geometry((1, 1, 1), (0, 0, 0), np.eye(3))),
                                                            specs, np.random.default_rng(0)))
        assert files_in(Path(folder)) == ["edits.json"]


@FAST
@given(st.text(max_size=200) | st.builds(lambda v: json.dumps(v), JSON)
       | st.builds(lambda k, v: f"preset: tiny\n{k}:\n  {v}\n", st.sampled_from(["train", "diffusion", "vae", "data"]),
                   st.text(max_size=30)))
def test_fuzz_config_files(text):
    from gem3d.config import load_config

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "c.yaml"
        path.write_text(text, encoding="utf-8")
        refused_in_one_sentence(lambda: load_config(path))
        assert files_in(Path(folder)) == ["c.yaml"]


@FAST
@given(st.dictionaries(st.sampled_from(["reference", "mask", "out", "mask_out", "start", "steps", "seed", "eta",
                                        "edits", "informed", "device", "overwrite", "bogus"]),
                       JSON | NUMBERS, max_size=6))
def test_fuzz_request_documents(fields):
    from gem3d.protocol import request_from_dict

    data = {"reference": "r.nii.gz", "mask": "m.nii.gz", "out": "o.nii.gz", **fields}
    refused_in_one_sentence(lambda: request_from_dict(data))


HEADER_VALUES = st.text(alphabet="0123456789 -.e(),/%abcdLIST", max_size=30)


@FAST
@given(st.sampled_from([".nrrd", ".nhdr", ".mha", ".mhd"]),
       st.lists(st.tuples(st.sampled_from(["type", "dimension", "sizes", "encoding", "endian", "data file",
                                           "space directions", "space origin", "NDims", "DimSize", "ElementType",
                                           "ElementDataFile", "TransformMatrix", "ElementSpacing"]),
                          HEADER_VALUES | st.sampled_from(["uchar", "short", "raw", "gzip", "little", "3",
                                                           "800 800 800", "MET_UCHAR", "LOCAL", "/etc/hostname"])),
                max_size=8),
       st.binary(max_size=64))
def test_fuzz_volume_headers(suffix, fields, payload):
    from gem3d.io import read_volume

    nrrd = suffix in (".nrrd", ".nhdr")
    lines = ["NRRD0004"] if nrrd else ["ObjectType = Image"]
    lines += [f"{k}: {v}" if nrrd else f"{k} = {v}" for k, v in fields]
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"v{suffix}"
        path.write_bytes(("\n".join(lines) + "\n\n").encode() + payload)
        volume = refused_in_one_sentence(lambda: read_volume(path))
        if volume is not None:
            assert volume.array.size <= 1 << 28
        assert files_in(Path(folder)) == [path.name]


@pytest.fixture(scope="module")
def small_mask(tmp_path_factory):
    from gem3d.io import write_volume
    from gem3d.volume import Geometry, Volume

    mask = np.zeros((6, 8, 8), np.int16)
    mask[2:4, 3:5, 3:5] = 1
    return write_volume(Volume(mask, Geometry((1, 1, 1), (0, 0, 0), np.eye(3))),
                        tmp_path_factory.mktemp("fuzz") / "m.nii.gz")


@FAST
@given(st.sampled_from(["--translate", "--rotate", "--scale", "--move-to-center"]),
       st.lists(st.floats(allow_nan=True, allow_infinity=True) | st.integers(-10 ** 6, 10 ** 6), min_size=3,
                max_size=3))
def test_fuzz_edit_mask_option_values(small_mask, option, values):
    from click.testing import CliRunner

    from gem3d.cli import main

    count = 3 if option in ("--translate", "--rotate") else 1
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "o.nii.gz"
        result = CliRunner().invoke(main, ["edit-mask", "--mask", str(small_mask), "--out", str(out), option,
                                           *[str(v) for v in values[:count]]])
        assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
        finite = all(math.isfinite(float(v)) for v in values[:count])
        if result.exit_code == 0:
            assert finite and files_in(Path(folder)) == ["o.json", "o.nii.gz"]
        else:
            assert files_in(Path(folder)) == [], result.output
            assert "Traceback" not in result.output


@FAST
@given(st.text(max_size=300) | st.binary(max_size=300))
def test_fuzz_typed_loads(text):
    try:
        value = typed.loads(text, "doc")
    except typed.DocumentError as err:
        assert "\n" not in str(err) and str(err).startswith("doc: ")
    else:
        assert typed.depth(value) <= typed.MAX_DEPTH
