"""The wheels a bare PyTorch GPU host needs to run benchmarks/gpu_check.py, in one folder.

Such a host (a cluster's compute node: no network, an image with Python 3.12, torch 2.11+
and torchvision, and so numpy and pillow) lacks only small pure or compiled packages; the
folder must stay under 64 MiB to travel with the check. Not included, on purpose: torch,
torchvision, numpy, pillow (the host's own), MLflow, matplotlib, scikit-learn (the check
runs with tracking and plots off), DALI and a FAISS GPU build (hundreds of MB: those
sections say "skipped: not installed"). dcluster itself goes in as a wheel, installed
without its pinned dependencies. The demo digits (``digits/``, 1,797 small JPEGs written by
``dcluster demo-data``, 1.4 MiB: scikit-learn, which holds them, is not carried) go
beside the wheels for the check's ``cli_train`` section, and count towards the limit.

    python benchmarks/gpu_check_wheels.py [--out gpu-check-wheels] [--python 3.12]

The last line of output is one JSON object (files, total MiB); exit 1 over the limit.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LIMIT_MIB = 64
# the closure of what dcluster's train path and the check import beyond torch, torchvision,
# numpy and pillow (dependencies listed by hand: --no-deps keeps pip from pulling numpy or
# torch for the target), each at the version installed here, where CI tests it
DISTRIBUTIONS = (
    "faiss-cpu", "packaging",  # packaging: faiss-cpu's
    "scipy",  # dcluster.core.metrics (Hungarian accuracy)
    "omegaconf", "PyYAML",  # the config; omegaconf 2.4 needs no antlr4
    "tqdm", "submitit", "cloudpickle",  # cloudpickle: submitit's (typing_extensions: torch's)
)

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "gpu-check-wheels")
    parser.add_argument("--python", default="3.12", help="the host's Python (major.minor)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    abi = "cp" + args.python.replace(".", "")
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                    "--only-binary", ":all:", "--python-version", args.python,
                    "--implementation", "cp", "--abi", abi, "--abi", "abi3", "--abi", "none",
                    "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux2014_x86_64",
                    "--platform", "manylinux_2_17_x86_64", "--platform", "any",
                    "-d", str(args.out),
                    *(f"{name}=={importlib.metadata.version(name)}" for name in DISTRIBUTIONS)],
                   check=True)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
                    "--no-build-isolation", "-w", str(args.out), str(ROOT)], check=True)
    subprocess.run([sys.executable, "-m", "dcluster", "demo-data", str(args.out / "digits")],
                   check=True, cwd=ROOT)
    files = sorted(args.out.glob("*.whl"))
    digits = sum(p.stat().st_size for p in (args.out / "digits").rglob("*") if p.is_file())
    total = (sum(p.stat().st_size for p in files) + digits) / 2**20
    for path in files:
        print(f"{path.stat().st_size / 2**20:8.2f} MiB  {path.name}")
    print(f"{digits / 2**20:8.2f} MiB  digits/ (the demo digits)")
    print(f"{total:8.2f} MiB in {len(files)} wheels and the digits, in {args.out}")
    print("on the host, from a copy of this repository with the folder beside it:\n"
          f"  python3 -m venv --system-site-packages .venv-gpu-check && "
          f".venv-gpu-check/bin/pip install --no-index --find-links {args.out} --no-deps "
          f"{args.out}/*.whl && .venv-gpu-check/bin/python benchmarks/gpu_check.py")
    print(json.dumps({"wheels": [p.name for p in files], "digits_mib": round(digits / 2**20, 2),
                      "total_mib": round(total, 2),
                      "limit_mib": LIMIT_MIB}))
    return 0 if total < LIMIT_MIB else 1


if __name__ == "__main__":
    sys.exit(main())
