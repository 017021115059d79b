"""benchmarks/bench_clustering.py and bench_loader.py at a tiny size: what their JSON last line
promises (docs/benchmarks.md) is there: each side's rounds, k-means iterations and threads,
the loaders' cores and threads. The timings themselves are not checked (benchmarks/)."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NITER = 3


def last_json_line(script: str, *args: str) -> dict:
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_bench_clustering_reports_every_sides_best_of_rounds_iterations_and_threads():
    out = last_json_line("bench_clustering.py", "--n", "600", "--dim", "272", "--k", "8",
                         "--niter", str(NITER), "--rounds", "2", "--skip-original")
    assert out["rounds"] == 2 and out["setup"] == "inside each side's timer"
    sides = out["sides"]
    assert set(sides) == {"stage", "its PCA + whiten + L2 (timed apart)", "bare",
                          "faiss.Clustering, given centroids", "engine, FAISS CPU backend",
                          "engine, PyTorch backend (cpu)"}
    for name, side in sides.items():
        assert side["wall_seconds"] > 0 and side["cpu_seconds"] >= 0, name
        assert side["torch_threads"] >= 1 and side["faiss_threads"] >= 1, name
        if name.startswith("its PCA"):
            assert side["kmeans_iterations"] is None
        else:
            assert 1 <= side["kmeans_iterations"] <= NITER, name
    assert out["stage_seconds"] == sides["stage"]["wall_seconds"]


def test_bench_loader_gives_both_loaders_the_same_cores_and_persistent_torchvision_workers():
    out = last_json_line("bench_loader.py", "--images", "16", "--batch-size", "8",
                         "--workers", "1", "--repeats", "1")
    assert len(out["cores"]) == out["dali_decode_threads"] == out["torchvision_workers"] == 1
    assert out["torchvision_persistent_workers"] is True and out["repeats"] == 1
    for name in ("dali", "torchvision", "torchvision_per_pass"):
        assert out[f"{name}_train_img_s"] > 0 and out[f"{name}_feature_img_s"] > 0, name
