"""Full float32 for the clustering stage, whatever the training passes enabled.

execution.py turns TF32 on for a whole process on Ampere and later (10 mantissa bits in
float32 matmuls and convolutions: harmless under SGD's noise). The clustering stage is
numerics, not training: the PCA covariance, the projection and the eigensolver's products
in TF32 keep the eigensolver's float32 convergence test from passing (60 iterations and the
``eigh`` fallback every epoch, and a noisier subspace). So the stage runs with the flags off
and gives them back as it found them.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch


@contextmanager
def full_float32() -> Iterator[None]:
    """TF32 off for cuBLAS and cuDNN, and float32 matmuls at "highest" precision, inside the
    block; the previous settings restored after it, also on an exception."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    precision = torch.get_float32_matmul_precision()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(precision)
        torch.backends.cuda.matmul.allow_tf32 = matmul
        torch.backends.cudnn.allow_tf32 = cudnn
