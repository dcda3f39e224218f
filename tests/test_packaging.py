"""What ``pip install cachemw`` would get: the sdist and the wheel built from this tree, and ``twine check``."""

from __future__ import annotations

import email.parser
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
_SKIP = shutil.ignore_patterns(".git", ".venv*", "build", "dist", "*.egg-info", "__pycache__", ".*_cache", "*.pyc",
                               "*.sqlite3", "results")


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    """The sdist and the wheel (built from the sdist, as ``python -m build`` does), and the build's output."""
    tree = tmp_path_factory.mktemp("tree") / "cachemw"
    shutil.copytree(REPO, tree, ignore=_SKIP)  # the checkout stays untouched (build/, egg-info)
    out = tree / "dist"
    done = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(tree)],
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    [sdist] = out.glob("*.tar.gz")
    [wheel] = out.glob("*.whl")
    return sdist, wheel, done.stdout + done.stderr


def test_the_wheel_holds_cachemw_only(dist: tuple[Path, Path, str]) -> None:
    _, wheel, _ = dist
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        metadata = email.parser.Parser().parsestr(
            archive.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode())
    assert {name.split("/")[0] for name in names} == {"cachemw", "cachemw-0.1.0.dist-info"}
    for shipped in ("cachemw/py.typed", "cachemw/static/dashboard.html", "cachemw/static/dashboard.js",
                    "cachemw-0.1.0.dist-info/licenses/LICENSE"):
        assert shipped in names
    assert metadata["License-Expression"] == "MIT"
    assert metadata["License"] is None  # the deprecated free-text field
    assert metadata.get_all("License-File") == ["LICENSE"]
    classifiers = metadata.get_all("Classifier") or []
    assert "Framework :: FastAPI" in classifiers and "Typing :: Typed" in classifiers


def test_the_sdist_ships_no_half_test_suite(dist: tuple[Path, Path, str]) -> None:
    sdist, _, _ = dist
    with tarfile.open(sdist) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    tops = {name.split("/")[0] for name in names}
    assert tops <= {"cachemw", "cachemw.egg-info", "LICENSE", "MANIFEST.in", "PKG-INFO", "README.md",
                    "pyproject.toml", "setup.cfg"}, tops
    assert {"LICENSE", "README.md", "pyproject.toml", "cachemw/static/dashboard.html"} <= names


def test_the_build_is_clean_and_twine_check_passes(dist: tuple[Path, Path, str]) -> None:
    sdist, wheel, output = dist
    assert "deprecat" not in output.lower(), output  # e.g. "WARNING `project.license` as a TOML table is deprecated"
    done = subprocess.run([sys.executable, "-m", "twine", "check", "--strict", str(sdist), str(wheel)],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
