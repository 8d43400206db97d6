"""The library is exactly what the notebooks export, and the notebooks are clean."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def git(*args):
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)


needs_git = pytest.mark.skipif(shutil.which("git") is None or git("rev-parse").returncode != 0,
                               reason="not a git checkout")


def run_tool(name):
    exe = BIN / name
    res = subprocess.run([str(exe) if exe.exists() else name], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def status(paths=("scdeep_nb", "nbs")):
    return git("status", "--porcelain", "--", *paths).stdout


@needs_git
def test_export_changes_nothing():
    before = status()
    run_tool("nbdev_export")
    assert status() == before, "nbdev_export changed scdeep_nb/: edit the notebooks, not the .py files, and " \
                               "commit what nbdev_export writes:\n" + git("diff", "--stat").stdout


@needs_git
def test_notebooks_are_clean():
    before = status()
    run_tool("nbdev_clean")
    assert status() == before, "nbdev_clean changed notebooks: run `make clean-nbs` and commit."


def test_settings_keep_tags_and_flags():
    from configparser import ConfigParser
    cfg = ConfigParser(delimiters=["="]); cfg.read(ROOT / "settings.ini")
    d = cfg["DEFAULT"]
    assert "tags" in d["allowed_cell_metadata_keys"].split()
    assert d["tst_flags"].split() == ["notest", "slow", "gpu"]
