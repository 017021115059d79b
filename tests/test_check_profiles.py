"""CI's profile resolution step (.ci/check_profiles.py) on a described package index: a
local folder of metadata-only wheels that repeats the conflict the cu13 profile once had
(a FAISS wheel needing CUDA runtime >= 13.2 beside a torch pinning 13.0). Real pip, real
resolver, no network."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / ".ci" / "check_profiles.py"


def load_script():
    spec = importlib.util.spec_from_file_location("check_profiles", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def described_project(tmp_path: Path, cu13_faiss: str) -> tuple[Path, Path]:
    """A project like dcluster's setup.py, and an index folder with the wheels it names."""
    check_profiles = load_script()
    index = tmp_path / "index"
    index.mkdir()
    for name, version, requires in [
            ("torch", "2.14.1", ("runtime==13.0",)), ("torchvision", "0.29.1", ("torch",)),
            ("runtime", "13.0", ()), ("runtime", "13.2", ()), ("runtime-cu12", "12.9", ()),
            ("faiss-new", "1.15.1", ("runtime>=13.2",)), ("faiss-old", "1.15.1", ("runtime-cu12",)),
            ("dali-cuda120", "2.4.0", ())]:
        check_profiles.stub_wheel(index, name, version, requires)
    project = tmp_path / "project"
    project.mkdir()
    (project / "setup.py").write_text(
        "from setuptools import setup\n"
        "setup(name='described', version='0.1', py_modules=[],\n"
        "      install_requires=['torch>=2.11,<2.15', 'torchvision>=0.26,<0.30'],\n"
        "      extras_require={'cu12': ['faiss-old', 'dali-cuda120'],\n"
        f"                      'cu13': ['{cu13_faiss}']}})\n")
    (project / "constraints.txt").write_text("torch==2.14.1\ntorchvision==0.29.1\n")
    return project, index


def run_check(project: Path, index: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--project", str(project), "--", "--no-index",
         "--find-links", str(index), "--no-build-isolation"],
        capture_output=True, text=True, timeout=300)


def test_a_profile_that_cannot_resolve_fails_the_step_and_is_named(tmp_path):
    project, index = described_project(tmp_path, cu13_faiss="faiss-new")
    done = run_check(project, index)
    assert done.returncode == 1, done.stderr
    assert "profile 'cu13' does not resolve" in done.stderr
    results = json.loads(done.stdout.splitlines()[-1])
    assert results["cu13"]["resolves"] is False
    # cu12 resolves beside the stand-in for download.pytorch.org's torch
    assert results["cu12"]["resolves"] is True and results["cu12"]["torch"] == "2.14.1+cu126"


def test_profiles_that_resolve_pass_the_step(tmp_path):
    project, index = described_project(tmp_path, cu13_faiss="faiss-old")
    done = run_check(project, index)
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout.splitlines()[-1])
    assert results["cu13"]["torch"] == "2.14.1" and results["cu13"]["resolves"] is True
