"""CI installs only from the package registries: `make demo-oldest-torch` names no file
outside the repository and the virtual environment it builds (it once needed a torch wheel
staged at /opt/wheels, and a fresh runner without it exited 2), and its torch is a
requirement pinned by hash in .ci/oldest-torch.txt."""
import os
import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OLDEST_TORCH = REPO / ".ci" / "oldest-torch.txt"
PINNED = re.compile(r"^[A-Za-z0-9_.-]+==[0-9][0-9A-Za-z.]* --hash=sha256:[0-9a-f]{64}$")


def test_the_oldest_torch_demo_names_no_file_outside_the_repository_and_its_venv(tmp_path):
    """`make -n` prints the target's commands without running any."""
    venv = tmp_path / "venv"
    # under `make test` (as CI runs it) the make variables of the outer make would have this
    # one print "Entering directory <repo>": a path, but not one the target names
    env = {key: value for key, value in os.environ.items()
           if key not in ("PYTHONPATH", "MAKELEVEL", "MAKEFLAGS", "MFLAGS")}
    printed = subprocess.run(["make", "-n", "--no-print-directory", "demo-oldest-torch",
                              f"VENV={venv}"], cwd=REPO,
                             env=env, capture_output=True, text=True, check=True,
                             timeout=60).stdout
    paths = [token for token in re.split(r"[\s'\"(),:=]+", printed) if token.startswith("/")]
    assert paths and all(Path(p).is_relative_to(tmp_path) for p in paths), paths
    install = next(line for line in printed.splitlines() if "pip install" in line
                   and "--target" in line)
    assert "--require-hashes" in install and "--no-deps" in install
    assert f"-r {OLDEST_TORCH.relative_to(REPO)}" in printed


def test_the_oldest_torch_is_a_requirement_pinned_by_version_and_hash():
    lines = [line for line in OLDEST_TORCH.read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert lines and all(PINNED.match(line) for line in lines), lines
    assert lines[0].startswith("torch==")
