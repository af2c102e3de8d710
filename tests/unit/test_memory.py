"""MemoryBank against a brute-force reference, and the EMA update."""
import torch
import torch.nn as nn
import torch.nn.functional as F

from trex_fast.memory import MemoryBank, ema_update, make_ema


def brute_force_enqueue(features, labels, ptr, new_features, new_labels):
    """The FIFO of RECIPE.md written as a plain loop."""
    features, labels = features.clone(), labels.clone()
    size, n = features.shape[0], new_features.shape[0]
    for i in range(n):
        if ptr + i < size:  # the part past the end is dropped, not wrapped
            features[ptr + i] = new_features[i]
            labels[ptr + i] = new_labels[i]
    ptr = 0 if ptr + n >= size else ptr + n
    return features, labels, ptr


def brute_force_prototypes(features, labels, num_classes):
    protos = torch.zeros(num_classes, features.shape[1])
    for c in range(num_classes):
        members = features[labels == c]
        if len(members):
            s = members.sum(0)  # the sum of RAW vectors, normalised once
            protos[c] = s / s.norm()
    return protos


def test_initial_state_is_normal_features_random_labels_pointer_zero():
    bank = MemoryBank(4096, 16, 10, generator=torch.Generator().manual_seed(0))
    assert bank.ptr.item() == 0
    assert abs(bank.features.mean().item()) < 0.05 and abs(bank.features.std().item() - 1) < 0.05
    counts = torch.bincount(bank.labels, minlength=10)
    assert counts.min() > 300 and counts.max() < 520  # uniform over 10 classes


def test_enqueue_matches_brute_force_with_overflow_and_wrap():
    torch.manual_seed(0)
    bank = MemoryBank(10, 4, 5)
    ref_f, ref_l, ref_ptr = bank.features.clone(), bank.labels.clone(), 0
    for n in (3, 3, 3, 3, 4, 2, 5, 10, 1):  # 9 + 3 passes the end: one dropped, ptr back to 0
        new_f, new_l = torch.randn(n, 4), torch.randint(0, 5, (n,))
        bank.enqueue(new_f, new_l)
        ref_f, ref_l, ref_ptr = brute_force_enqueue(ref_f, ref_l, ref_ptr, new_f, new_l)
        assert torch.equal(bank.features, ref_f)
        assert torch.equal(bank.labels, ref_l)
        assert bank.ptr.item() == ref_ptr


def test_exact_fill_returns_pointer_to_zero():
    bank = MemoryBank(8, 2, 3)
    bank.enqueue(torch.ones(4, 2), torch.zeros(4, dtype=torch.long))
    assert bank.ptr.item() == 4
    bank.enqueue(torch.ones(4, 2), torch.zeros(4, dtype=torch.long))
    assert bank.ptr.item() == 0


def test_prototypes_are_normalised_sums_of_raw_vectors_and_zero_when_absent():
    bank = MemoryBank(6, 2, 4)
    feats = torch.tensor([[10.0, 0.0], [0.0, 1.0], [1.0, 1.0], [2.0, 0.0], [0.0, 3.0],
                          [-1.0, 0.5]])
    labels = torch.tensor([0, 0, 1, 1, 1, 3])  # class 2 absent
    bank.enqueue(feats, labels)
    protos = bank.class_prototypes()
    assert torch.allclose(protos, brute_force_prototypes(feats, labels, 4), atol=1e-6)
    assert torch.equal(protos[2], torch.zeros(2))
    # the sum of raw vectors differs from the sum of normalised ones: [10,1] vs [1,1] direction
    assert torch.allclose(protos[0], F.normalize(torch.tensor([10.0, 1.0]), dim=0))


def test_enqueue_does_not_modify_its_inputs():
    bank = MemoryBank(8, 3, 4)
    f, labels = torch.randn(5, 3), torch.randint(0, 4, (5,))
    f0, l0 = f.clone(), labels.clone()
    bank.enqueue(f, labels)
    assert torch.equal(f, f0) and torch.equal(labels, l0)


def test_ema_update_parameters_only():
    torch.manual_seed(0)
    online = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    ema = make_ema(online)
    assert all(not p.requires_grad for p in ema.parameters()) and ema.training
    with torch.no_grad():
        for p in online.parameters():
            p.add_(1.0)
        online[1].running_mean.fill_(5.0)
    before = [p.clone() for p in ema.parameters()]
    ema_update(ema, online, momentum=0.9)
    for b, e, o in zip(before, ema.parameters(), online.parameters()):
        assert torch.allclose(e, 0.9 * b + 0.1 * o, atol=1e-6)
    assert torch.equal(ema[1].running_mean, torch.zeros(4))  # buffers untouched
