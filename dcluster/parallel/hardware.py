"""Does the installed build fit the machine's GPUs? Checked at start-up, before hours of work.

Two mistakes cost a GPU user an epoch or a job and are invisible until then: a CPU-only FAISS
next to GPUs (k-means silently runs on the CPU, tens of minutes per ImageNet epoch), and a GPU
that a library's build has no code for (CUDA 13 builds have none for Pascal or Volta; "no
kernel image is available" at the first kernel, or a crash in FAISS). :func:`check` decides
from a :class:`Detected` description, a pure function, so tests can describe any machine;
:func:`detect` fills the description in from the installed libraries.

Which GPUs a wheel has code for is not exposed by FAISS or DALI at run time; the table below
holds what each distribution's documentation or build file states (docs/getting-started.md:
"Install").
"""
from __future__ import annotations

import importlib.metadata
import logging
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Mapping, Optional

if TYPE_CHECKING:
    from dcluster.core.config import Config

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Build:
    """One library as installed: which distribution, its CUDA version (None: no GPU code),
    and the compute capabilities (major * 10 + minor) it has binary code for. ``ptx``: the
    capability of the PTX it carries, which the driver compiles for any newer GPU; ``archs``
    None: unknown (a source or conda build), so not checked."""
    name: str
    cuda: Optional[str] = None
    archs: Optional[tuple[int, ...]] = None
    ptx: Optional[int] = None
    min_arch: Optional[int] = None  # "SM x.y and later" instead of a list (DALI)

    def runs_on(self, capability: int) -> Optional[bool]:
        """Whether it has code for a GPU of ``capability``; None when unknown."""
        if self.cuda is None:
            return False
        if self.min_arch is not None:
            return capability >= self.min_arch
        if self.archs is None:
            return None
        return (any(binary_runs_on(arch, capability) for arch in self.archs)
                or (self.ptx is not None and capability >= self.ptx))


def binary_runs_on(arch: int, capability: int) -> bool:
    """Whether binary code (a cubin) for ``arch`` runs on a GPU of ``capability``: CUDA runs
    sm_X.y code on any X.z with z >= y (an L4, sm_89, runs sm_86 code). torch's own start-up
    check applies the same rule: torch/cuda/__init__.py of torch 2.14.1, DEVICE_REQUIREMENT
    (line 339, e.g. ``86: _CompatInterval(start=86, ...)``) and _CompatInterval.__contains__
    (line 304: ``x_major == self.major and x_minor >= self.minor``), used by
    _code_compatible_with_device (line 412). Its exclusions are the Jetson iGPUs (sm_53,
    62, 72, 87), which no cluster node carries."""
    return arch // 10 == capability // 10 and arch % 10 <= capability % 10


@dataclass(frozen=True)
class GPU:
    index: int
    name: str
    capability: int  # major * 10 + minor: 60 for a P100, 70 for a V100, 90 for an H100


@dataclass(frozen=True)
class Detected:
    profile: str  # cpu | cu12 | cu13 | unknown: which extra the installed builds match
    torch: Build
    faiss: Build
    dali: Optional[Build]  # None: DALI not installed
    gpus: tuple[GPU, ...] = field(default_factory=tuple)
    driver: Optional["Driver"] = None  # what the NVIDIA driver reports, whatever torch sees


@dataclass(frozen=True)
class Driver:
    """The NVIDIA driver as ``nvidia-smi`` reports it: its version and the GPUs it lists,
    read independently of torch's CUDA runtime, which sees no GPU at all under a driver too
    old for it (torch.cuda.is_available() is then False, and nothing else says why)."""
    version: str
    gpus: tuple[str, ...]


# The oldest driver each CUDA major version runs on (minor version compatibility; NVIDIA,
# "CUDA Compatibility", Minor Version Compatibility, Table 1: CUDA 12.x >= 525, 13.x >= 580).
MIN_DRIVER = {"12": 525, "13": 580}


