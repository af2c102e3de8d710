"""The run plan's kernel choices (issue 22, item 10): loss_impl=auto and the multi-crop stage
resolve from one availability fact, so where Triton is unusable on a CUDA machine both fall back
to torch; the stage's impl is a plan fact (config.json's resolved block, next to loss_impl) that
the loaders build their stage with. CUDA and Triton are faked: no device is needed."""
import pytest
import torch

from pipelines.spec import multicrop_spec
from pipelines.stage.dispatch import GpuMultiCrop
from tests.helpers import tiny_config
from trex_fast import availability
from trex_fast.distributed import DistInfo
from trex_fast.plan import make_plan

SINGLE = DistInfo(0, 1, 0, 1)
CACHED = (availability.probe_cuda, availability.probe_triton, availability.has_triton)


@pytest.fixture
def fresh_probes():
    for probe in CACHED:
        probe.cache_clear()
    yield
    for probe in CACHED:
        probe.cache_clear()


def _fake_cuda(monkeypatch):
    monkeypatch.setattr(availability, "probe_cuda",
                        lambda: availability.Probe("cuda", True, "a faked H100"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))


def _triton_not_installed(monkeypatch):
    real = availability._importable
    monkeypatch.setattr(availability, "_importable", lambda module: module != "triton" and
                        real(module))


def _triton_fails_to_import(monkeypatch):
    real = availability.importlib.import_module

    def import_module(name, *args):
        if name == "triton":
            raise ImportError("libcuda.so: version mismatch")
        return real(name, *args)

    monkeypatch.setattr(availability.importlib, "import_module", import_module)


MACHINES = {  # name: (device, fakes, the loss's and the stage's impl)
    "cuda, triton usable": ("cuda:0", [_fake_cuda], "triton"),
    "cuda, triton not installed": ("cuda:0", [_fake_cuda, _triton_not_installed], "torch"),
    "cuda, triton fails to import": ("cuda:0", [_fake_cuda, _triton_fails_to_import], "torch"),
    "cpu": ("cpu", [], "torch"),
}


@pytest.mark.parametrize("machine", MACHINES)
def test_loss_and_stage_resolve_from_one_fact(machine, fresh_probes, monkeypatch):
    device, fakes, impl = MACHINES[machine]
    for fake in fakes:
        fake(monkeypatch)
    cfg = tiny_config()
    assert cfg.loss_impl == "auto"
    plan = make_plan(cfg, SINGLE, 5, 10, device=device)
    assert plan.loss_impl == impl
    assert plan.stage_impl == impl
    # what the loaders build: the stage from the plan's loader view
    settings = plan.loader_settings()
    stage = GpuMultiCrop(multicrop_spec(cfg), settings.device, settings.dtype,
                         settings.channels_last, settings.seed, impl=settings.stage_impl)
    assert stage.impl == impl
    # config.json's resolved block is plan.to_dict(): the stage sits next to the loss
    keys = list(plan.to_dict())
    assert keys[keys.index("loss_impl") + 1] == "stage_impl"


# ---------------------------------------------------------------------------------------------
# A recipe run at another global batch says so (RECIPE.md; issue 25, item 5)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("preset,batch_size,world,expected", [
    ("trex", 64, 1, "use --batch_size=256"),  # the one-GPU default: global batch 64
    ("trex_star", 64, 2, "use --batch_size=128"),
    ("plain", 32, 3, "a number of processes that divides 256"),
    ("trex", 64, 4, None),  # the reference: 4 x 64
    ("trex", 256, 1, None),  # one GPU at the recipe's batch
    ("demo", 32, 1, None),  # not the recipe
])
def test_a_recipe_run_at_another_global_batch_says_so(preset, batch_size, world, expected):
    from trex_fast.config import make_config
    from trex_fast.plan import batch_deviation

    cfg = make_config(preset, batch_size=batch_size, memory_size=0 if preset == "plain" else 8192,
                      device="cpu")
    plan = make_plan(cfg, DistInfo(0, world, 0, world), num_classes=10, steps_per_epoch=5)
    line = batch_deviation(cfg, plan)
    if expected is None:
        assert line is None
        return
    total = batch_size * world
    assert line.startswith(f"global batch {total} (batch_size={batch_size} x {world} process")
    assert "not the recipe's 256" in line and expected in line
    assert f"peak LR is {cfg.lr * total / 256:g}" in line  # the plan's, not re-derived
