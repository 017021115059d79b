"""The start-up check of the installed build against the GPUs, on described machines: the
GPUs below are descriptions passed to the pure decision function, not present."""
import pytest

from dcluster.parallel.hardware import (DALI_BUILDS, FAISS_BUILDS, GPU, Build, Detected, Driver,
                               binary_runs_on, check, conflicting_builds, crowding,
                               default_threads,
                               describe, driver_from_smi, profile_of, torch_build)

TORCH_CU13 = torch_build("2.14.1", "13.0", ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100",
                                            "sm_120", "compute_120"])
TORCH_CU126 = torch_build("2.14.1+cu126", "12.6", ["sm_50", "sm_60", "sm_70", "sm_75", "sm_80",
                                                   "sm_86", "sm_90"])
P100, V100, A100, H100 = (GPU(0, "Tesla P100-PCIE-16GB", 60), GPU(0, "Tesla V100-SXM2-32GB", 70),
                          GPU(0, "NVIDIA A100-SXM4-80GB", 80), GPU(0, "NVIDIA H100 80GB HBM3", 90))


def machine(torch_b: Build, faiss: str, dali: str, *gpus: GPU) -> Detected:
    faiss_b, dali_b = FAISS_BUILDS[faiss], DALI_BUILDS[dali]
    return Detected(profile_of(faiss_b, dali_b), torch_b, faiss_b, dali_b, gpus)


def test_cpu_profile_without_gpus_is_fine():
    hw = machine(TORCH_CU13, "faiss-cpu", "nvidia-dali-cuda130")
    assert hw.profile == "cpu" and check(hw, "auto") == []


def test_described_gpus_with_cpu_faiss_name_the_gpu_profile_when_faiss_is_asked_for():
    hw = machine(TORCH_CU13, "faiss-cpu", "nvidia-dali-cuda130", A100, GPU(1, A100.name, 80))
    assert check(hw, "auto") == []  # clustering.backend=auto assigns with PyTorch there
    [problem] = check(hw, "auto", clustering_backend="faiss")
    assert "2 GPU(s)" in problem.message and "CPU-only" in problem.message
    assert "'cu13' profile" in problem.message and "clustering.device=cpu" in problem.message
    assert "clustering.backend=auto" in problem.message


def test_described_gpu_with_cpu_faiss_is_fine_when_the_cpu_is_chosen():
    hw = machine(TORCH_CU13, "faiss-cpu", "nvidia-dali-cuda130", A100)
    assert check(hw, "cpu") == []


def test_described_p100_under_cuda_13_names_gpu_capability_and_cu12():
    hw = machine(TORCH_CU13, "faiss-gpu-cuvs", "nvidia-dali-cuda130", P100)
    [problem] = check(hw, "auto")
    assert "Tesla P100" in problem.message and "compute capability 6.0" in problem.message
    for library in ("torch 2.14.1", "faiss-gpu-cuvs", "nvidia-dali-cuda130"):
        assert library in problem.message
    assert "'cu12' profile" in problem.message and "whl/cu126" in problem.message


def test_described_v100_fits_the_cu12_profile():
    hw = machine(TORCH_CU126, "faiss-gpu", "nvidia-dali-cuda120", V100)
    assert hw.profile == "cu12" and check(hw, "auto") == []


def test_described_p100_under_cu12_lacks_only_faiss_code():
    """FAISS's CUDA 12 wheel starts at sm_70: PyTorch (sm_60 in its cu126 build) assigns
    there unless FAISS is asked for by name."""
    hw = machine(TORCH_CU126, "faiss-gpu", "nvidia-dali-cuda120", P100)
    assert check(hw, "auto") == [] and check(hw, "auto", clustering_backend="torch") == []
    [problem] = check(hw, "auto", clustering_backend="faiss")
    assert "faiss-gpu (CUDA 12)" in problem.message and "torch" not in problem.message
    assert "clustering.backend=auto" in problem.message
    assert check(hw, "cpu", clustering_backend="faiss") == []


@pytest.mark.parametrize("gpu", [A100, H100])
def test_described_ampere_and_hopper_fit_the_cu13_profile(gpu):
    hw = machine(TORCH_CU13, "faiss-gpu-cuvs", "nvidia-dali-cuda130", gpu)
    assert hw.profile == "cu13" and check(hw, "auto") == []


def test_described_blackwell_runs_faiss_from_its_ptx():
    hw = machine(TORCH_CU13, "faiss-gpu-cuvs", "nvidia-dali-cuda130", GPU(0, "NVIDIA B200", 100))
    assert check(hw, "auto") == []