# What each FAISS / DALI distribution on PyPI has code for, from its own description or
# build configuration (checked December 2026; docs/getting-started.md "Install" has the sources).
FAISS_BUILDS = {
    "faiss-cpu": Build("faiss-cpu"),
    # facebookresearch/faiss pyproject-gpu.toml: CUDA 12.6, "70-real;75-real;80-real;86-real;
    # 89-real;90" (90 with PTX)
    "faiss-gpu": Build("faiss-gpu", "12", (70, 75, 80, 86, 89, 90), ptx=90),
    # pyproject-gpu-cuvs.toml: CUDA 13.2, "75-real;80-real;86-real;89-real;90"
    "faiss-gpu-cuvs": Build("faiss-gpu-cuvs", "13", (75, 80, 86, 89, 90), ptx=90),
    # third-party wheels (Di-Is/faiss-gpu-wheels): "Compute Capability 7.0-8.9"
    "faiss-gpu-cu12": Build("faiss-gpu-cu12", "12", (70, 75, 80, 86, 89)),
    # "Native GPU code for sm_75, sm_80, sm_86, and sm_90" (Python 3.12 only)
    "faiss-gpu-cu12-cuvs": Build("faiss-gpu-cu12-cuvs", "12", (75, 80, 86, 90)),
    "faiss-gpu-cu13-cuvs": Build("faiss-gpu-cu13-cuvs", "13", (75, 80, 86, 90)),
}
# DALI's support matrix: the CUDA 12 build runs on SM 5.0 and later; CUDA 13 has no code
# below Turing (SM 7.5) at all.
DALI_BUILDS = {
    "nvidia-dali-cuda120": Build("nvidia-dali-cuda120", "12", min_arch=50),
    "nvidia-dali-cuda130": Build("nvidia-dali-cuda130", "13", min_arch=75),
}
PROFILES = {
    "cpu": "pip install -c constraints.txt -e '.[cpu]'",
    "cu12": ("pip install torch==2.14.1 torchvision==0.29.1 --index-url "
             "https://download.pytorch.org/whl/cu126 && "
             "pip install -c constraints.txt -e '.[cu12]'"),
    "cu13": "pip install -c constraints.txt -e '.[cu13]'",
}


def torch_build(version: str, cuda: Optional[str], arch_list: list[str]) -> Build:
    """torch's build from ``torch.version.cuda`` and ``torch.cuda.get_arch_list()`` (entries
    like ``sm_80`` for binary code and ``compute_90`` for PTX)."""
    if cuda is None:
        return Build(f"torch {version}")
    archs = tuple(int(m) for m in re.findall(r"sm_(\d+)", " ".join(arch_list)))
    ptx = [int(m) for m in re.findall(r"compute_(\d+)", " ".join(arch_list))]
    return Build(f"torch {version}", cuda.split(".")[0], archs or None,
                 ptx=max(ptx) if ptx else None)


def profile_of(faiss: Build, dali: Optional[Build]) -> str:
    """The install profile the FAISS and DALI builds belong to. Both GPU profiles install the
    CUDA 12 FAISS wheel (setup.py: FAISS's CUDA 13 wheel does not resolve beside PyPI's
    torch), so DALI's CUDA version names the profile; a FAISS newer than DALI's CUDA is none."""
    if faiss.cuda is None:
        return "cpu"
    cuda = faiss.cuda if dali is None else dali.cuda
    if faiss.cuda in ("12", "13") and cuda in ("12", "13") and faiss.cuda <= cuda:
        return f"cu{cuda}"
    return "unknown"


def fitting_profile(gpu: GPU) -> str:
    """The profile whose builds all have code for ``gpu``."""
    return "cu13" if gpu.capability >= 75 else "cu12"


@dataclass(frozen=True)
class Problem:
    message: str


def check(hw: Detected, clustering_device: str, dali_on_gpu: bool = True,
          clustering_backend: str = "auto") -> list[Problem]:
    """What is wrong with running on ``hw`` with clustering.device ``clustering_device``
    (auto | cpu | gpu) and clustering.backend ``clustering_backend`` (auto | faiss | torch),
    DALI decoding on the GPU or not; empty when nothing is. A pure function of its arguments.

    FAISS without code for the GPUs is a problem only when asked for by name
    (clustering.backend=faiss): ``auto`` then assigns with PyTorch on the GPUs
    (clustering/backend.py), which is logged, not an error."""
    problems: list[Problem] = []
    if hw.torch.cuda is not None and not hw.gpus and hw.driver is not None and hw.driver.gpus:
        needed = MIN_DRIVER.get(hw.torch.cuda)
        problems.append(Problem(
            f"the NVIDIA driver {hw.driver.version} lists {len(hw.driver.gpus)} GPU(s) "
            f"({hw.driver.gpus[0]}) but {hw.torch.name} (CUDA {hw.torch.cuda} build) sees none:"
            + (f" CUDA {hw.torch.cuda} needs driver {needed} or newer;" if needed else "")
            + " update the driver or install a torch build for an older CUDA (the 'cu12' "
            f"profile: {PROFILES['cu12']}); training would otherwise run on the CPU"))
    faiss_required = clustering_backend == "faiss" and clustering_device != "cpu"
    if hw.gpus and hw.faiss.cuda is None and faiss_required:
        problems.append(Problem(
            f"torch sees {len(hw.gpus)} GPU(s) but FAISS is a CPU-only build ({hw.faiss.name}):"
            f" k-means would run on the CPU. Install the GPU profile "
            f"({_profile_hint(hw.gpus[0])}), set clustering.backend=auto to cluster on the "
            "GPUs with PyTorch, or clustering.device=cpu to cluster on the CPU deliberately"))
    for gpu in hw.gpus:
        libraries = [hw.torch, hw.faiss if clustering_device != "cpu" and clustering_backend != "torch"
                     else None, hw.dali if dali_on_gpu else None]
        missing = [lib for lib in libraries
                   if lib is not None and lib.cuda is not None and lib.runs_on(gpu.capability) is False]
        if missing == [hw.faiss] and not faiss_required:
            continue  # PyTorch assigns on this GPU instead
        if missing:
            names = ", ".join(f"{lib.name} (CUDA {lib.cuda})" for lib in missing)
            if fitting_profile(gpu) != hw.profile:
                fix = f"install the {_profile_hint(gpu)}"
                if missing == [hw.faiss]:
                    fix += ", or set clustering.device=cpu"
            else:  # no FAISS wheel has code for it (Pascal): PyTorch assigns there
                fix = ("set clustering.backend=auto to cluster on it with PyTorch, or install a "
                       "FAISS build with code for it (conda or source)")
            problems.append(Problem(
                f"GPU {gpu.index} ({gpu.name}, compute capability {_cc(gpu.capability)}) has no "
                f"code in {names}: {fix}"))
    return problems


