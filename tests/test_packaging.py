"""The wheel: kscan's code, its shipped files and its licence, and a `kscan` that runs.

A wheel is built from a copy of the source tree (`pip wheel --no-deps
--no-build-isolation`, offline), its file list checked, then installed with --no-deps
into a fresh venv that sees the dependencies of the test venv through a path entry (not
its .pth files, so the test venv's editable kscan stays out). From outside the source
tree, `kscan --help`, `kscan --contrib-dir` and a configuration error's hint must name
the installed copy of the shipped files.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from kscan.shipped import CONTRIB_FILES, contrib_dir, contrib_path

ROOT = Path(__file__).resolve().parent.parent
SKIP = shutil.ignore_patterns(".git", ".venv", "build", "*.egg-info", "__pycache__",
                              ".*_cache", ".hypothesis", "out")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=SKIP, symlinks=True)
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                          "--no-build-isolation", "--no-index", "-q", "-w", str(tmp / "dist"),
                          str(src)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    (whl,) = (tmp / "dist").glob("kscan-*.whl")
    yield whl


def test_source_tree_has_every_shipped_file() -> None:
    assert contrib_dir() == ROOT / "kscan" / "contrib"
    for name in CONTRIB_FILES:
        assert contrib_path(name).is_file(), name
    # Nothing shipped is left out of the list the wheel test checks.
    on_disk = {p.relative_to(contrib_dir()).as_posix()
               for p in contrib_dir().rglob("*") if p.is_file()}
    assert on_disk == set(CONTRIB_FILES)


def test_licence_is_apache_2_as_pyproject_says() -> None:
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert 'license = "Apache-2.0"' in (ROOT / "pyproject.toml").read_text()


def test_wheel_holds_code_shipped_files_and_licence(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        entry = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
        entry_points = z.read(entry).decode()
        meta = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    for name in CONTRIB_FILES:
        assert f"kscan/contrib/{name}" in names, name
    for module in ("kscan/shipped.py", "scanner/commands/cli.py", "store/__init__.py",
                   "translate/__init__.py"):
        assert module in names, module
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names), sorted(names)
    assert "kscan = scanner.commands.cli:main" in entry_points
    assert "License-Expression: Apache-2.0" in meta
    assert not any(n.startswith(("tests/", "tools/", "perf/")) for n in names)


def test_installed_wheel_runs_and_names_its_files(wheel: Path, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True,
                   timeout=300)
    py = venv / "bin" / "python"
    res = subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install",
                          "--no-deps", "--no-index", "-q", str(wheel)],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    site = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()"
                           "['purelib'])"], capture_output=True, text=True, check=True,
                          timeout=60).stdout.strip()
    # The dependencies, from the test venv: a bare path entry, so that venv's own .pth
    # files (its editable kscan) are not processed.
    (Path(site) / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "KSCAN_DB")}
    env["HOME"] = str(tmp_path)

    def kscan(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(venv / "bin" / "kscan"), *args], capture_output=True,
                              text=True, timeout=120, cwd=tmp_path, env=env)

    res = kscan("--help")
    assert res.returncode == 0 and "usage: kscan" in res.stdout, res.stderr
    res = kscan("--contrib-dir")
    assert res.returncode == 0, res.stderr
    installed = Path(res.stdout.strip())
    assert installed == Path(site) / "kscan" / "contrib"
    for name in CONTRIB_FILES:
        assert (installed / name).is_file(), name
    # A configuration error's hint names the installed example, not a source path.
    conf = tmp_path / "k.toml"
    conf.write_text("no_such_key = 1\n")
    res = kscan("run", "--config", str(conf), "--check-config")
    assert res.returncode == 2
    assert f"see {installed / 'kscan.toml.example'} for every key" in res.stderr
