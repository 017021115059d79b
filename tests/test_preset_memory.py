"""The ImageNet presets on a described 16 GB card (issue #31, item 7): the memory estimate of
dcluster/models/memory.py (the networks on torch's meta device: shapes only) says each
preset's training and feature passes fit a V100-16GB with the processes its comment names,
and the whole global batch of 256 on one process in fp32 does not."""
from __future__ import annotations

import pytest
import torch

from dcluster.methods import load_config
from dcluster.models import build_model
from dcluster.models.memory import GIB, estimate, saved_bytes

V100_16GB = 16_945_512_448  # total_memory as torch reports it for a Tesla V100-SXM2-16GB
# each preset with the fewest processes its comment says fit a 16 GB card
PRESETS = {"deepcluster_vgg16_imagenet": 4, "deepcluster_resnet50_imagenet": 2,
           "deepcluster_alexnet_imagenet": 1}


@pytest.mark.parametrize("preset, processes", PRESETS.items())
def test_the_imagenet_presets_fit_a_16_gb_card_described_gpu(preset, processes, tmp_path):
    cfg = load_config(f"configs/{preset}.yaml", [f"data.path={tmp_path}"])
    assert cfg.optim.global_batch == 256  # the paper's, whatever the number of GPUs
    memory = estimate(cfg, processes)
    assert memory.fits(V100_16GB), (memory.training / GIB, memory.features / GIB)


@pytest.mark.parametrize("preset", list(PRESETS)[:2])
def test_the_whole_batch_of_256_on_one_process_in_fp32_does_not_fit_described_gpu(preset,
                                                                                   tmp_path):
    cfg = load_config(f"configs/{preset}.yaml", [f"data.path={tmp_path}"])
    assert not estimate(cfg, 1).fits(V100_16GB)
    bf16 = load_config(f"configs/{preset}.yaml", [f"data.path={tmp_path}",
                                                  "optim.precision=bf16"])
    assert estimate(bf16, 1).training < estimate(cfg, 1).training


def test_the_meta_count_equals_the_count_on_real_tensors(tmp_path):
    """The estimate's count (meta tensors, deduplicated by identity) against the saved
    tensors of a real CPU forward deduplicated by storage, on a small network and crop."""
    cfg = load_config("configs/demo.yaml", [f"data.path={tmp_path}"])
    with torch.device("meta"):
        meta = build_model(cfg.model, 32)
        meta.head = torch.nn.Linear(meta.feature_dim, 10)
    real = build_model(cfg.model, 32)
    real.head = torch.nn.Linear(real.feature_dim, 10)
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    def real_bytes(batch: int) -> int:
        storages.clear()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            real.train()(torch.zeros(batch, 3, 32, 32))
        return sum(storages.values())

    assert (saved_bytes(meta, 2, 32, torch.float32) - saved_bytes(meta, 1, 32, torch.float32)
            == real_bytes(2) - real_bytes(1))
