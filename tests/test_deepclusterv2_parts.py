"""DeepCluster-v2's parts (dcluster/methods/deepclusterv2): spherical k-means on one and two
gloo ranks against a numpy reference, the frozen prototypes, the loss and LARS's first step
against hand computations, the lr schedule's landmarks, the multi-resolution forward, and
the config's validation."""
from __future__ import annotations

import functools
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from dcluster.core.config import ConfigError, ModelConfig
from dcluster.methods import load_config
from dcluster.methods.deepclusterv2.config import DeepClusterV2Config
from dcluster.methods.deepclusterv2.lars import LARS, lars_param_groups
from dcluster.methods.deepclusterv2.loss import prototype_loss
from dcluster.methods.deepclusterv2.model import build
from dcluster.methods.deepclusterv2.schedule import lr_at
from dcluster.methods.deepclusterv2.spherical_kmeans import spherical_kmeans
from dcluster.parallel.collectives import Comm
from dcluster.parallel.distributed import shard_bounds
from ranks import spawn_ranks

CPU = torch.device("cpu")
K, ITERS = 6, 10


def unit_rows(n: int = 600, d: int = 8, centres: int = 6, seed: int = 0) -> np.ndarray:
    """Blobs on the unit sphere, as a bank of embeddings is."""
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centres, d))
    x = c[rng.integers(0, centres, n)] + 0.5 * rng.standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def initial(x: np.ndarray) -> np.ndarray:
    return x[np.random.default_rng(1).choice(len(x), K, replace=False)]


def reference_kmeans(x: np.ndarray, init: np.ndarray, iters: int) -> tuple[np.ndarray, np.ndarray]:
    """Spherical k-means as swav's cluster_memory computes it, in float64: assign by the
    largest dot product, centroids = normalised sums; a final assignment."""
    x64, c = x.astype(np.float64), init.astype(np.float64)
    for _ in range(iters):
        labels = np.argmax(x64 @ c.T, axis=1)
        counts = np.bincount(labels, minlength=len(c))
        assert counts.min() > 0, "the reference has no rule for empty clusters"
        sums = np.stack([x64[labels == j].sum(axis=0) for j in range(len(c))])
        c = sums / np.linalg.norm(sums, axis=1, keepdims=True)
    return np.argmax(x64 @ c.T, axis=1), c


def kmeans_rank(out: Path, comm: Comm) -> None:
    """Every split of the rows over this job's ranks (an even one, and for two ranks one
    where rank 1 holds none), from given and from drawn initial centroids."""
    x = unit_rows()
    splits = {"even": shard_bounds(len(x), comm.world_size)}
    if comm.world_size == 2:
        splits["rank1-empty"] = np.array([0, len(x), len(x)])
    for name, bounds in splits.items():
        mine = x[bounds[comm.rank]:bounds[comm.rank + 1]]
        for init_name, init in (("given", initial(x)), ("drawn", None)):
            result = spherical_kmeans(mine, K, iters=ITERS, seed=3, comm=comm, init=init,
                                      backend="torch", device="cpu", own_device=CPU)
            np.savez(out / f"{name}-{init_name}-rank{comm.rank}.npz", labels=result.labels,
                     centroids=result.centroids)


@pytest.mark.parametrize("world", [1, 2])
def test_spherical_kmeans_over_ranks_equals_the_numpy_reference(tmp_path, world):
    spawn_ranks(functools.partial(kmeans_rank, tmp_path), world)
    x = unit_rows()
    ref_labels, ref_centroids = reference_kmeans(x, initial(x), ITERS)
    one_process = spherical_kmeans(x, K, iters=ITERS, seed=3, backend="torch", device="cpu")
    for split in ["even"] + (["rank1-empty"] if world == 2 else []):
        for init_name in ("given", "drawn"):
            ranks = [np.load(tmp_path / f"{split}-{init_name}-rank{r}.npz") for r in range(world)]
            labels = np.concatenate([r["labels"] for r in ranks])
            centroids = ranks[0]["centroids"]
            for other in ranks[1:]:  # the same centroids on every rank, bit for bit
                assert np.array_equal(other["centroids"], centroids)
            np.testing.assert_allclose(np.linalg.norm(centroids, axis=1), 1.0, atol=1e-6)
            if init_name == "given":
                np.testing.assert_array_equal(labels, ref_labels)
                np.testing.assert_allclose(centroids, ref_centroids, atol=1e-5)
            else:  # the engine's seeded draw picks the same rows however they are split
                np.testing.assert_array_equal(labels, one_process.labels)
                np.testing.assert_allclose(centroids, one_process.centroids, atol=1e-6)


def test_spherical_kmeans_refuses_rows_that_are_not_unit():
    with pytest.raises(ValueError, match="L2-normalised"):
        spherical_kmeans(2 * unit_rows(), K, iters=2, seed=0, backend="torch", device="cpu")


def small_net(prototypes=(5, 3), hidden_mlp: int = 16):
    torch.manual_seed(0)
    cfg = DeepClusterV2Config(feat_dim=8, hidden_mlp=hidden_mlp, prototypes=list(prototypes))
    return build(ModelConfig(arch="smallconv", width=4, fc_dim=0, sobel=False), cfg, 32,
                 view_sizes=[32, 16])


