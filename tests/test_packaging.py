"""The wheel: built from a copy of the checkout, it holds attnhub/registry.yaml as a real file, the py.typed
marker, the backends as attnhub.backends (never a top-level `backends`), and, installed into a bare folder,
`python -m attnhub check` runs from there (not from the checkout) and passes.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

ROOT = Path(__file__).parents[1]
BACKEND_FILES = sorted(p.relative_to(ROOT / "backends").as_posix() for pattern in ("*.py", "*.cpp")
                       for p in (ROOT / "backends").rglob(pattern))  # the C++ replay's source is built where installed


def _build_wheel(tmp_path: Path) -> Path:
    """Build from a copy (setuptools writes build/ and *.egg-info next to pyproject.toml): the checkout stays clean."""
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, symlinks=True,  # keep attnhub/registry.yaml a symlink, as in the checkout
                    ignore=shutil.ignore_patterns(".git", ".venv", "build", "dist", "__pycache__", "*.egg-info"))
    out = tmp_path / "dist"
    if importlib.util.find_spec("build") is not None:
        cmd = [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(out), str(src)]
    else:
        cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(out), str(src)]
    run = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    (wheel,) = out.glob("attnhub-*.whl")
    return wheel


def _check_contents(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        infos = {i.filename: i for i in zf.infolist()}
        for data in ("registry.yaml", "measured.yaml"):  # symlinks in the checkout, real files in the wheel
            info = infos.get(f"attnhub/{data}")
            assert info is not None, sorted(infos)
            assert stat.S_IFMT(info.external_attr >> 16) != stat.S_IFLNK, f"{data} stored as a symlink"
            assert zf.read(info) == (ROOT / data).read_bytes()
        assert "attnhub/py.typed" in infos, "no py.typed: type checkers would ignore attnhub's annotations"
        assert "triton_fa_rope/kernels.py" in BACKEND_FILES  # subpackages included
        for name in BACKEND_FILES:
            path = f"attnhub/backends/{name}"
            assert path in infos, f"{path} missing from {wheel.name}"
            assert zf.read(path) == (ROOT / "backends" / name).read_bytes()
    tops = {name.split("/", 1)[0] for name in infos}
    dist_info = {t for t in tops if t.endswith(".dist-info")}
    assert len(dist_info) == 1 and tops - dist_info == {"attnhub"}, f"top-level entries: {sorted(tops)}"


_WHERE = textwrap.dedent(
    """
    import importlib, importlib.resources, json
    import attnhub
    from attnhub.registry import REGISTRY

    math = importlib.import_module("attnhub.backends.math")
    print(json.dumps({
        "attnhub": attnhub.__file__,
        "math": math.__file__,
        "registry": str(importlib.resources.files("attnhub").joinpath("registry.yaml")),
        "sources": sorted({spec.source for spec in REGISTRY.specs().values()}),
    }))
    """
)


def test_wheel_contents_and_installed_check(tmp_path):
    wheel = _build_wheel(tmp_path)
    _check_contents(wheel)

    target, cwd = tmp_path / "site", tmp_path / "elsewhere"
    cwd.mkdir()
    run = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-compile", "--quiet",
                          "--disable-pip-version-check", "--target", str(target), str(wheel)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    # Only the installed copy on the path: torch and triton still come from the venv's site-packages.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "ATTNHUB_REGISTRY", "ATTNHUB_BACKEND")}
    env.update(PYTHONPATH=str(target), TRITON_INTERPRET="1")

    where = subprocess.run([sys.executable, "-c", _WHERE], cwd=cwd, env=env, capture_output=True, text=True,
                           timeout=300)
    assert where.returncode == 0, where.stderr[-3000:]
    paths = json.loads(where.stdout.strip().splitlines()[-1])
    for what in ("attnhub", "math", "registry"):
        assert Path(paths[what]).resolve().is_relative_to(target.resolve()), (what, paths[what])
    assert len(paths["sources"]) == 1 and Path(paths["sources"][0]).resolve().is_relative_to(target.resolve())

    check = subprocess.run([sys.executable, "-m", "attnhub", "check"], cwd=cwd, env=env, capture_output=True,
                           text=True, timeout=300)
    assert check.returncode == 0, check.stdout[-3000:] + check.stderr[-3000:]
    assert re.search(r"^\d+ passed, 0 failed, 0 skipped$", check.stdout, re.M), check.stdout[-2000:]
    assert re.search(r"^  triton_fa_rope\s+float32\s+PASS", check.stdout, re.M), check.stdout[-2000:]
    assert str(ROOT) not in check.stdout + check.stderr
