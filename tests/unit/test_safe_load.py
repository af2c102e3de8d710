"""Weights-only loading (issue #18), no process started and no run trained: a crafted file never
runs code unless trust_file=True; empty and truncated files named; the authors' release formats
load."""
import argparse

import pytest
import torch
import torchvision

from tests.helpers import WritesMarker, tiny_config
from trex_fast.checkpoint import load_checkpoint
from trex_fast.config import ConfigError
from trex_fast.models.weights import backbone_state
from trex_fast.safe_load import UnreadableFileError, UnsafeFileError, load_file


@pytest.mark.parametrize("zip_format", [True, False])
def test_a_crafted_file_is_refused_naming_file_and_global(tmp_path, zip_format):
    marker, path = tmp_path / "marker", tmp_path / "crafted.pt"
    torch.save({"w": torch.ones(3), "payload": WritesMarker(marker)}, path,
               _use_new_zipfile_serialization=zip_format)  # legacy: no static scan, unpickler
    with pytest.raises(UnsafeFileError) as e:
        load_file(str(path))
    message = str(e.value)
    assert "\n" not in message
    assert str(path) in message and "io.open" in message and "--trust_file=True" in message
    assert not marker.exists()


def _cut_files(tmp_path) -> dict:
    """An empty file, zip and legacy torch files cut in half, and a text file."""
    whole = {}
    for zip_format in (True, False):
        path = tmp_path / f"whole_{zip_format}.pt"
        torch.save({"w": torch.ones(64)}, path, _use_new_zipfile_serialization=zip_format)
        whole[zip_format] = path.read_bytes()
    files = {"empty.pt": b"", "cut_zip.pt": whole[True][:len(whole[True]) // 2],
             "cut_legacy.pt": whole[False][:len(whole[False]) // 2],
             "notes.pt": b"not a torch file\n"}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    return {name: tmp_path / name for name in files}


@pytest.mark.parametrize("trust_file", [False, True])
def test_an_empty_or_truncated_file_is_named_in_one_line(tmp_path, trust_file):
    for name, path in _cut_files(tmp_path).items():
        with pytest.raises(UnreadableFileError) as e:
            load_file(str(path), trust_file=trust_file)
        message = str(e.value)
        assert message.startswith(f"{path}: cannot be read: ") and "\n" not in message
        expected = "the file is empty" if name == "empty.pt" else "truncated or not a torch file"
        assert expected in message, message


def test_trust_file_loads_the_crafted_file_only_when_asked(tmp_path):
    marker, path = tmp_path / "marker", tmp_path / "crafted.pt"
    torch.save({"w": torch.ones(3), "payload": WritesMarker(marker)}, path)
    for not_true in ("yes", 1, "True"):  # a mistyped flag must not switch the check off
        with pytest.raises(ValueError, match="--trust_file=.*expected True or False"):
            load_file(str(path), trust_file=not_true)
    assert not marker.exists()
    loaded = load_file(str(path), trust_file=True)
    loaded["payload"].close()
    assert marker.exists() and torch.equal(loaded["w"], torch.ones(3))


def test_trust_file_is_a_boolean_train_flag_off_by_default():
    assert tiny_config().trust_file is False
    assert tiny_config(trust_file=True).trust_file is True
    with pytest.raises(ConfigError, match="--trust_file='yes': expected True or False"):
        tiny_config(trust_file="yes")


def _authors_full_checkpoint(path, backbone: torch.nn.Module) -> None:
    """The layout of the released full checkpoints: model / optimizer / epoch / args /
    fp16_scaler, the model's keys under DDP's `module.` and a head next to the backbone."""
    head = torch.nn.Linear(512, 16)
    model = {**{f"module.backbone.{k}": v for k, v in backbone.state_dict().items()},
             **{f"module.head.{k}": v for k, v in head.state_dict().items()}}
    params = list(backbone.parameters()) + list(head.parameters())
    optimizer = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    for p in params:
        p.grad = torch.ones_like(p)
    optimizer.step()  # momentum buffers in the state
    args = argparse.Namespace(arch="resnet50", data_path="/datasets/imagenet", lr=0.1,
                              global_crops_scale=[0.25, 1.0], local_crops_number=8,
                              use_fp16=True, output_dir=None, dist_url="env://", gpu=0)
    fp16_scaler = {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5,
                   "growth_interval": 2000, "_growth_tracker": 17}
    torch.save({"model": model, "optimizer": optimizer.state_dict(), "epoch": 100,
                "args": args, "fp16_scaler": fp16_scaler}, path)


def test_the_authors_full_checkpoint_loads_and_its_backbone_is_the_saved_one(tmp_path):
    saved = torchvision.models.resnet18()
    saved.fc = torch.nn.Identity()
    path = tmp_path / "trex_full.pth"
    _authors_full_checkpoint(path, saved)
    with pytest.raises(Exception, match="argparse.Namespace"):  # torch's default refuses it
        torch.load(path, weights_only=True)

    state = backbone_state(str(path), "resnet18")
    assert state.keys() == saved.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in saved.state_dict().items())
    raw = load_file(str(path), allowed=(argparse.Namespace,))
    assert raw["args"].arch == "resnet50" and raw["args"].global_crops_scale == [0.25, 1.0]
    assert raw["epoch"] == 100 and raw["fp16_scaler"]["_growth_tracker"] == 17
    assert argparse.Namespace not in torch.serialization.get_safe_globals()  # scoped to a load
    with pytest.raises(ValueError, match="is not a trex_fast checkpoint"):
        load_checkpoint(str(path))  # loads safely, then is told apart from ours


def test_the_authors_plain_state_dict_loads(tmp_path):
    saved = torchvision.models.resnet18()
    path = tmp_path / "trex_r18.pth"
    torch.save(saved.state_dict(), path)
    state = backbone_state(str(path), "resnet18")
    assert all(torch.equal(state[k], saved.state_dict()[k]) for k in state)
