"""torch's CUDA libraries are loaded before FAISS's (issue #31, item 3): a CUDA 12 FAISS
wheel's libcurand.so.10 has the file name of CUDA 13's, and FAISS loads its libraries
globally, so whichever comes first serves both."""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

HOOK = """
import sys

class FaissBeforeTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "faiss" and "torch" not in sys.modules:
            raise ImportError("faiss imported before torch")
        return None

sys.meta_path.insert(0, FaissBeforeTorch())
"""


def test_the_train_and_info_entry_points_import_torch_before_faiss():
    """A meta-path hook that fails an import of faiss while torch is not yet imported, in a
    fresh interpreter: `dcluster train`'s module chain (train -> clustering -> engine, where
    faiss came first before) and `dcluster info`'s."""
    for entry in ("import dcluster.train", "import dcluster.clustering.engine",
                  "from dcluster.cli import main; main(['info'])"):
        done = subprocess.run([sys.executable, "-c", HOOK + entry], cwd=REPO, env=os.environ,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"{entry}: {done.stderr[-2000:]}"


def test_no_module_imports_faiss_but_the_one_that_imports_torch_first():
    """Every other module takes ``faiss`` from dcluster/core/faiss_after_torch.py, read with
    ast (so a lazy import inside a function counts too)."""
    direct = []
    for path in sorted([*REPO.glob("dcluster/**/*.py"), *REPO.glob("benchmarks/*.py")]):
        if path.name == "faiss_after_torch.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module] if isinstance(node, ast.ImportFrom) else [])
            if any(n and n.split(".")[0] == "faiss" for n in names):
                direct.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert direct == []