def test_prototypes_are_the_normalised_centroids_and_stay_frozen():
    net = small_net()
    centroids = torch.randn(5, 8, generator=torch.Generator().manual_seed(2)) * 3
    net.set_prototypes(0, centroids)
    net.set_prototypes(1, np.eye(3, 8, dtype=np.float32) * 2)
    expected = centroids / centroids.norm(dim=1, keepdim=True)
    torch.testing.assert_close(net.prototypes[0].weight, expected)
    torch.testing.assert_close(net.prototypes[1].weight, torch.eye(3, 8))
    assert not any(head.weight.requires_grad for head in net.prototypes)
    before = [head.weight.clone() for head in net.prototypes]
    projection = net.projection[0].weight.clone()
    views = [torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32), torch.randn(4, 3, 16, 16)]
    labels = [torch.tensor([0, 1, 4, 2]), torch.tensor([2, 0, 1, 1])]
    for optimizer in (LARS(lars_param_groups(net), lr=0.5, weight_decay=1e-4),
                      torch.optim.SGD(net.parameters(), lr=0.5, momentum=0.9)):
        _, scores = net(views)
        prototype_loss(scores, labels, 0.1, n_views=3).backward()
        optimizer.step()
        optimizer.zero_grad()
    for head, old in zip(net.prototypes, before):
        assert torch.equal(head.weight, old) and head.weight.grad is None
    assert not torch.equal(net.projection[0].weight, projection)  # the rest did learn
    with pytest.raises(ValueError, match="head 0"):
        net.set_prototypes(0, torch.ones(4, 8))


def test_loss_is_the_mean_over_heads_of_the_cross_entropy_of_every_view():
    """2 heads (3 and 2 prototypes), 2 views of 3 images, temperature 0.5, by hand."""
    scores = [torch.tensor([[0.1, 0.9, -0.2], [0.5, 0.0, 0.3], [-0.4, 0.2, 0.8],
                            [0.7, -0.1, 0.0], [0.2, 0.6, -0.3], [0.0, 0.1, 0.9]]),
              torch.tensor([[0.3, -0.3], [0.9, 0.1], [-0.5, 0.5],
                            [0.0, 0.4], [0.6, 0.2], [0.1, -0.7]])]
    assignments = [torch.tensor([1, 0, 2]), torch.tensor([0, 1, 1])]
    temperature = 0.5

    def cross_entropy(row: list[float], target: int) -> float:
        logits = [s / temperature for s in row]
        return math.log(sum(math.exp(v) for v in logits)) - logits[target]

    per_head = []
    for s, a in zip(scores, assignments):
        rows = s.tolist()
        # row r is image r % 3 of view r // 3: each view of an image has its image's cluster
        per_head.append(sum(cross_entropy(rows[r], int(a[r % 3])) for r in range(6)) / 6)
    expected = sum(per_head) / 2
    loss = prototype_loss(scores, assignments, temperature, n_views=2)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    ignored = prototype_loss(scores[:1], [torch.tensor([1, 0, -100])], temperature, n_views=2)
    kept = [r for r in range(6) if r % 3 != 2]
    assert ignored.item() == pytest.approx(
        sum(cross_entropy(scores[0].tolist()[r], [1, 0][r % 3]) for r in kept) / 4, rel=1e-6)


def test_lars_first_step_matches_a_hand_computation_for_a_weight_and_a_bias():
    w0, gw = [[0.5, -1.0], [2.0, 0.25]], [[0.1, 0.3], [-0.2, 0.05]]
    b0, gb = [0.4, -0.6], [0.2, 0.1]
    lr, wd, eta = 0.1, 0.01, 0.001
    weight = torch.nn.Parameter(torch.tensor(w0, dtype=torch.float64))
    bias = torch.nn.Parameter(torch.tensor(b0, dtype=torch.float64))
    optimizer = LARS([{"params": [weight]},
                      {"params": [bias], "lars": False, "weight_decay": 0.0}],
                     lr=lr, momentum=0.9, weight_decay=wd, eta=eta)
    weight.grad = torch.tensor(gw, dtype=torch.float64)
    bias.grad = torch.tensor(gb, dtype=torch.float64)
    optimizer.step()

    w_flat, g_flat = sum(w0, []), sum(gw, [])
    w_norm = math.sqrt(sum(v * v for v in w_flat))
    g_norm = math.sqrt(sum(v * v for v in g_flat))
    ratio = eta * w_norm / (g_norm + wd * w_norm + 1e-8)
    # the first step: momentum buffer = the scaled gradient itself
    expected_w = [w - lr * ratio * (g + wd * w) for w, g in zip(w_flat, g_flat)]
    expected_b = [b - lr * g for b, g in zip(b0, gb)]  # no trust ratio, no weight decay
    np.testing.assert_allclose(weight.detach().numpy().ravel(), expected_w, rtol=1e-12)
    np.testing.assert_allclose(bias.detach().numpy(), expected_b, rtol=1e-12)