def _profile_hint(gpu: GPU) -> str:
    profile = fitting_profile(gpu)
    return f"'{profile}' profile: {PROFILES[profile]}"


def _cc(capability: int) -> str:
    return f"{capability // 10}.{capability % 10}"


def describe(hw: Detected) -> list[tuple[str, str]]:
    """`dcluster info`'s rows: the profile, each library's CUDA version, and per GPU its
    capability and which libraries can use it."""
    rows = [("install profile", hw.profile)]
    for label, lib in (("torch build", hw.torch), ("FAISS build", hw.faiss),
                       ("DALI build", hw.dali)):
        if lib is None:
            rows.append((label, "not installed"))
        else:
            rows.append((label, f"{lib.name}, " + (f"CUDA {lib.cuda}" if lib.cuda else "CPU only")))
    for gpu in hw.gpus:
        usable = []
        for lib in (hw.torch, hw.faiss, hw.dali):
            if lib is not None:
                verdict = lib.runs_on(gpu.capability)
                usable.append(f"{lib.name.split()[0]} {'yes' if verdict else 'no' if verdict is False else '?'}")
        rows.append((f"GPU {gpu.index}", f"{gpu.name}, compute capability {_cc(gpu.capability)}: "
                     + ", ".join(usable)))
    return rows


def installed_distributions() -> dict[str, str]:
    """The FAISS and DALI distributions installed here, name -> version (importlib.metadata:
    what pip recorded, even where two of them overwrote one module)."""
    found = {}
    for name in (*FAISS_BUILDS, *DALI_BUILDS):
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


def conflicting_builds(installed: Mapping[str, str]) -> list[Problem]:
    """Two builds of one module (``pip install '.[cpu,cu13]'``): FAISS and DALI each write one
    module whatever their build, so which one runs depends on the order pip wrote them, and a
    mix of their files can crash. ``installed``: distribution name -> version, as from
    :func:`installed_distributions`. A pure function."""
    problems = []
    for module, builds in (("faiss", FAISS_BUILDS), ("nvidia.dali", DALI_BUILDS)):
        names = [name for name in builds if name in installed]
        if len(names) > 1:
            listed = ", ".join(f"{name} {installed[name]}" for name in names)
            problems.append(Problem(
                f"{len(names)} builds of the '{module}' module are installed ({listed}); each "
                f"overwrites the other's files. Keep one profile: pip uninstall -y "
                f"{' '.join(names)}, then install one profile (README \"Install\")"))
    return problems


def _installed(candidates: dict[str, Build]) -> Optional[Build]:
    for name, build in candidates.items():
        try:
            importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        return build
    return None


def detect() -> Detected:
    """The installed builds and the GPUs torch sees."""
    import torch

    from dcluster.core.faiss_after_torch import faiss

    cuda = torch.version.cuda
    gpus: tuple[GPU, ...] = ()
    arch_list: list[str] = []
    if torch.cuda.is_available():
        arch_list = torch.cuda.get_arch_list()
        gpus = tuple(GPU(i, torch.cuda.get_device_name(i),
                         10 * torch.cuda.get_device_capability(i)[0]
                         + torch.cuda.get_device_capability(i)[1])
                     for i in range(torch.cuda.device_count()))
    faiss_build = _installed(FAISS_BUILDS) or (
        # a conda or source build: GPU code if it has the GPU classes, architectures unknown
        Build("faiss (unknown build)", "?" if hasattr(faiss, "StandardGpuResources") else None))
    dali = _installed(DALI_BUILDS)
    import os

    asked = not gpus and cuda is not None and not gpus_hidden(os.environ)
    return Detected(profile=profile_of(faiss_build, dali),
                    torch=torch_build(torch.__version__, cuda, arch_list),
                    faiss=faiss_build, dali=dali, gpus=gpus,
                    driver=nvidia_driver() if asked else None)


