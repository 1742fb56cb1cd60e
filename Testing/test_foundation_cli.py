"""The foundation issue's must-show, through the real console script: phantom -> files -> inspect."""
from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import SimpleITK as sitk
from click.testing import CliRunner

from gem3d.cli import COMMANDS, main


def gem3d(*args):
    return subprocess.run([sys.executable, "-m", "gem3d", *args], capture_output=True, text=True, timeout=300)


def test_help_lists_every_command():
    result = gem3d("--help")
    assert result.returncode == 0, result.stderr
    for command in COMMANDS:
        assert f"  {command} " in result.stdout, command
        sub = CliRunner().invoke(main, [command, "--help"])
        assert sub.exit_code == 0 and "Usage:" in sub.output, command


def test_british_spellings_are_the_commands_and_the_american_ones_still_work(brain_phantom, tmp_path):
    listing = gem3d("--help").stdout
    assert "  harmonise " in listing and "  harmonize " not in listing
    assert main.get_command(None, "harmonize") is main.get_command(None, "harmonise")
    assert "--move-to-centre" in CliRunner().invoke(main, ["edit-mask", "--help"]).output
    mask = brain_phantom / "labelsTr" / "brain_000.nii.gz"
    moved = {}
    for option in ("--move-to-centre", "--move-to-center"):
        out = tmp_path / f"{option.strip('-')}.nii.gz"
        result = CliRunner().invoke(main, ["edit-mask", "--mask", str(mask), "--out", str(out), option, "4"])
        assert result.exit_code == 0, result.output
        moved[option] = sitk.GetArrayFromImage(sitk.ReadImage(str(out)))
    np.testing.assert_array_equal(moved["--move-to-centre"], moved["--move-to-center"])
    assert not np.array_equal(moved["--move-to-centre"], sitk.GetArrayFromImage(sitk.ReadImage(str(mask))))


def test_phantom_dataset_reads_with_geometry_and_inspects_clean_then_broken(tmp_path):
    data = tmp_path / "D"
    assert gem3d("phantom", "--kind", "brain", "--cases", "4", "--size", "48", "--slices", "24",
                 "--out", str(data)).returncode == 0
    masks = sorted((data / "labelsTr").glob("*.nii.gz"))
    assert len(masks) == 4
    for path in masks:
        image = sitk.ReadImage(str(path))
        assert not np.allclose(image.GetSpacing(), 1.0)
        values = set(np.unique(sitk.GetArrayFromImage(image)).tolist())
        assert values <= {0, 1, 2, 4} and values & {1, 2, 4}, (path.name, values)
    result = gem3d("dataset", "inspect", str(data))
    assert result.returncode == 0, result.stdout + result.stderr

    broken = tmp_path / "broken"
    shutil.copytree(data, broken)
    victim = broken / "labelsTr" / "brain_002.nii.gz"
    mask = sitk.ReadImage(str(victim))
    mask.SetOrigin(tuple(o + 7.5 for o in mask.GetOrigin()))
    sitk.WriteImage(mask, str(victim))
    result = gem3d("dataset", "inspect", str(broken))
    assert result.returncode != 0
    report = result.stdout + result.stderr
    assert "brain_002" in report and "geometry" in report
    assert report.count("origin=") >= 2, "both geometries are named"
