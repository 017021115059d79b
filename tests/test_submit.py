"""`dcluster submit` without a cluster: the sbatch script it would queue, and its flags."""
import pytest

from dcluster.cli import main



def test_dry_run_shows_nodes_tasks_gpus_time_and_partition(demo_digits, tmp_path, capsys):
    code = main(["submit", "configs/demo.yaml", f"data.path={demo_digits}",
                 f"runs_root={tmp_path}", "--nodes", "3", "--gpus-per-node", "4",
                 "--partition", "learnlab", "--time", "1440", "--account", "vision",
                 "--constraint", "volta32gb", "--exclude", "node[01-02]", "--dry-run"])
    script = capsys.readouterr().out
    assert code == 0
    for line in ("#SBATCH --nodes=3", "#SBATCH --ntasks-per-node=4", "#SBATCH --gpus-per-node=4",
                 "#SBATCH --time=1440", "#SBATCH --partition=learnlab", "#SBATCH --account=vision",
                 "#SBATCH --constraint=volta32gb", "#SBATCH --exclude='node[01-02]'",
                 "#SBATCH --signal=USR2@120", "srun"):
        assert line in script, line
    assert not (tmp_path / "demo").exists()  # a dry run prepares nothing


def test_srun_gets_cpus_per_task_and_kill_on_bad_exit(demo_digits, tmp_path, capsys):
    """Slurm 22.05-23.02 do not pass sbatch's --cpus-per-task on to srun."""
    code = main(["submit", "configs/demo.yaml", f"data.path={demo_digits}",
                 f"runs_root={tmp_path}", "--cpus-per-task", "12", "--dry-run"])
    script = capsys.readouterr().out
    assert code == 0
    [srun] = [line for line in script.splitlines() if line.startswith("srun ")]
    assert "--cpus-per-task=12" in srun and "--kill-on-bad-exit=1" in srun


def test_cpus_per_task_is_derived_from_the_data_workers_unless_set(demo_digits, tmp_path,
                                                                    capsys):
    code = main(["submit", "configs/demo.yaml", f"data.path={demo_digits}",
                 f"runs_root={tmp_path}", "data.workers=6", "--dry-run"])
    script = capsys.readouterr().out.split("# ---- resolved config")[0]
    assert code == 0 and "#SBATCH --cpus-per-task=8" in script
    [srun] = [line for line in script.splitlines() if line.startswith("srun ")]
    assert "--cpus-per-task=8" in srun


def test_yaml_slurm_section_is_the_default_and_flags_override_it(demo_digits, tmp_path, capsys):
    preset = tmp_path / "team.yaml"
    preset.write_text("name: team\nslurm:\n  partition: shared\n  tasks_per_node: 2\n"
                      "  time_min: 90\n")
    code = main(["submit", str(preset), f"data.path={demo_digits}", f"runs_root={tmp_path}",
                 "clustering.k=10", "--time", "30", "--dry-run"])
    script = capsys.readouterr().out
    assert code == 0
    assert "#SBATCH --partition=shared" in script and "#SBATCH --ntasks-per-node=2" in script
    sbatch = script.split("# ---- resolved config")[0]
    assert "#SBATCH --time=30" in sbatch and "gpus" not in sbatch


def test_submit_rejects_a_bad_config_before_queueing(demo_digits, tmp_path, capsys):
    code = main(["submit", "configs/demo.yaml", f"data.path={demo_digits}",
                 f"runs_root={tmp_path}", "slurm.nodes=zero", "--dry-run"])
    assert code == 2 and "slurm.nodes" in capsys.readouterr().err


