"""`dcluster submit` without a cluster: the sbatch script it would queue, and its flags."""
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


def test_yaml_slurm_section_is_the_default_and_flags_override_it(demo_digits, tmp_path, capsys):
    preset = tmp_path / "team.yaml"
    preset.write_text("name: team\nslurm:\n  partition: shared\n  tasks_per_node: 2\n"
                      "  time_min: 90\n")
    code = main(["submit", str(preset), f"data.path={demo_digits}", f"runs_root={tmp_path}",
                 "--time", "30", "--dry-run"])
    script = capsys.readouterr().out
    assert code == 0
    assert "#SBATCH --partition=shared" in script and "#SBATCH --ntasks-per-node=2" in script
    assert "#SBATCH --time=30" in script and "gpus" not in script


def test_submit_rejects_a_bad_config_before_queueing(demo_digits, tmp_path, capsys):
    code = main(["submit", "configs/demo.yaml", f"data.path={demo_digits}",
                 f"runs_root={tmp_path}", "slurm.nodes=zero", "--dry-run"])
    assert code == 2 and "slurm.nodes" in capsys.readouterr().err
