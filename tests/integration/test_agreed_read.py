"""Two gloo processes: the loop's metric read agrees on the clock checkpoint and on a stop
signal that reached one rank only, inside its one host sync (issue #15)."""
import os
import signal
import socket
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from trex_fast.loop import CheckpointClock, EpochTotals, StopSignal, read_metrics
from trex_fast.measure.costcount import count_cost
from trex_fast.step import StepMetrics


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _read(state, stop, clock) -> dict:
    with count_cost() as cost:
        read, due = read_metrics(state, EpochTotals(), stop, clock, "checkpoint.pt")
    return {"loss_sum": read["loss_sum"], "correct": read["correct"], "due": due,
            "agreed": stop.agreed, "syncs": list(cost.host_syncs)}


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        metrics = StepMetrics(torch.device("cpu"))
        state = SimpleNamespace(metrics=metrics, device=torch.device("cpu"), step=3)
        stop = StopSignal()
        # rank 1 alone got SIGTERM and its clock is due; rank 0 knows of neither
        if rank == 1:
            stop.received = signal.SIGTERM
        clock = CheckpointClock(1e-9 if rank == 1 else 60.0)
        results = []
        for _ in range(2):  # then again, with rank 1's clock reset
            metrics.add(torch.tensor(1.5 + rank), torch.ones(6, dtype=torch.long), 2)
            results.append(_read(state, stop, clock))
            clock.reset()
            clock.seconds = 60.0
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_both_ranks_agree_on_one_ranks_signal_and_clock_in_the_reads_one_sync(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        first, second = torch.load(tmp_path / f"rank{rank}.pt")
        # the metrics stay this rank's own; the decisions are the ranks' maximum
        assert first["loss_sum"] == 1.5 + rank and first["correct"] == 6
        assert first["due"] is True and first["agreed"] == signal.SIGTERM, (rank, first)
        assert first["syncs"] == ["Tensor.tolist"], (rank, first)  # one copy for all of it
        # rank 1's signal stays agreed; the clock was reset on both
        assert second["due"] is False and second["agreed"] == signal.SIGTERM, (rank, second)
        assert second["syncs"] == ["Tensor.tolist"]
