"""Issue #14 item 12: train_step makes no host sync, checked on the CPU.

count_cost(strict=True) raises at the first op that would make the host wait for a CUDA
device (.item(), bool(t), nonzero, boolean-mask indexing, tensors from Python data...). The
metrics are read by the loop every log_every steps, outside train_step, so that read is not
checked here.
"""
import pytest
import torch

from tests.helpers import synthetic_batch, tiny_state
from trex_fast.measure.costcount import HostSyncError, count_cost
from trex_fast.step import train_step

SMALL = dict(global_size=16, local_size=16, local_crops=1)  # the step's ops, at little cost


@pytest.mark.parametrize("loss_impl,precision", [("torch", "fp32"), ("triton", "bf16")])
def test_train_step_makes_no_host_sync(loss_impl, precision):
    torch.manual_seed(0)
    state = tiny_state(loss_impl=loss_impl, precision=precision, **SMALL)
    assert state.memory is not None  # the t-ReX step: memory prototypes, EMA, enqueue
    train_step(state, synthetic_batch(state.cfg, seed=0))  # warm-up: lazy state, optimiser
    with count_cost(strict=True) as cost:
        train_step(state, synthetic_batch(state.cfg, seed=1))
    assert cost.host_syncs == []
    assert cost.launches > 100  # the whole step ran under the check
    if loss_impl == "triton":
        assert len(cost.triton_launches) >= 2  # the fused loss forward and backward
    sums, _ = state.metrics.read_and_reset()  # the loop's read, outside the step
    assert sums["steps"] == 2 and sums["loss_sum"] == sums["loss_sum"]  # finite, not NaN


def test_the_check_catches_a_sync_inside_the_step(monkeypatch):
    state = tiny_state(loss_impl="torch", **SMALL)
    memory_prototypes = state.class_weight

    def prototypes_and_a_read():  # e.g. a debug print of the memory's fill
        weight = memory_prototypes()
        weight.norm().item()
        return weight

    monkeypatch.setattr(state, "class_weight", prototypes_and_a_read)
    with pytest.raises(HostSyncError, match="item"):
        with count_cost(strict=True):
            train_step(state, synthetic_batch(state.cfg))
