"""The ready Slurm scripts for ImageNet (docs/distributed.md, "Ready scripts for ImageNet"):
`slurm/imagenet.sh` at each size renders, through `dcluster submit --dry-run` and without the
data, the #SBATCH lines its header promises (nodes, one task per GPU, --cpus-per-task by the
data.workers + 2 rule, --mem by the 24 + 8 x GPUs rule, logs under the run directory) and the
preset's global batch; its evaluation of a trained run does the same; `slurm/dcluster.sbatch`
parses and follows the same rules."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from dcluster.methods import load_config
from launch.submit import cpus_per_task

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "slurm" / "imagenet.sh"
SIZES = {"1gpu": (1, 1), "8gpu": (1, 8), "32gpu": (4, 8)}  # nodes, GPUs per node


def mem_rule_gb(gpus_per_node: int) -> int:
    """--mem per node: 8 GB per GPU task and 24 GB for ImageNet's per-image arrays."""
    return 24 + 8 * gpus_per_node


def run_script(*args: str, **env: str) -> subprocess.CompletedProcess:
    environ = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
               "PYTHONPATH": str(REPO), **env}
    if "PARTITION" not in env:  # the cluster's own setting must not leak into the test
        environ.pop("PARTITION", None)
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=REPO, env=environ,
                          capture_output=True, text=True, timeout=120)


def sbatch_lines(script: str) -> dict[str, str]:
    return dict(re.findall(r"^#SBATCH --([\w-]+)(?:=(\S*))?", script, flags=re.M))


@pytest.mark.parametrize("preset, size", [("resnet50", "1gpu"), ("resnet50", "8gpu"),
                                          ("resnet50", "32gpu"), ("alexnet", "8gpu")])
def test_each_ready_training_script_renders_its_promised_sbatch_lines(preset, size, tmp_path):
    out = run_script(size, "--dry-run", PRESET=preset, RUNS_ROOT=str(tmp_path),
                     IMAGENET=str(tmp_path / "imagenet"))
    assert out.returncode == 0, out.stderr
    script, rest = out.stdout.split("# ---- resolved config", 1)
    nodes, gpus = SIZES[size]
    name = f"deepcluster_{preset}_{size}"
    cfg = load_config(REPO / "configs" / f"deepcluster_{preset}_imagenet.yaml", check_paths=False)
    lines = sbatch_lines(script)
    assert lines["nodes"] == str(nodes)
    assert lines["ntasks-per-node"] == lines["gpus-per-node"] == str(gpus)
    assert lines["cpus-per-task"] == str(cpus_per_task(cfg)) == str(cfg.data.workers + 2)
    assert lines["mem"] == f"{mem_rule_gb(gpus)}GB"
    assert lines["time"] == "4320" and lines["signal"] == "USR2@120"
    assert lines["job-name"] == name
    for log in (lines["output"], lines["error"]):
        assert log.startswith(f"{tmp_path}/{name}/slurm/"), log
    assert f"--cpus-per-task={cpus_per_task(cfg)}" in script.split("srun ", 1)[1]
    assert f"name: {name}" in rest and "global_batch: 256" in rest
    assert f"data.path {tmp_path}/imagenet/train: not reachable from here" in rest
    assert not (tmp_path / name).exists()  # a dry run prepares nothing


def test_the_ready_evaluation_reads_the_trained_run_and_keeps_its_logs_there(
        small_demo_config, tmp_path):
    from dcluster.train import train

    run = train(small_demo_config("epochs=1", "tracking.enabled=false", "name=trained"))
    imagenet = tmp_path / "imagenet"
    (imagenet / "val").mkdir(parents=True)
    (imagenet / "LOC_val_solution.csv").write_text("ImageId,PredictionString\n")
    env = dict(RUNS_ROOT=str(run.run_dir.parent), NAME="trained", IMAGENET=str(imagenet))
    out = run_script("32gpu", "linear", "--dry-run", **env)
    assert out.returncode == 0, out.stderr
    script, rest = out.stdout.split("# ---- resolved config", 1)
    lines = sbatch_lines(script)
    assert (lines["nodes"], lines["gpus-per-node"], lines["mem"]) == ("4", "8", "88GB")
    assert lines["time"] == "600" and lines["output"].startswith(f"{run.run_dir}/slurm/")
    assert f"val_path: {imagenet}/val" in rest
    # a wrong target or a missing ground-truth file is refused before anything is queued
    (imagenet / "LOC_val_solution.csv").unlink()
    refused = run_script("8gpu", "knn", "--dry-run", **env)
    assert refused.returncode == 2 and "eval.val_labels" in refused.stderr


def test_the_script_refuses_an_unknown_size_and_a_missing_partition():
    unknown = run_script("16gpu", "--dry-run")
    assert unknown.returncode == 2 and "1gpu, 8gpu or 32gpu" in unknown.stderr
    no_partition = run_script("8gpu")  # a real submission needs the partition
    assert no_partition.returncode == 2 and "PARTITION" in no_partition.stderr


def test_the_plain_sbatch_template_parses_and_follows_the_same_rules():
    template = REPO / "slurm" / "dcluster.sbatch"
    assert subprocess.run(["bash", "-n", str(template)]).returncode == 0
    text = template.read_text()
    lines = {key: value.split()[0] for key, value in
             re.findall(r"^#SBATCH --([\w-]+)=(.*)$", text, flags=re.M)}
    preset = re.search(r"DCLUSTER_CONFIG:-([^}]+)\}", text).group(1)
    cfg = load_config(REPO / preset, check_paths=False)
    gpus = int(lines["gpus-per-node"])
    assert lines["nodes"] == "1" and lines["ntasks-per-node"] == str(gpus)
    assert lines["cpus-per-task"] == str(cpus_per_task(cfg))
    assert lines["mem"] == f"{mem_rule_gb(gpus)}G"
    # the 1-GPU override its header shows follows the rule too
    assert f"--gpus-per-node 1 --mem {mem_rule_gb(1)}G" in text
