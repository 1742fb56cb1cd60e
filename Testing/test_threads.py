"""The thread policy (gem3d.threads, issue 25): `--threads` and GEM3D_THREADS reach torch, bad
values are one sentence, the user's OMP_NUM_THREADS is left alone, and the Slicer module hands
its setting to the engine it starts."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from gem3d import threads

# Runs `gem3d ARGS`, then reports the thread count torch computes with in that process.
PROBE = ("import sys\nfrom gem3d.cli import main\ntry:\n    main(sys.argv[1:], prog_name='gem3d')\n"
         "except SystemExit as end:\n    assert not end.code, end.code\n"
         "import os, torch\nprint('THREADS', torch.get_num_threads(), os.environ.get('OMP_WAIT_POLICY'))")


def clean_environment(**extra):
    env = {k: v for k, v in os.environ.items() if k not in (*threads.POOLS, threads.ENV, "OMP_WAIT_POLICY")}
    return dict(env, **extra)


def probe(args, **env):
    done = subprocess.run([sys.executable, "-c", PROBE, *map(str, args)], capture_output=True, text=True,
                          env=clean_environment(**env), timeout=300)
    assert done.returncode == 0, done.stderr
    count, policy = done.stdout.split("THREADS")[-1].split()
    return int(count), policy


@pytest.fixture(scope="module")
def generate_args(brain_phantom, tiny_bundle, tmp_path_factory):
    def args(*before, after=()):
        out = tmp_path_factory.mktemp("threads") / "o.nii.gz"
        return [*before, "generate", *after, "--bundle", tiny_bundle, "--steps", "1", "--start", "0.5",
                "--device", "cpu", "--reference", brain_phantom / "imagesTr" / "brain_000_0000.nii.gz",
                "--mask", brain_phantom / "labelsTr" / "brain_000.nii.gz", "--out", out]
    return args


# The default is 1 on a busy machine and 2 on an idle one (2 cores): one of the two counts differs
# from it whatever the load. Torch caps a count from the environment at the machine's cores.
TWO = min(2, os.cpu_count() or 1)


def test_the_command_option_reaches_torch_in_a_real_generation(generate_args):
    assert probe(generate_args(after=["--threads", TWO])) == (TWO, "PASSIVE")


def test_the_environment_variable_reaches_torch_in_a_real_generation(generate_args):
    assert probe(generate_args(), GEM3D_THREADS="1") == (1, "PASSIVE")


def test_the_group_option_wins_over_the_environment_and_the_users_omp_setting_is_kept():
    assert probe(["--threads", "1", "phantom", "--help"], GEM3D_THREADS=str(TWO)) == (1, "PASSIVE")
    assert probe(["phantom", "--help"], OMP_NUM_THREADS="1") == (1, "None")


@pytest.mark.parametrize("args, env, where", [
    (["--threads", "0"], {}, "--threads"), (["--threads", "-1"], {}, "--threads"),
    (["--threads", "x"], {}, "--threads"), ([], {"GEM3D_THREADS": "x"}, "GEM3D_THREADS"),
    (["--threads", "1.5"], {}, "--threads")])
def test_a_bad_thread_count_is_refused_in_one_sentence(args, env, where):
    done = subprocess.run([sys.executable, "-m", "gem3d", *args, "phantom", "--help"], capture_output=True, text=True,
                          env=clean_environment(**env), timeout=60)
    assert done.returncode == 1
    assert done.stderr.startswith(f"Error: {where} must be a whole number of threads"), done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_a_command_level_bad_count_is_refused_too():
    done = subprocess.run([sys.executable, "-m", "gem3d", "worker", "--threads", "0"], capture_output=True,
                          text=True, env=clean_environment(), timeout=60, stdin=subprocess.DEVNULL)
    assert done.returncode == 1 and "--threads must be a whole number" in done.stderr, done.stderr


def test_default_uses_the_free_cores_and_one_thread_on_a_busy_machine():
    assert threads.default_threads(cores=2, load=0.2) == 2
    assert threads.default_threads(cores=2, load=1.0) == 1
    assert threads.default_threads(cores=2, load=6.0) == 1
    assert threads.default_threads(cores=16, load=4.2) == 12
    assert 1 <= threads.default_threads() <= threads.usable_cores()


def test_configure_sets_every_pool_and_a_loaded_torch(monkeypatch):
    for name in (*threads.POOLS, *threads.NO_SPINNING):
        monkeypatch.delenv(name, raising=False)
    before = torch.get_num_threads()
    try:
        assert threads.configure(3) == 3
        assert torch.get_num_threads() == 3
        assert all(os.environ[name] == "3" for name in threads.POOLS)
        assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    finally:
        torch.set_num_threads(before)


def test_the_slicer_module_passes_its_thread_setting_to_the_engine(tmp_path, monkeypatch):
    pytest.importorskip("slicer", reason="slicer-core is in the test extra")
    import slicer
    from mrml_fixtures import ROOT  # puts GEM3DEditor on sys.path

    from GEM3DEditorLib.logic import EditorLogic
    from GEM3DEditorLib.settings import EngineSettings

    monkeypatch.delenv(threads.ENV, raising=False)
    logic = EditorLogic(slicer.vtkMRMLScene(), None, str(tmp_path), gem3d_root=str(ROOT / "GEM3DCore"))
    assert logic.engine_environment("", threads=1)[threads.ENV] == "1"
    assert threads.ENV not in logic.engine_environment("", threads=0)
    assert EngineSettings(threads=1).engine_key != EngineSettings().engine_key  # a new count: a new worker
