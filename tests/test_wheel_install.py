"""Installed as users install it: the wheel built from this tree, installed with pip into a fresh virtual
environment that sees only what the wheel declares, then its `timm-scheme` console script run from elsewhere.

Reinstalling torch in a test is out of reach, so the fresh environment borrows this environment's installed
distributions, but only the closure of the wheel's requirements (its extras left out): their files are linked
into the fresh site-packages, everything else (pytest, the extras, this checkout and its editable install) is
absent there. A dependency the code uses but the wheel does not declare fails the run.
"""
from __future__ import annotations

import email
import importlib.metadata
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
# what a build of this tree must not read or write: local state, caches, build outputs
NOT_SOURCE = (".git", ".venv", ".cache", "build", "dist", "site", "*.egg-info", "__pycache__", ".pytest_cache",
              ".hypothesis")


def build_wheel(tmp_path: Path) -> Path:
    """The wheel, built offline from a copy of the tree (an in-tree build would write build/ into the checkout)."""
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(*NOT_SOURCE))
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
         "--disable-pip-version-check", "-w", str(tmp_path / "wheel"), str(source)], cwd=tmp_path)
    wheels = list((tmp_path / "wheel").glob("timm_scheme-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def requirement_closure(requirements, installed) -> set:
    """Canonical names of the installed distributions the requirements reach, transitively, markers evaluated
    (a requirement's extras bring their own requirements)."""
    closure, todo = set(), [(Requirement(r), "") for r in requirements]
    while todo:
        requirement, extra = todo.pop()
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": extra}):
            continue
        name = canonicalize_name(requirement.name)
        assert name in installed, f"{requirement} is required but not installed in this environment"
        if name in closure and not requirement.extras:
            continue
        closure.add(name)
        todo += [(Requirement(r), e) for r in installed[name].requires or () for e in ("", *requirement.extras)]
    return closure


def link_closure(closure: set, installed, site_packages: Path) -> None:
    """Link the closure's top-level files and folders (packages, .libs, .pth, dist-info) into site_packages."""
    owners = {}
    for name, dist in installed.items():
        for file in dist.files or ():
            if file.parts[0] not in ("..", "__pycache__"):
                owners.setdefault(file.parts[0], set()).add(name)
    for top, names in sorted(owners.items()):
        if names & closure:
            assert names <= closure, f"{top} also holds {sorted(names - closure)}, which would come along"
            link = site_packages / top
            if not link.exists():
                link.symlink_to(installed[next(iter(names))].locate_file(top))


def run(command, cwd, env=None, check=True) -> subprocess.CompletedProcess:
    result = subprocess.run([str(c) for c in command], cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=300)
    if check:
        assert result.returncode == 0, f"{command}\n{result.stdout}\n{result.stderr}"
    return result


def test_the_wheel_installs_into_a_fresh_environment_and_its_demo_passes(tmp_path):
    wheel = build_wheel(tmp_path)
    with zipfile.ZipFile(wheel) as archive:
        metadata = email.message_from_bytes(archive.read(next(n for n in archive.namelist()
                                                              if n.endswith(".dist-info/METADATA"))))
        assert archive.read(next(n for n in archive.namelist() if n.endswith(".dist-info/licenses/LICENSE"))) \
            == (ROOT / "LICENSE").read_bytes()
    assert "Apache License" in (ROOT / "LICENSE").read_text() and metadata["License-File"] == "LICENSE"

    venv = tmp_path / "venv"
    # without pip: ensurepip would add a setuptools of its own beside the one torch's requirements link in
    run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=tmp_path)
    python = venv / "bin" / "python"
    site_packages = Path(run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             cwd=tmp_path).stdout.strip())
    run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "-q",
         "--disable-pip-version-check", wheel], cwd=tmp_path)  # this environment's pip, installing there

    here = {str(Path(p)) for p in {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}}
    installed = {canonicalize_name(d.metadata["Name"]): d for d in importlib.metadata.distributions(path=list(here))}
    closure = requirement_closure(metadata.get_all("Requires-Dist"), installed)
    assert {"torch", "timm", "scikit-learn"} <= closure and not {"pytest", "transformers", "onnx"} & closure
    link_closure(closure, installed, site_packages)

    # outside the checkout, with no PYTHON* variables: nothing but the fresh environment decides what imports
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}", HF_HUB_OFFLINE="1")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    # every requirement of every distribution there (the wheel's included) met, versions too
    run([sys.executable, "-m", "pip", "--python", python, "check", "--disable-pip-version-check"], cwd=elsewhere)
    probe = run([python, "-c", "import importlib.util, json, sys; "
                 "print(json.dumps([importlib.util.find_spec('timm_scheme').origin, sys.path]))"],
                cwd=elsewhere, env=env)
    origin, path = json.loads(probe.stdout)
    assert Path(origin).is_relative_to(site_packages / "timm_scheme"), origin  # the wheel's copy, not the checkout's
    assert not [p for p in path if p and Path(p).resolve().is_relative_to(ROOT)], path
    # the negative control: installed here, not a dependency, so absent there (module and metadata alike)
    assert importlib.util.find_spec("pytest") is not None
    refused = run([python, "-c", "import pytest"], cwd=elsewhere, env=env, check=False)
    assert refused.returncode != 0 and "No module named 'pytest'" in refused.stderr, refused.stderr
    refused = run([python, "-c", "import importlib.metadata as m; m.version('pytest')"], cwd=elsewhere, env=env,
                  check=False)
    assert refused.returncode != 0 and "PackageNotFoundError" in refused.stderr, refused.stderr

    demo = run([venv / "bin" / "timm-scheme", "demo", "--steps", "4", "--batch-size", "16", "--img-size", "16",
                "--no-progress"], cwd=elsewhere, env=env, check=False)
    out = demo.stdout
    assert demo.returncode == 0, f"{out}\n{demo.stderr}"
    assert "== summary ==" in out and "mixers replaced        12" in out and "check: PASS" in out, out


def test_a_broken_install_without_scikit_learn_says_to_reinstall(monkeypatch):
    from timm_scheme.training.digits import load_digits_tensors

    # what an install that lost scikit-learn gives, also after another test imported it
    for name in [n for n in sys.modules if n == "sklearn" or n.startswith("sklearn.")] or ["sklearn"]:
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ImportError, match=r"scikit-learn, a dependency of timm-scheme .*pip install timm-scheme$"):
        load_digits_tensors()
