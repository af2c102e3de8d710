"""Two gloo processes: each rank's device stage draws its own augmentations (issue 13)."""
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pipelines.spec import CropSpec, MultiCropSpec
from pipelines.stage.dispatch import GpuMultiCrop

SPEC = MultiCropSpec(CropSpec(1, 32, (0.25, 1.0), blur_p=0.2, solarize_p=0.2),
                     CropSpec(2, 16, (0.05, 0.25), blur_p=0.5, solarize_p=0.0))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        canvas = torch.full((3, 40, 40, 3), 0, dtype=torch.uint8)
        canvas[..., 0] = torch.arange(40, dtype=torch.uint8).view(1, 1, 40) * 6  # same images
        sizes = torch.full((3, 2), 40)
        stage = GpuMultiCrop(SPEC, torch.device("cpu"), torch.float32, False, seed=5,
                             rank=dist.get_rank(), impl="torch")
        crops = [stage(canvas, sizes, torch.zeros(3), epoch=1, step=2).local_crops
                 for _ in range(2)]
        gathered = [torch.empty_like(crops[0]) for _ in range(2)]
        dist.all_gather(gathered, crops[0])
        torch.save({"same_rank_equal": torch.equal(crops[0], crops[1]),
                    "ranks_differ": not torch.equal(gathered[0], gathered[1])},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_ranks_draw_different_augmentations_and_each_rank_repeats_its_own(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        assert result["same_rank_equal"] and result["ranks_differ"], (rank, result)
