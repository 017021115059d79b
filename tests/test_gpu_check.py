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
    # spares the minutes; the GPU host runs it. ResNet-50's passes build a 25M-parameter net
    # for seconds of the 2 cores; AlexNet's run the same code.
    done, report = run_check(tmp_path, "--quick", "--skip", "info", "bank_kill_resume",
                             "train_pass[resnet50]", "feature_pass[resnet50]")
    assert done.returncode == 0, json.dumps(report, indent=1)
    sections = report["sections"]
    names = list(sections)
    # the order: report, the CLI run, the PyTorch k-means, the passes
    assert names[:5] == ["info", "cli_train", "cli_train[2_ranks]", "kmeans[torch]",
                         "train_pass[alexnet]"]
    for name in ("cli_train", "cli_train[2_ranks]", "kmeans[torch]", "train_pass[alexnet]", "feature_pass[alexnet]",
                 "pca_eigensolver", "kmeans[faiss]"):
        assert sections[name]["status"] == "ok", (name, sections[name])
    pca = sections["pca_eigensolver"]["result"]["full_float32"]
    # --quick's toy width is one eigh takes directly (up to 512 dimensions); the GPU sizes run
    # the subspace iteration, which must then converge without the fallback
    assert pca["solver"].startswith(("eigh", "subspace iteration")) and not pca["fallback"]
    resume = sections["cli_train"]["result"]
    assert resume["signal"] == "SIGTERM" and resume["signalled_inside_epoch_2"]
    assert resume["stopped_exit_code"] == 143  # 128 + SIGTERM: a clean stop
    assert resume["resumed_inside_epoch_2"] and resume["equal_weights"]
    rate = sections["kmeans[torch]"]["result"]["rate"]
    assert rate["resident"]["share_of_gemm"] > 0 and rate["streamed"]["share_of_gemm"] > 0
    assert sections["dali"]["status"].startswith("skipped: ")
    assert report["skipped"] == ["info", "train_pass[resnet50]", "feature_pass[resnet50]",
                                 "dali", "bank_kill_resume"]


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
                         "train_pass[alexnet]", "feature_pass[alexnet]", "pca_eigensolver",
                         "kmeans[torch]"])
    sections = json.loads(out.read_text())["sections"]
    assert rc == 0
    assert sections["kmeans[faiss]"]["status"] == "skipped: not installed (faiss)"
    assert sections["cli_train"]["status"] == "skipped: not installed (torchvision, faiss)"
    assert sections["cli_train[2_ranks]"]["status"] == sections["cli_train"]["status"]
    assert sections["train_pass[resnet50]"]["status"] == "skipped: not installed (torchvision)"
    assert sections["dali"]["status"] == "skipped: not installed (dali, faiss)"
    assert sections["code_paths"]["status"] == "ok"


def test_bf16_runs_only_where_the_gpu_computes_in_it_described_gpu(monkeypatch):
    """A V100 (7.0) runs the passes in fp32 only, an A100 (8.0) in fp32 and bf16: a run
    refuses bf16 before Ampere, and the check must not measure what runs never do."""
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(SCRIPT.parent))
    gpu = gpu_check.torch.device("cuda", 0)
    for capability, expected in (((7, 0), ("fp32",)), ((8, 0), ("fp32", "bf16"))):
        monkeypatch.setattr(gpu_check.torch.cuda, "get_device_capability",
                            lambda device, c=capability: c)
        assert gpu_check.precisions(gpu) == expected
    assert gpu_check.precisions(gpu_check.torch.device("cpu")) == ("fp32", "bf16")
