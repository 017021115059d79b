"""benchmarks/gpu_check.py on this CPU machine: it runs what is installed, lists the rest as
skipped, keeps its JSON in a file, and exits 0 (1 only for a wrong result). ``--quick`` runs
the sections at toy sizes on the CPU, the kill/resume one included (real CLI, real SIGKILL)."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


def run_check(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "check.json"
    done = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out),
                           "--keep", str(tmp_path / "work"), *args],
                          capture_output=True, text=True, timeout=900, cwd=ROOT)
    report = json.loads(out.read_text())
    assert json.loads(done.stdout.splitlines()[-1]) == report  # the file and the last line
    return done, report


def test_without_a_gpu_every_section_is_listed_as_skipped(tmp_path):
    done, report = run_check(tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert report["device"] == "cpu" and report["failed"] == []
    assert set(report["skipped"]) == set(report["sections"])
    assert all("no CUDA GPU" in s["status"] for s in report["sections"].values())


def test_quick_on_the_cpu_runs_the_sections_and_resumes_inside_epoch_2(tmp_path):
    # the feature-bank kill/resume runs two more `dcluster train` processes: on the CPU its
    # path is the one tests/test_bank_resume.py already resumes to equal weights, so the suite
    # spares the minutes; the GPU host runs it
    done, report = run_check(tmp_path, "--quick", "--skip", "info", "bank_kill_resume")
    assert done.returncode == 0, json.dumps(report, indent=1)
    sections = report["sections"]
    for name in ("train_step", "feature_pass", "pca_eigensolver", "kmeans[faiss]",
                 "kill_resume"):
        assert sections[name]["status"] == "ok", (name, sections[name])
    pca = sections["pca_eigensolver"]["result"]["full_float32"]
    # --quick's toy width is one eigh takes directly (up to 512 dimensions); the GPU sizes run
    # the subspace iteration, which must then converge without the fallback
    assert pca["solver"].startswith(("eigh", "subspace iteration")) and not pca["fallback"]
    resume = sections["kill_resume"]["result"]
    assert resume["killed_inside_epoch_2"] and resume["resumed_inside_epoch_2"]
    assert resume["equal_weights"]
    assert report["skipped"] == ["info", "bank_kill_resume"]


def test_sections_of_parts_not_installed_say_so(tmp_path, monkeypatch):
    """A bare PyTorch host, described: no FAISS, no torchvision, no DALI."""
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(SCRIPT.parent))
    monkeypatch.setattr(gpu_check, "installed_parts", lambda: {
        "cuda": False, "faiss": False, "faiss_gpu": False, "dali": False, "torchvision": False})
    out = tmp_path / "check.json"
    rc = gpu_check.main(["--quick", "--out", str(out), "--keep", str(tmp_path / "work"), "--skip",
                         "train_step", "feature_pass", "pca_eigensolver"])
    sections = json.loads(out.read_text())["sections"]
    assert rc == 0
    assert sections["kmeans[faiss]"]["status"] == "skipped: not installed (faiss)"
    assert sections["kill_resume"]["status"] == "skipped: not installed (torchvision, faiss)"
    assert sections["code_paths"]["status"] == "ok"