def gpus_hidden(environ: Mapping[str, str]) -> bool:
    """Whether CUDA_VISIBLE_DEVICES hides every GPU on purpose (empty, or starting with an
    invalid id such as -1: CUDA stops at the first one). ``nvidia-smi`` ignores the variable
    and would still list the GPUs, which read as "driver too old for torch" (issue #31,
    item 8), so the driver is not asked then."""
    value = environ.get("CUDA_VISIBLE_DEVICES")
    if value is None:
        return False
    first = value.split(",")[0].strip()
    return first == "" or first.startswith("-")


def nvidia_driver() -> Optional[Driver]:
    """The driver's version and GPUs from ``nvidia-smi`` (None where there is none, or it
    fails: no driver, no GPU)."""
    import shutil
    import subprocess

    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version",
                              "--format=csv,noheader"], capture_output=True, text=True,
                             timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return driver_from_smi(out)


def driver_from_smi(out: str) -> Optional[Driver]:
    """``nvidia-smi --query-gpu=name,driver_version --format=csv,noheader``'s output (one
    "name, version" line per GPU) as a Driver; None when it lists no GPU."""
    rows = [line.rsplit(",", 1) for line in out.splitlines() if "," in line]
    if not rows:
        return None
    return Driver(rows[0][1].strip(), tuple(name.strip() for name, _ in rows))


def require_fitting_build(cfg: "Config") -> None:
    """Stop with a UserError (exit 2) naming the fix when the installed build does not fit
    the GPUs the run would use (``cfg``: its clustering device and data loader)."""
    from dcluster.core.errors import UserError

    conflicts = conflicting_builds(installed_distributions())  # before importing that module
    if conflicts:
        raise UserError("; ".join(p.message for p in conflicts))
    hw = detect()
    dali_on_gpu = cfg.data.loader == "dali" and cfg.data.decode_device != "cpu"
    problems = check(hw, cfg.clustering.device, dali_on_gpu, cfg.clustering.backend)
    if problems:
        raise UserError("; ".join(p.message for p in problems))
    log.debug("build fits the hardware: profile %s, %d GPU(s)", hw.profile, len(hw.gpus))


def default_threads(environ: Mapping[str, str], usable_cpus: int) -> int:
    """torch's intra-op threads when the config leaves ``threads`` at 0: the CPUs Slurm gave
    this task (SLURM_CPUS_PER_TASK), or under torchrun, which sets OMP_NUM_THREADS=1 for
    every worker, this process's share of the CPUs it may run on; 0 (keep torch's default)
    outside both."""
    if environ.get("SLURM_CPUS_PER_TASK", "").isdigit() and "SLURM_PROCID" in environ:
        return int(environ["SLURM_CPUS_PER_TASK"])
    if "TORCHELASTIC_RUN_ID" in environ or "LOCAL_WORLD_SIZE" in environ:
        return max(1, usable_cpus // max(1, int(environ.get("LOCAL_WORLD_SIZE", "1"))))
    return 0


def crowding(threads: int, usable_cpus: int, load: float) -> Optional[str]:
    """A warning when ``threads`` busy threads on top of the machine's ``load`` (its 1-minute
    load average) would ask for more CPUs than it has, else None. Why: torch's threads wait
    for each other at every op, so one descheduled thread stalls them all; on 2 shared cores
    at load 2-3.5 the demo's first epoch trained at 24 img/s with threads=2 against 620 img/s
    with threads=1. A warning, not a lower default: the thread count may change float
    rounding, and a run should not compute differently because a neighbour was busy."""
    if threads <= 1 or threads + load <= usable_cpus + 0.5:
        return None
    return (f"load average {load:.1f} on {usable_cpus} CPU(s): torch's {threads} threads will "
            f"wait for CPUs other processes hold, which can slow training tenfold; pass "
            f"threads={max(1, int(usable_cpus - load))} (config key threads) on a shared machine")


def set_torch_threads(configured: int) -> None:
    """torch's intra-op threads: ``configured`` (the config's ``threads``), or if 0 the
    task's CPUs (:func:`default_threads`), or torch's own default outside Slurm/torchrun;
    with a warning when the machine's load leaves them too few CPUs (:func:`crowding`)."""
    import os

    import torch

    usable = len(os.sched_getaffinity(0))
    threads = configured or default_threads(os.environ, usable)
    if threads:
        torch.set_num_threads(threads)
    warning = crowding(torch.get_num_threads(), usable, os.getloadavg()[0])
    if warning:
        log.warning("%s", warning)
