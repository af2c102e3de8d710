"""Model structure: projector layout, per-resolution BatchNorm, backbone export."""
import torch
import torch.nn as nn
import torchvision

from trex_fast.config import make_config
from trex_fast.models.net import MultiCropNet, Projector, backbone_state_dict, build_model


def test_projector_layout_and_parameter_order():
    proj = Projector(2048, 2048, 256, hidden_layers=3)
    shapes = [tuple(p.shape) for p in proj.parameters()]
    assert shapes == [(2048, 2048), (2048,), (2048,), (2048,)] * 3 + [(256, 2048)]
    kinds = [type(m) for m in proj.mlp]
    assert kinds == [nn.Linear, nn.BatchNorm1d, nn.GELU] * 3 + [nn.Linear]
    assert proj.mlp[-1].bias is None
    assert all(torch.equal(m.bias, torch.zeros_like(m.bias)) for m in proj.mlp
               if isinstance(m, nn.Linear) and m.bias is not None)
    assert 0.015 < proj.mlp[0].weight.std().item() < 0.025  # trunc-normal std 0.02


def test_projector_input_l2_norm():
    proj = Projector(8, 16, 4, hidden_layers=1).eval()
    x = torch.randn(5, 8)
    assert torch.allclose(proj(x), proj(3.0 * x), atol=1e-6)  # scale-invariant input
    proj_raw = Projector(8, 16, 4, hidden_layers=0, input_l2_norm=False)
    assert torch.allclose(proj_raw(x), x @ proj_raw.mlp[0].weight.t())


def test_backbone_runs_once_per_resolution_group():
    torch.manual_seed(0)
    net = build_model(make_config("trex", arch="resnet18", pr_hidden_dim=32), num_classes=5)
    bn = net.backbone.bn1
    g, loc = torch.randn(4, 3, 64, 64), torch.randn(8, 3, 32, 32) + 2.0
    z = net(g, loc)
    assert z.shape == (12, 256)
    assert bn.num_batches_tracked.item() == 2  # two BN passes: one per group
    # the same as two separate backbone passes, BN running statistics included
    torch.manual_seed(0)
    net3 = build_model(make_config("trex", arch="resnet18", pr_hidden_dim=32), num_classes=5)
    f_g, f_l = net3.backbone(g), net3.backbone(loc)
    assert torch.allclose(z, net3.projector(torch.cat([f_g, f_l])), atol=1e-5)
    assert torch.allclose(net3.backbone.bn1.running_mean, bn.running_mean, atol=1e-6)


def test_local_group_may_be_empty():
    net = build_model(make_config("trex", arch="resnet18", pr_hidden_dim=32, local_crops=0),
                      num_classes=5)
    z = net(torch.randn(2, 3, 32, 32), torch.empty(0, 3, 16, 16))
    assert z.shape == (2, 256)


def test_backbone_state_dict_loads_into_bare_torchvision_model_with_only_fc_missing():
    net = build_model(make_config("trex", arch="resnet18", pr_hidden_dim=32), num_classes=5)
    ref = torchvision.models.resnet18(weights=None)
    result = ref.load_state_dict(backbone_state_dict(net), strict=False)
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"]
    assert result.unexpected_keys == []
    assert isinstance(net, MultiCropNet) and net.classifier is None


def test_plain_cosine_classifier_starts_from_nn_linear_default_init_projector_trunc_normal():
    torch.manual_seed(0)
    net = build_model(make_config("plain", arch="resnet18", pr_hidden_dim=64), num_classes=1000)
    weight = net.classifier.weight.detach()  # [1000, 256]
    assert weight.shape == (1000, 256)
    # nn.Linear's default: kaiming-uniform a=sqrt(5), i.e. U(-1/sqrt(256), 1/sqrt(256))
    bound = 1 / 256 ** 0.5
    assert weight.abs().max().item() <= bound
    assert weight.abs().max().item() > 0.99 * bound  # uniform up to the bound, not a normal
    row_norms = weight.norm(dim=1)
    assert abs(row_norms.mean().item() - (1 / 3) ** 0.5) < 0.01  # ~0.577; trunc-normal: 0.32
    reference = nn.Linear(256, 1000, bias=False).weight.detach().norm(dim=1)
    assert abs(row_norms.mean().item() - reference.mean().item()) < 0.01
    assert abs(row_norms.std().item() - reference.std().item()) < 0.01
    # the projector keeps trunc-normal std 0.02: rows of its last Linear [256, 64] have norm
    # ~ 0.02 * sqrt(64) = 0.16 (nn.Linear's default would give 0.58 here too)
    last = net.projector.mlp[-1].weight.detach()
    assert 0.015 < last.std().item() < 0.025
    assert abs(last.norm(dim=1).mean().item() - 0.16) < 0.02
