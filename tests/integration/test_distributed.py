"""A 2-process gloo DDP run: ranks end with identical memory banks and identical weights, and
distributed.main_then_all makes every rank wait for rank 0's work."""
import os
import socket
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.helpers import synthetic_batch, tiny_state
from trex_fast import distributed
from trex_fast.step import train_step

WORLD = 2
STEPS = 3
BN_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(WORLD),
                      RANK=str(rank), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    info = distributed.init("cpu")
    try:
        state = tiny_state(dist_info=info, memory_size=32, batch_size=4)
        for step in range(STEPS):  # each rank sees different images
            train_step(state, synthetic_batch(state.cfg, seed=100 * rank + step))
        torch.save({"memory": state.memory.state_dict(), "online": state.online.state_dict(),
                    "ema": state.ema.state_dict()}, os.path.join(out_dir, f"rank{rank}.pt"))
        _check_main_then_all(rank, out_dir)
    finally:
        dist.destroy_process_group()


def _check_main_then_all(rank: int, out_dir: str) -> None:
    """distributed.main_then_all (the end-of-run probe, issue #25): the work runs on rank 0 and
    no rank returns before it has ended (checked here, in the same spawn: spawns are slow)."""
    done = os.path.join(out_dir, "main_work_done")

    def work():
        time.sleep(0.5)
        open(done, "w").close()
        return "result"

    result = distributed.main_then_all(work)
    assert result == ("result" if rank == 0 else None), result
    assert os.path.exists(done), f"rank {rank} returned before rank 0's work ended"


def test_two_rank_ddp_keeps_memory_and_weights_identical(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD))
    # every rank enqueued the gathered batch of both ranks: 3 steps x 2 ranks x 4 images
    assert r0["memory"]["ptr"].item() == r1["memory"]["ptr"].item() == (STEPS * WORLD * 4) % 32
    for key, value in r0["memory"].items():
        assert torch.equal(value, r1["memory"][key]), f"memory.{key} differs between ranks"
    # weights: parameters (BN running statistics are rank-local without SyncBN, which has no
    # CPU kernel; on CUDA sync_bn=auto makes them global too)
    for part in ("online", "ema"):
        for key, value in r0[part].items():
            if not key.endswith(BN_BUFFERS):
                assert torch.equal(value, r1[part][key]), f"{part}.{key} differs between ranks"
    # the two ranks' halves of a gathered batch differ (they saw different images)
    feats = r0["memory"]["features"]
    assert not torch.allclose(feats[16:20], feats[20:24])
