"""Data-loader throughput: multi-crop samples/s of one or more pipelines, back to back.

    python tools/bench_loader.py --pipeline=reference,ffcv,decode_only --data=<dir> \
        --batch_size=64 --num_workers=2 --steps=N --device=cpu --preset=trex

<dir> holds train/ (ImageFolder, for reference) and train.beton (for ffcv and decode_only).
`--synthesize=N` first writes N ImageNet-like JPEGs (500x375, quality 90) and their beton there.
Pipelines:
  reference    torchvision/PIL multi-crop (pipelines/loaders/reference.py), end to end
  ffcv         pipelines/loaders/ffcv_multicrop.py: cpu_side = the FFCV loader alone (decode into
               canvases; with --decode=gpu: hand out the stored bytes), samples_per_s =
               loader + (gpu: batched decode_jpeg +) the multi-crop stage on --device
  decode_only  the floor of a decode-once design: the same .beton, the same workers, each
               JPEG decoded once by the ffcv path's CanvasDecoder and nothing else (no size
               field, no labels, no device stage)
  dali         pipelines/loaders/dali_multicrop.py in CPU mode (writes dali/train shards from
               train/ first when they are missing)
Each pipeline prints one JSON line; with several, a last JSON line holds all results and
the ratios. Steps after --warmup are timed (FFCV compiles its numba code in the first batch).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

PIPELINES = ("reference", "ffcv", "decode_only", "dali")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pipeline", default="reference,ffcv,decode_only",
                   help=f"comma-separated, from {PIPELINES}")
    p.add_argument("--data", required=True)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--num_workers", type=int, default=2)
    p.add_argument("--steps", type=int, default=20, help="timed steps per pipeline")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--device", default="cpu")
    p.add_argument("--preset", default="trex")
    p.add_argument("--synthesize", type=int, default=0, help="write N JPEGs + beton first")
    p.add_argument("--decode", default="cpu", choices=("cpu", "gpu"),
                   help="ffcv only: decode JPEGs in the loader (cpu) or on --device (gpu)")
    args = p.parse_args(argv)
    names = [n for n in args.pipeline.split(",") if n]
    bad = [n for n in names if n not in PIPELINES]
    if bad or not names:
        p.error(f"--pipeline={args.pipeline!r}: accepted values are {', '.join(PIPELINES)}")
    args.pipelines = names
    return args


# ---------------------------------------------------------------- data
def _write_beton(root: str) -> None:
    """Runs in a spawned process, which inherits "spawn" as its start method: the writer's
    workers would each import torch and ffcv again (~9 s a writer). Nothing has run numba here
    yet, so they fork."""
    multiprocessing.set_start_method("fork", force=True)
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter
    from torchvision.datasets import ImageFolder

    fields = {"image": RGBImageField(write_mode="jpg", max_resolution=512, jpeg_quality=90),
              "label": IntField()}
    DatasetWriter(os.path.join(root, "train.beton"), fields, num_workers=2).from_indexed_dataset(
        ImageFolder(os.path.join(root, "train")))


def synthesize(root: str, n: int) -> None:
    """n ImageNet-like JPEGs (500x375 or 375x500, quality 90) + train.beton in a spawned
    process (a DatasetWriter forked after numba ran can deadlock)."""
    import numpy as np
    from PIL import Image

    from pipelines import demo_data

    rng = np.random.default_rng(0)
    classes = len(demo_data.PATTERNS)
    for i in range(n):
        label = i % classes
        size = (500, 375) if i % 4 else (375, 500)
        img = demo_data.make_image(label, rng).resize(size, Image.BICUBIC)
        pixels = np.asarray(img, dtype=np.float32) + rng.normal(0, 6, (size[1], size[0], 3))
        folder = os.path.join(root, "train", f"c{label:02d}")
        os.makedirs(folder, exist_ok=True)
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(
            os.path.join(folder, f"{i:06d}.JPEG"), quality=90)
    proc = multiprocessing.get_context("spawn").Process(target=_write_beton, args=(root,))
    proc.start()
    proc.join()
    if proc.exitcode != 0:
        raise RuntimeError(f"writing {root}/train.beton failed (exit code {proc.exitcode})")


# ---------------------------------------------------------------- timing
def _settings(args):
    from pipelines.batch import LoaderSettings
    return LoaderSettings(batch_size=args.batch_size, num_workers=args.num_workers, seed=0,
                          rank=0, world_size=1, device=torch.device(args.device),
                          dtype=torch.float32 if args.device == "cpu" else torch.bfloat16,
                          channels_last=True)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()  # the one host-device sync: at the timer edges


def time_batches(make_iter, args) -> float:
    """samples/s over args.steps batches after args.warmup, crossing epochs as needed."""
    epoch, done, start = 0, 0, None
    total = args.warmup + args.steps
    while done < total:
        for _ in make_iter(epoch):
            done += 1
            if done == args.warmup:
                _sync(args.device)
                start = time.perf_counter()
            if done == total:
                break
        epoch += 1
    _sync(args.device)
    return args.steps * args.batch_size / (time.perf_counter() - start)


def _spec(args):
    from pipelines.spec import multicrop_spec
    from trex_fast.config import make_config
    return multicrop_spec(make_config(args.preset))


def bench_reference(args) -> dict:
    from pipelines.loaders.reference import ReferenceTrainData
    data = ReferenceTrainData(os.path.join(args.data, "train"), _spec(args), _settings(args))
    rate = time_batches(data.epoch, args)
    return {"samples_per_s": rate, "cpu_side_samples_per_s": rate}


def bench_ffcv(args) -> dict:
    from pipelines.loaders.ffcv_multicrop import FfcvTrainData
    data = FfcvTrainData(os.path.join(args.data, "train.beton"), _spec(args), _settings(args),
                         decode=args.decode)
    cpu_side = time_batches(data.decoded, args)
    end_to_end = time_batches(data.epoch, args)
    return {"samples_per_s": end_to_end, "cpu_side_samples_per_s": cpu_side,
            "decode": args.decode}


def bench_decode_only(args) -> dict:
    from ffcv.loader import Loader, OrderOption
    from ffcv.pipeline.pipeline_spec import PipelineSpec

    from pipelines.loaders.ffcv_ops import CanvasDecoder
    loader = Loader(os.path.join(args.data, "train.beton"), batch_size=args.batch_size,
                    num_workers=args.num_workers, order=OrderOption.RANDOM, seed=0,
                    pipelines={"image": PipelineSpec("image", decoder=CanvasDecoder()),
                               "label": None}, drop_last=True, batches_ahead=2)

    def epoch_iter(epoch: int):
        iterator = iter(loader)
        try:
            yield from iterator
        finally:
            iterator.close()  # an abandoned FFCV iterator can abort the process at exit

    rate = time_batches(epoch_iter, args)
    return {"samples_per_s": rate, "cpu_side_samples_per_s": rate}


def bench_dali(args) -> dict:
    """pipelines/loaders/dali_multicrop.py on <data>/dali/train; if absent, shards of the same JPEG
    files as train/ (bytes copied, not re-encoded) are written there first, in a seeded random
    order as tools/convert_in1k.py writes train."""
    from pathlib import Path

    from pipelines.loaders.dali_multicrop import DaliTrainData

    folder = os.path.join(args.data, "dali", "train")
    if not os.path.isdir(folder):
        import numpy as np
        from torchvision.datasets import ImageFolder

        from pipelines.convert.shards import ShardWriter
        writer = ShardWriter(Path(folder), shard_size=256)
        samples = ImageFolder(os.path.join(args.data, "train")).samples
        for i in np.random.default_rng(0).permutation(len(samples)):
            path, label = samples[i]
            with open(path, "rb") as f:
                writer.add(label, f.read())
        writer.close()
    data = DaliTrainData(folder, _spec(args), _settings(args))
    rate = time_batches(data.epoch, args)  # DALI does all the work: CPU side = end to end
    return {"samples_per_s": rate, "cpu_side_samples_per_s": rate}


BENCHES = {"reference": bench_reference, "ffcv": bench_ffcv, "decode_only": bench_decode_only,
           "dali": bench_dali}


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.synthesize:
        synthesize(args.data, args.synthesize)
    torch.set_num_threads(max(1, args.num_workers))  # the device stage on CPU: same cores
    results = {}
    for name in args.pipelines:
        result = {"pipeline": name, **BENCHES[name](args), "batch_size": args.batch_size,
                  "num_workers": args.num_workers, "steps": args.steps, "device": args.device,
                  "preset": args.preset}
        results[name] = result
        print(json.dumps(result), flush=True)
    if len(results) == 1:
        return results[args.pipelines[0]]
    summary = {"pipeline": ",".join(results),  # name -> samples/s in the two rate keys
               "samples_per_s": {k: v["samples_per_s"] for k, v in results.items()},
               "cpu_side_samples_per_s": {k: v["cpu_side_samples_per_s"]
                                          for k, v in results.items()}}
    cpu = {k: v["cpu_side_samples_per_s"] for k, v in results.items()}
    if "ffcv" in cpu and "reference" in cpu:
        summary["ffcv_cpu_side_vs_reference"] = cpu["ffcv"] / cpu["reference"]
    if "ffcv" in cpu and "decode_only" in cpu:
        summary["ffcv_cpu_side_vs_decode_only"] = cpu["ffcv"] / cpu["decode_only"]
    print(json.dumps(summary), flush=True)
    return summary


if __name__ == "__main__":
    main()