def test_a_dry_run_without_the_data_prints_the_script_the_config_and_what_it_left_unchecked(
        tmp_path, capsys):
    """A laptop preparing an ImageNet job: the preset's data.path does not exist here."""
    absent = tmp_path / "imagenet" / "train"
    code = main(["submit", "configs/deepcluster_alexnet_imagenet.yaml", f"data.path={absent}",
                 f"runs_root={tmp_path}", "--nodes", "4", "--gpus-per-node", "8", "--dry-run"])
    out, err = capsys.readouterr()
    assert code == 0, err
    script, rest = out.split("# ---- resolved config", 1)
    assert "#SBATCH --nodes=4" in script and "srun" in script
    config, unchecked = rest.split("# ---- not checked on this machine ----")
    assert "global_batch: 256" in config and "arch: alexnet" in config
    assert f"data.path {absent}: not reachable from here" in unchecked
    assert not (tmp_path / "deepcluster_alexnet_imagenet").exists()


def test_submit_makes_trains_data_checks_when_the_data_is_reachable(demo_digits, tmp_path,
                                                                     capsys):
    """k above the number of images: `train` refuses it, so must `submit`, dry or not."""
    for dry in (["--dry-run"], []):
        code = main(["submit", "configs/demo.yaml", f"data.path={demo_digits}",
                     f"runs_root={tmp_path}", "clustering.k=10000", *dry])
        err = capsys.readouterr().err
        assert code == 2 and "'clustering.k' = 10000" in err and "1797 images" in err
    assert not list(tmp_path.iterdir())  # refused before the run directory is made


def test_a_global_batch_the_job_cannot_divide_is_refused_at_submission(tmp_path, capsys):
    code = main(["submit", "configs/deepcluster_alexnet_imagenet.yaml",
                 f"data.path={tmp_path / 'absent'}", f"runs_root={tmp_path}", "--nodes", "3",
                 "--gpus-per-node", "5", "--dry-run"])
    err = capsys.readouterr().err
    assert code == 2 and "'optim.global_batch' = 256" in err and "15 processes" in err


@pytest.mark.parametrize("flags, key", [
    (["--nodes", "0"], "slurm.nodes"), (["--gpus-per-node", "-8"], "slurm.gpus_per_node"),
    (["--time", "-5"], "slurm.time_min"), (["--cpus-per-task", "-1"], "slurm.cpus_per_task"),
    (["--mem", "-1"], "slurm.mem_gb"), (["--tasks-per-node", "0"], "slurm.tasks_per_node"),
    (["slurm.max_requeues=-1"], "slurm.max_requeues"),
    (["slurm.signal_delay_s=-3"], "slurm.signal_delay_s"),
    (["slurm.signal_delay_s=120", "--time", "1"], "slurm.signal_delay_s"),
])
def test_every_slurm_number_is_bounded(flags, key, demo_digits, tmp_path, capsys):
    code = main(["submit", "configs/demo.yaml", f"data.path={demo_digits}",
                 f"runs_root={tmp_path}", *flags, "--dry-run"])
    err = capsys.readouterr().err
    assert code == 2 and f"'{key}'" in err and "#SBATCH" not in err


def test_an_evaluation_is_submitted_like_training_and_its_job_runs_the_protocol(
        small_demo_config, tmp_path, capsys):
    from dcluster.train import train
    from launch.job import EvalJob

    run = train(small_demo_config("epochs=1", "tracking.enabled=false"))
    code = main(["submit", str(run.run_dir), "tracking.enabled=false", "--eval", "knn",
                 "--gpus-per-node", "2", "--dry-run"])
    out = capsys.readouterr().out
    assert code == 0
    script, heading = out.split("# ---- resolved config")[:2]
    assert "#SBATCH --gpus-per-node=2" in script and f"{run.run_dir}/slurm/" in script
    # the config the evaluation reads, not a config.yaml the job would write
    assert heading.startswith(f" (what the evaluation reads: {run.run_dir}'s config with the "
                              "overrides) ----")
    assert main(["submit", str(tmp_path / "nowhere"), "--eval", "knn", "--dry-run"]) == 2
    assert "no such run directory" in capsys.readouterr().err
    # what each task of the job runs
    written = EvalJob("knn", str(run.run_dir), ["tracking.enabled=false"])()
    assert written == str(run.run_dir / "eval" / "knn_e000001.json")