def test_described_dali_decoding_on_the_cpu_needs_no_dali_gpu_code():
    hw = machine(TORCH_CU126, "faiss-gpu", "nvidia-dali-cuda130", V100)
    assert "nvidia-dali-cuda130" in check(hw, "auto")[0].message
    assert check(hw, "auto", dali_on_gpu=False) == []


def test_info_rows_say_per_described_gpu_which_library_can_use_it():
    rows = dict(describe(machine(TORCH_CU13, "faiss-gpu-cuvs", "nvidia-dali-cuda130", P100)))
    assert rows["install profile"] == "cu13"
    assert rows["FAISS build"] == "faiss-gpu-cuvs, CUDA 13"
    assert rows["GPU 0"] == ("Tesla P100-PCIE-16GB, compute capability 6.0: torch no, "
                             "faiss-gpu-cuvs no, nvidia-dali-cuda130 no")


def test_unknown_faiss_build_is_not_guessed_at():
    hw = Detected("unknown", TORCH_CU13, Build("faiss (unknown build)", "?"), None, (A100,))
    assert check(hw, "auto") == []


@pytest.mark.parametrize("environ, expected", [
    ({"SLURM_PROCID": "3", "SLURM_CPUS_PER_TASK": "10"}, 10),
    ({"SLURM_CPUS_PER_TASK": "10"}, 0),  # the batch script itself, not an srun task
    ({"TORCHELASTIC_RUN_ID": "x", "LOCAL_WORLD_SIZE": "8", "OMP_NUM_THREADS": "1"}, 12),
    ({"LOCAL_WORLD_SIZE": "200"}, 1),
    ({}, 0),
])
def test_threads_default_to_the_tasks_cpus(environ, expected):
    assert default_threads(environ, usable_cpus=96) == expected


L4 = GPU(0, "NVIDIA L4", 89)


def test_described_ada_runs_the_sm86_code_of_torch_cu13():
    """torch 2.14.1's CUDA 13 build has sm_86, not sm_89: CUDA runs a cubin for X.y on any
    X.z with z >= y (the rule of torch's own DEVICE_REQUIREMENT)."""
    assert TORCH_CU13.runs_on(89) and TORCH_CU13.runs_on(87)
    assert not TORCH_CU13.runs_on(70) and not TORCH_CU13.runs_on(61)
    hw = machine(TORCH_CU13, "faiss-gpu-cuvs", "nvidia-dali-cuda130", L4)
    assert check(hw, "auto") == []


def test_binary_code_runs_on_the_same_major_and_a_higher_minor_only():
    assert binary_runs_on(86, 89) and binary_runs_on(80, 86) and binary_runs_on(90, 90)
    assert not binary_runs_on(86, 80) and not binary_runs_on(80, 90)
    assert not Build("x", "12", (80,)).runs_on(75)


SMI_OUT = "NVIDIA A100-SXM4-80GB, 535.104.05\nNVIDIA A100-SXM4-80GB, 535.104.05\n"


def test_described_driver_too_old_for_cuda_13_names_driver_and_build():
    """torch sees no GPU (cudaGetDeviceCount fails under a 535 driver), nvidia-smi lists two:
    the run must not quietly train on the CPU."""
    driver = driver_from_smi(SMI_OUT)
    assert driver == Driver("535.104.05", ("NVIDIA A100-SXM4-80GB",) * 2)
    hw = Detected("cu13", TORCH_CU13, FAISS_BUILDS["faiss-gpu-cuvs"],
                  DALI_BUILDS["nvidia-dali-cuda130"], (), driver)
    [problem] = check(hw, "auto")
    for words in ("driver 535.104.05", "2 GPU(s)", "torch 2.14.1", "CUDA 13", "580 or newer",
                  "whl/cu126"):
        assert words in problem.message, words


def test_described_machines_without_a_driver_gpu_or_with_a_cpu_torch_pass_the_driver_rule():
    cpu_torch = torch_build("2.14.1+cpu", None, [])
    no_gpu = Detected("cpu", TORCH_CU13, FAISS_BUILDS["faiss-cpu"], None, (), None)
    listed = driver_from_smi(SMI_OUT)
    assert check(no_gpu, "auto") == []
    assert check(Detected("cpu", cpu_torch, FAISS_BUILDS["faiss-cpu"], None, (), listed),
                 "auto") == []
    assert driver_from_smi("") is None


def test_cu13_profile_runs_the_cuda_12_faiss_wheel_beside_cuda_13_dali():
    """setup.py's cu13 extra: faiss-gpu (CUDA 12.6, its own runtime) with DALI's CUDA 13 build."""
    hw = machine(TORCH_CU13, "faiss-gpu", "nvidia-dali-cuda130", H100, GPU(1, A100.name, 80))
    assert hw.profile == "cu13" and check(hw, "auto") == []
    assert profile_of(FAISS_BUILDS["faiss-gpu-cuvs"], DALI_BUILDS["nvidia-dali-cuda120"]) == "unknown"


