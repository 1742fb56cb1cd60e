"""Shared fixtures: small phantom data and a tiny random-weight bundle (real files, no mocks)."""
from __future__ import annotations

import locale
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
torch.set_num_threads(min(2, torch.get_num_threads()))

BRATS_LABELS = {1: "necrotic core", 2: "edema", 4: "enhancing tumour"}


@pytest.fixture(autouse=True)
def thread_pools_restored():
    """An in-process CLI run sizes this process's thread pools (gem3d.threads, through os.environ and
    torch); each test starts from the session's pools, so no test inherits another's choice."""
    from gem3d import threads

    names = (*threads.POOLS, *threads.NO_SPINNING, threads.ENV)
    saved, count = {name: os.environ.get(name) for name in names}, torch.get_num_threads()
    yield
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    if torch.get_num_threads() != count:
        torch.set_num_threads(count)


@pytest.fixture(autouse=True)
def locale_restored():
    """Tests that write DICOM series with SimpleITK run GDCM's writer in this process, and it leaves the C
    locale at "C": Python's default text encoding is then ASCII for every later test (subprocess output
    with a non-ASCII character fails to decode). Each test starts from the session's locale."""
    saved = locale.setlocale(locale.LC_ALL)
    yield
    locale.setlocale(locale.LC_ALL, saved)


def tiny_config(window: int = 4, size: int = 32):
    from gem3d import config

    cfg = config.preset("tiny")
    cfg.data.labels = dict(BRATS_LABELS)
    cfg.data.slice_size = size
    cfg.vae.sample_size = size
    cfg.window_length = window
    return cfg


@pytest.fixture(scope="session")
def brain_phantom(tmp_path_factory):
    """3 phantom brains, 32 x 32 x 12 (nnU-Net raw layout + ground truth)."""
    from gem3d import phantom

    out = tmp_path_factory.mktemp("phantom") / "brain"
    phantom.write_dataset(out, "brain", cases=3, size=32, slices=12, seed=0)
    return out


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory):
    """A bundle with random weights: right shapes and conventions, meaningless images."""
    from gem3d.bundle import save_bundle
    from gem3d.models import build_slice_model, build_unet, build_vae

    torch.manual_seed(0)
    cfg = tiny_config()
    unet = build_unet(cfg)
    unet.add_volumetric_layers()
    modules = {"vae": build_vae(cfg), "unet": unet, "slice_model": build_slice_model(cfg)}
    return save_bundle(tmp_path_factory.mktemp("bundles") / "tiny", cfg, modules,
                       provenance={"command": "Testing/conftest.py (random weights)"})
