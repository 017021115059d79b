"""The one place dcluster imports FAISS, always after torch (issue #31, item 3).

``faiss/__init__.py`` of the GPU wheels loads its CUDA 12 libraries into the global symbol
namespace (libcudart.so.12, libcublas.so.12, libcurand.so.10), and CUDA 13's cuRAND, which
torch's cu130 build loads, has the same file name libcurand.so.10: whichever is loaded first
is the one both get. A segfault at import with exactly this order (a CUDA 12 FAISS wheel,
torch cu130) was reported in torchgeo-bench PR #152; FAISS issues #4273 and #2126 report
other import-order failures. Importing torch first lets torch load its own libraries by the
paths it knows, and FAISS then finds its CUDA 12 runtime beside them. Every module of the
package takes ``faiss`` from here (tests/test_import_order.py checks both).
"""
from __future__ import annotations

import torch  # noqa: F401  (loaded first: see above)

import faiss

__all__ = ["faiss"]