def test_lars_resumes_from_its_state_dict_as_if_never_stopped():
    """Three steps straight, against two steps, a save, a fresh network and optimiser
    loaded from it, and the third step: the momentum buffers travel in the state_dict."""
    def fresh() -> tuple[torch.nn.Module, LARS]:
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
        return net, LARS(lars_param_groups(net), lr=0.2, weight_decay=1e-3)

    def step(net: torch.nn.Module, optimizer: LARS) -> None:
        net(data).pow(2).sum().backward()
        optimizer.step()
        optimizer.zero_grad()

    data = torch.randn(8, 4, generator=torch.Generator().manual_seed(1))
    straight = fresh()
    for _ in range(3):
        step(*straight)
    stopped = fresh()
    for _ in range(2):
        step(*stopped)
    saved = stopped[0].state_dict(), stopped[1].state_dict()
    resumed = fresh()
    resumed[0].load_state_dict(saved[0])
    resumed[1].load_state_dict(saved[1])
    step(*resumed)
    for a, b in zip(straight[0].parameters(), resumed[0].parameters()):
        assert torch.equal(a, b)


def test_schedule_warms_up_then_decays_by_cosine_to_the_final_lr():
    steps_per_epoch, epochs, warmup_epochs = 7, 20, 3
    start, base, final = 0.3, 4.8, 0.0048
    lr = [lr_at(s, steps_per_epoch, epochs, warmup_epochs, start, base, final)
          for s in range(steps_per_epoch * epochs)]
    warmup = steps_per_epoch * warmup_epochs
    assert lr[0] == start
    assert lr[warmup - 1] == pytest.approx(base, rel=1e-12)  # the warm-up's last step
    assert lr[warmup] == base  # the cosine's first
    assert all(a < b for a, b in zip(lr[:warmup - 1], lr[1:warmup]))
    assert all(a > b for a, b in zip(lr[warmup:-1], lr[warmup + 1:]))
    # swav's cosine over T steps ends one step short of its end: within that step of final_lr
    decay = len(lr) - warmup
    assert final < lr[-1] <= final + (base - final) * (1 - math.cos(math.pi / decay)) / 2 + 1e-15
    assert lr[-1] == pytest.approx(final, abs=1e-3)
    with pytest.raises(ValueError):
        lr_at(len(lr), steps_per_epoch, epochs, warmup_epochs, start, base, final)


def test_multi_resolution_forward_equals_each_view_alone_in_eval_mode():
    net = small_net().eval()
    net.set_prototypes(0, torch.randn(5, 8, generator=torch.Generator().manual_seed(3)))
    net.set_prototypes(1, torch.randn(3, 8, generator=torch.Generator().manual_seed(4)))
    g = torch.Generator().manual_seed(5)
    views = [torch.randn(4, 3, 32, 32, generator=g), torch.randn(4, 3, 32, 32, generator=g),
             torch.randn(4, 3, 16, 16, generator=g), torch.randn(4, 3, 16, 16, generator=g),
             torch.randn(4, 3, 16, 16, generator=g)]
    with torch.no_grad():
        embeddings, scores = net(views)
        alone = torch.cat([net.embed(v) for v in views])
    torch.testing.assert_close(embeddings, alone, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(embeddings.norm(dim=1), torch.ones(20))
    for head, head_scores in zip(net.prototypes, scores):
        torch.testing.assert_close(head_scores, alone @ head.weight.T, rtol=1e-5, atol=1e-6)


def test_a_linear_projection_and_sizes_a_body_cannot_pool_are_handled():
    net = small_net(hidden_mlp=0)
    assert isinstance(net.projection, torch.nn.Linear)
    cfg = DeepClusterV2Config(feat_dim=8, hidden_mlp=0, prototypes=[4])
    with pytest.raises(ValueError, match="globally pooled"):
        build(ModelConfig(arch="smallvgg", width=4, fc_dim=0, sobel=False), cfg, 32,
              view_sizes=[16])


@pytest.mark.parametrize("override, named", [
    ("deepclusterv2.temperature=0.0", "deepclusterv2.temperature"),
    ("deepclusterv2.kmeans_iters=0", "deepclusterv2.kmeans_iters"),
    ("deepclusterv2.prototypes=[]", "deepclusterv2.prototypes"),
    ("deepclusterv2.prototypes=[3000,1]", "deepclusterv2.prototypes"),
    ("deepclusterv2.crops_for_assign=[0,0]", "deepclusterv2.crops_for_assign"),
    ("deepclusterv2.crops_for_assign=[-1]", "deepclusterv2.crops_for_assign"),
    ("deepclusterv2.crops_for_assign=[0,1]", "deepclusterv2.crops_for_assign"),  # one view
    ("deepclusterv2.lars_eta=0.0", "deepclusterv2.lars_eta"),
])
def test_config_check_names_the_bad_key(override, named):
    base = ["name=v2", "data.path=/nowhere", "method=deepclusterv2",
            "deepclusterv2.crops_for_assign=[0]"]
    load_config(None, base, check_paths=False)  # these pass
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        load_config(None, [*base, override], check_paths=False)
