"""DDP's buffer-sync keyword across the torch range (issue #31, item 1): torch 2.11 and 2.12
have no ``forward_sync_buffers``, and passing it there is a TypeError at the first
data_parallel call, after a whole feature pass and k-means."""
from __future__ import annotations

import inspect

import torch
from torch import nn

from dcluster.parallel.distributed import Env
from dcluster.runtime import optimize
from dcluster.runtime.optimize import buffer_sync_kwargs, data_parallel


def ddp_init_2_12(self, module, device_ids=None, output_device=None, dim=0,
                  broadcast_buffers=True, init_sync=True, process_group=None,
                  bucket_cap_mb=None, find_unused_parameters=False, check_reduction=False,
                  gradient_as_bucket_view=False, static_graph=False):
    """DistributedDataParallel.__init__'s parameters in torch 2.12 (stubbed: no 2.12 CPU
    wheel exists to install here)."""


def ddp_init_2_13(self, module, device_ids=None, broadcast_buffers=True,
                  find_unused_parameters=False, gradient_as_bucket_view=False,
                  forward_sync_buffers=None):
    """The 2.13 signature, in part: the new keyword beside the deprecated one."""


def test_buffer_sync_keyword_follows_the_signature_of_torch_2_12_and_2_13():
    assert buffer_sync_kwargs(ddp_init_2_12) == {"broadcast_buffers": True}
    assert buffer_sync_kwargs(ddp_init_2_13) == {"forward_sync_buffers": True}


def test_data_parallel_under_a_stubbed_torch_2_12_ddp_passes_only_keywords_it_accepts(monkeypatch):
    class DDP212:
        """Accepts exactly torch 2.12's keywords, as the real class would (TypeError else);
        ``inspect.signature`` of its ``__init__`` reads 2.12's through ``__wrapped__``."""
        def __init__(self, *args, **kwargs):
            self.bound = inspect.signature(ddp_init_2_12).bind(self, *args, **kwargs)
        __init__.__wrapped__ = ddp_init_2_12

    monkeypatch.setattr(optimize, "DistributedDataParallel", DDP212)
    env = Env(rank=0, world_size=2, local_rank=0, device=torch.device("cpu"))
    net = data_parallel(nn.Linear(2, 2), env)
    assert net.bound.arguments["broadcast_buffers"] is True
    assert "forward_sync_buffers" not in net.bound.arguments
