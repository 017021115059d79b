"""benchmarks/cost_model.py: the FLOP counts it measures agree with the networks' known
sizes, and an epoch's total is the sum of its stages. Seconds: no image is read."""
from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_cost_model():
    spec = importlib.util.spec_from_file_location("cost_model",
                                                  ROOT / "benchmarks" / "cost_model.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["cost_model"] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


cm = load_cost_model()


def test_the_flop_counter_gives_resnet50_its_known_4_1_gmacs():
    """torch's FlopCounterMode counts a multiply-add as 2 FLOPs: torchvision's ResNet-50 at
    224 px is 4.1 G multiply-adds (the figure usually quoted as "4.1 GFLOPs"), i.e. 8.2 GFLOPs
    here; AlexNet (torchvision's) 0.71 G multiply-adds, VGG16 15.5 G."""
    ref = cm.reference_flops()
    assert ref["resnet50"] / 2 == pytest.approx(4.1e9, rel=0.03)
    assert ref["alexnet"] / 2 == pytest.approx(0.71e9, rel=0.03)
    assert ref["vgg16"] / 2 == pytest.approx(15.5e9, rel=0.03)


def test_dclusters_alexnet_is_measured_with_its_sobel_front_end_and_head():
    """The preset's AlexNet (BN, 96-256-384-384-256, 4096-d fc, Sobel): the k-way head adds
    exactly 2 D k FLOPs to the feature pass, and the network is larger than torchvision's
    64-filter AlexNet the published throughputs were measured on."""
    net = cm.measure_network("alexnet", k=1000)
    assert net.feature_dim == 4096
    assert net.flops_train_forward - net.flops_features == pytest.approx(2 * 4096 * 1000,
                                                                         rel=1e-6)
    assert 2.0e9 < net.flops_features < 2.4e9
    assert net.trainable < net.params  # the Sobel filters have no momentum
    assert net.activation_bytes_per_image > 0


def network(**overrides) -> "cm.Network":
    fields = dict(arch="resnet50", flops_features=8e9, flops_train_forward=8.1e9,
                  feature_dim=2048, params=44_000_000, trainable=43_999_000, buffers=100_000,
                  activation_bytes_per_image=90_000_000)
    return cm.Network(**(fields | overrides))


REF = {"alexnet": 1.43e9, "vgg16": 30.9e9, "resnet50": 8.18e9}


@pytest.mark.parametrize("monitor_every", [0, 1, 4])
@pytest.mark.parametrize("setup", cm.SETUPS, ids=lambda s: s.name)
def test_the_epoch_total_is_the_sum_of_its_stages(setup, monitor_every):
    work = cm.Workload("ImageNet", cm.IMAGENET_N, monitor_every=monitor_every,
                       monitor_val=cm.IMAGENET_VAL_N)
    cost = cm.epoch_cost(network(), setup, work, REF)
    stages = cost.stages()
    counted = sum(v for name, v in stages.items() if name != "monitor")
    if monitor_every:
        counted += stages["monitor"] / monitor_every
    assert cost.total == pytest.approx(counted, rel=1e-12)
    assert all(v > 0 for v in stages.values())


def test_kmeans_seconds_are_the_assignment_gemm_at_the_fp32_rate():
    """20 iterations of 2 N k p FLOPs on one P100 at GEMM_SHARE of its 10.6 TFLOP/s."""
    setup = cm.Setup("1 P100", "P100", 1, 1)
    cost = cm.epoch_cost(network(), setup, cm.Workload("ImageNet", cm.IMAGENET_N), REF)
    expected = 2 * cm.IMAGENET_N * 10_000 * 256 * 20 / (10.6e12 * cm.GEMM_SHARE)
    assert cost.kmeans == pytest.approx(expected)


def test_feature_rows_go_to_the_host_when_they_do_not_fit_the_gpu():
    """1.28M x 4096 float32 rows (21 GB) do not fit a 16 GB P100; spread over 32 ranks they
    fit an A100 beside the training state."""
    net = network(arch="alexnet", feature_dim=4096)
    work = cm.Workload("ImageNet", cm.IMAGENET_N)
    alone = cm.memory(net, cm.Setup("1 P100", "P100", 1, 1), work)
    spread = cm.memory(net, cm.Setup("4 x 8 A100", "A100", 4, 8), work)
    assert not alone.rows_on_gpu and spread.rows_on_gpu
    assert alone.feature_rows == cm.IMAGENET_N * 4096 * 4
    assert spread.feature_rows == math.ceil(cm.IMAGENET_N / 32) * 4096 * 4
    assert alone.host_per_node > alone.feature_rows


def test_the_checks_compare_with_the_published_epoch_times():
    """The paper's 12 days / 500 epochs and swav's 3 min 13 s are the denominators."""
    assert cm.PAPER_EPOCH_S == pytest.approx(2073.6)
    check = cm.swav_check({224: 8.18e9, 160: 4.2e9, 96: 1.5e9})
    assert check["published_s"] == 193
    assert check["ratio"] == pytest.approx(check["predicted_s"] / 193)