def test_described_cpu_and_cu13_extras_together_name_both_faiss_distributions():
    """`pip install '.[cpu,cu13]'` as importlib.metadata would list it."""
    installed = {"faiss-cpu": "1.15.1", "faiss-gpu": "1.15.1", "nvidia-dali-cuda130": "2.4.0"}
    [problem] = conflicting_builds(installed)
    assert "faiss-cpu 1.15.1" in problem.message and "faiss-gpu 1.15.1" in problem.message
    assert "'faiss' module" in problem.message
    assert conflicting_builds({"faiss-gpu": "1.15.1", "nvidia-dali-cuda130": "2.4.0"}) == []


def test_described_two_dali_builds_are_named():
    installed = {"faiss-gpu": "1.15.1", "nvidia-dali-cuda120": "2.4.0",
                 "nvidia-dali-cuda130": "2.4.0"}
    [problem] = conflicting_builds(installed)
    assert "nvidia-dali-cuda120 2.4.0, nvidia-dali-cuda130 2.4.0" in problem.message


def test_start_up_check_refuses_two_described_faiss_builds(monkeypatch):
    """require_fitting_build stops (exit 2) before importing faiss when importlib.metadata
    reports two FAISS distributions; here the metadata lookup is described."""
    import importlib.metadata

    from dcluster.parallel import hardware
    from dcluster.methods import Config
    from dcluster.core.errors import UserError

    versions = {"faiss-cpu": "1.15.1", "faiss-gpu": "1.15.1"}

    def version(name):
        if name not in versions:
            raise importlib.metadata.PackageNotFoundError(name)
        return versions[name]

    monkeypatch.setattr(importlib.metadata, "version", version)
    monkeypatch.setattr(hardware, "detect", lambda: pytest.fail("detect() ran"))
    with pytest.raises(UserError, match="faiss-cpu 1.15.1, faiss-gpu 1.15.1"):
        hardware.require_fitting_build(Config())


def test_info_names_both_described_faiss_distributions(monkeypatch, capsys):
    """`dcluster info` on an environment that importlib.metadata describes as `.[cpu,cu13]`."""
    from dcluster import cli
    from dcluster.parallel import hardware

    monkeypatch.setattr(hardware, "installed_distributions", lambda: {
        "faiss-cpu": "1.15.1", "faiss-gpu": "1.15.1", "nvidia-dali-cuda130": "2.4.0"})
    assert cli.main(["info"]) == 0
    problems = [line for line in capsys.readouterr().out.splitlines()
                if line.startswith("problem")]
    assert len(problems) == 1 and "faiss-cpu 1.15.1, faiss-gpu 1.15.1" in problems[0]


def test_gpus_hidden_on_purpose_are_not_a_driver_problem_described_gpu(monkeypatch):
    """CUDA_VISIBLE_DEVICES= (or -1) hides the GPUs from torch; nvidia-smi ignores it and still
    lists them. Before, that read as "driver too old"; now the driver is not asked."""
    from dcluster.parallel import hardware
    from dcluster.parallel.hardware import Driver, check, detect, gpus_hidden

    assert gpus_hidden({"CUDA_VISIBLE_DEVICES": ""}) and gpus_hidden({"CUDA_VISIBLE_DEVICES": "-1"})
    assert not gpus_hidden({}) and not gpus_hidden({"CUDA_VISIBLE_DEVICES": "0,1"})
    monkeypatch.setattr(hardware, "nvidia_driver",
                        lambda: Driver("580.65", ("NVIDIA H100 80GB HBM3",)))
    import torch

    if torch.version.cuda is None or torch.cuda.is_available():
        pytest.skip("needs a CUDA build of torch that sees no GPU (this CPU machine's)")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    assert any("driver" in p.message for p in check(detect(), "auto"))  # the real problem
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert detect().driver is None and check(detect(), "auto") == []


def test_a_crowded_machine_gets_a_warning_naming_the_threads_it_can_give():
    """The demo's threads=2 on 2 cores at load 3: a tenfold slowdown, said at start."""
    warning = crowding(threads=2, usable_cpus=2, load=3.0)
    assert warning is not None and "load average 3.0 on 2 CPU(s)" in warning
    assert "threads=1" in warning
    assert crowding(threads=2, usable_cpus=2, load=0.3) is None  # an idle machine
    assert crowding(threads=1, usable_cpus=2, load=9.0) is None  # one thread waits on no other
    assert "threads=5" in crowding(threads=16, usable_cpus=16, load=11.0)
