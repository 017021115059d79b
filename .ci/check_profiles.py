"""Do the GPU install profiles still resolve? `pip install --dry-run --report` of each, on a
CPU machine (the resolver needs no GPU), so that a profile that stops resolving fails the
build, not a user on a cluster.

What is checked, honestly:
- ``cu13``: exactly README's command, ``pip install -c constraints.txt -e '.[cu13]'``, against
  the package index: torch 2.14.1 (CUDA 13.0) with its CUDA packages, FAISS, DALI, the rest.
- ``cu12``: README installs torch from download.pytorch.org/whl/cu126, which CI cannot reach,
  then ``pip install -c constraints.txt -e '.[cu12]'``. A metadata-only stand-in wheel
  ``torch 2.14.1+cu126`` (and ``torchvision 0.29.1+cu126``), with no dependencies, takes its
  place, under constraints.txt and the stand-ins' pins: the check proves that the FAISS and
  DALI builds and every other pin resolve beside that torch; the real cu126 wheel's own
  ``nvidia-*-cu12`` pins are not checked.

Exit 0 when every profile resolves, 1 (naming the profile and pip's last lines) otherwise.
The last line of output is one JSON object (profile -> seconds, packages, key versions).

    python .ci/check_profiles.py [--profiles cu12 cu13] [--project .] [-- extra pip args]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

# the builds README installs from download.pytorch.org, stood in for by metadata-only wheels
CU12_TORCH = {"torch": "2.14.1+cu126", "torchvision": "0.29.1+cu126"}
KEY_PACKAGES = ("torch", "torchvision", "faiss-cpu", "faiss-gpu", "nvidia-dali-cuda120",
                "nvidia-dali-cuda130", "nvidia-cuda-runtime", "nvidia-cuda-runtime-cu12")


def stub_wheel(folder: Path, name: str, version: str, requires: tuple[str, ...] = ()) -> Path:
    """A wheel that installs nothing and declares only ``name``, ``version`` and ``requires``:
    what the resolver reads of a package it cannot download."""
    dist = f"{name.replace('-', '_')}-{version}"
    path = folder / f"{dist}-py3-none-any.whl"
    metadata = "".join([f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
                        *(f"Requires-Dist: {r}\n" for r in requires)])
    with zipfile.ZipFile(path, "w") as wheel:
        wheel.writestr(f"{dist}.dist-info/METADATA", metadata)
        wheel.writestr(f"{dist}.dist-info/WHEEL", "Wheel-Version: 1.0\nGenerator: check_profiles"
                       "\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        wheel.writestr(f"{dist}.dist-info/RECORD", "")
    return path


def cu12_stand_ins(folder: Path, project: Path) -> Path:
    """The stand-in cu126 torch and torchvision wheels in ``folder``, and a constraints file
    that selects them under the project's constraints.txt (README's cu12 command passes it:
    ``==2.14.1`` admits ``2.14.1+cu126``); returns the constraints file."""
    stub_wheel(folder, "torch", CU12_TORCH["torch"])
    stub_wheel(folder, "torchvision", CU12_TORCH["torchvision"],
               (f"torch=={CU12_TORCH['torch']}",))
    constraints = folder / "cu12-constraints.txt"
    constraints.write_text((project / "constraints.txt").read_text() + "".join(
        f"{name}=={version}\n" for name, version in CU12_TORCH.items()))
    return constraints


def resolve(project: Path, extra: str, constraints: Path, report: Path,
            pip_args: list[str]) -> tuple[int, str, float]:
    """pip's dry run of ``-e project[extra]`` under ``constraints``: rc, output, seconds."""
    command = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed",
               "--quiet", "--report", str(report), "-c", str(constraints),
               "-e", f"{project}[{extra}]", *pip_args]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    return done.returncode, done.stdout + done.stderr, time.perf_counter() - start


def summary(report: Path) -> dict[str, object]:
    installs = json.loads(report.read_text())["install"]
    versions = {item["metadata"]["name"].lower(): item["metadata"]["version"] for item in installs}
    return {"packages": len(installs),
            **{name: versions[name] for name in KEY_PACKAGES if name in versions}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--profiles", nargs="+", default=["cu12", "cu13"])
    parser.add_argument("--project", type=Path, default=Path(__file__).resolve().parent.parent)
    parser.add_argument("pip_args", nargs="*", help="after --: passed to pip (e.g. --no-index)")
    args = parser.parse_args()
    project = args.project.resolve()
    results: dict[str, object] = {}
    failed = []
    with tempfile.TemporaryDirectory(prefix="check_profiles_") as tmp:
        folder = Path(tmp)

        def run(profile: str) -> tuple[int, str, float]:
            pip_args = list(args.pip_args)
            if profile == "cu12":
                constraints = cu12_stand_ins(folder, project)
                pip_args += ["--find-links", str(folder)]
            else:
                constraints = project / "constraints.txt"
            return resolve(project, profile, constraints, folder / f"{profile}.json", pip_args)

        with ThreadPoolExecutor(len(args.profiles)) as pool:  # pip waits on the network
            outcomes = dict(zip(args.profiles, pool.map(run, args.profiles)))
        for profile, (rc, output, seconds) in outcomes.items():
            if rc != 0:
                failed.append(profile)
                tail = "\n".join(line for line in output.splitlines()
                                 if not line.startswith("WARNING"))[-1500:]
                print(f"profile '{profile}' does not resolve (pip exit {rc}):\n{tail}",
                      file=sys.stderr)
                results[profile] = {"resolves": False, "seconds": round(seconds, 1)}
                continue
            results[profile] = {"resolves": True, "seconds": round(seconds, 1),
                                **summary(folder / f"{profile}.json")}
            print(f"profile '{profile}' resolves in {seconds:.1f} s: {results[profile]}")
    print(json.dumps(results))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
