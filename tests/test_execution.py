"""How passes run on described GPUs (dcluster/parallel/execution.py): NHWC where tensor cores use it,
bf16 only where the GPU computes in it. The GPUs are compute capabilities passed to the pure
decision function, not present."""
import pytest
import torch

from dcluster.core.config import ConfigError
from dcluster.parallel.execution import resolve_execution

GPU, CPU = torch.device("cuda", 0), torch.device("cpu")
P100, V100, A100, H100 = (6, 0), (7, 0), (8, 0), (9, 0)


@pytest.mark.parametrize("capability, nhwc", [(P100, False), (V100, True), (A100, True),
                                              (H100, True), (None, False)])
def test_automatic_channels_last_only_from_volta_on(capability, nhwc):
    device = CPU if capability is None else GPU
    assert resolve_execution("auto", "fp32", device, capability).channels_last is nhwc
    assert resolve_execution("always", "fp32", device, capability).channels_last
    assert not resolve_execution("never", "fp32", device, capability).channels_last


@pytest.mark.parametrize("capability", [P100, V100])
def test_described_gpus_without_bf16_arithmetic_refuse_bf16_naming_the_key(capability):
    with pytest.raises(ConfigError, match=r"'optim.precision' = 'bf16'.*capability "
                                          f"{capability[0]}.0"):
        resolve_execution("auto", "bf16", GPU, capability)
    assert resolve_execution("auto", "fp16", GPU, capability).precision == "fp16"


@pytest.mark.parametrize("capability", [A100, H100, None])
def test_bf16_runs_on_ampere_hopper_and_the_cpu(capability):
    device = CPU if capability is None else GPU
    assert resolve_execution("auto", "bf16", device, capability).dtype == torch.bfloat16
