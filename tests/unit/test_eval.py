"""Evaluation without a trained run: released checkpoints' prefixed and nested keys, and k-NN
against a brute-force vote and scikit-learn."""

import pytest
import torch
import torchvision

from trex_fast.eval.knn import knn_top1
from trex_fast.models.weights import backbone_state


@pytest.mark.parametrize("prefix, container", [
    ("module.", None), ("model.", "model"), ("module.encoder.", "state_dict"), ("", None)])
def test_prefixed_and_nested_keys_load(tmp_path, prefix, container):
    reference = torchvision.models.resnet18()
    weights = {prefix + k: v for k, v in reference.state_dict().items()}
    path = tmp_path / "released.pth"
    torch.save({container: weights, "epoch": 3} if container else weights, path)
    state = backbone_state(str(path), "resnet18")
    assert all(torch.equal(state[k], v) for k, v in reference.state_dict().items()
               if not k.startswith("fc."))


def test_knn_matches_a_brute_force_vote():
    g = torch.Generator().manual_seed(0)
    train, train_y = torch.randn(200, 16, generator=g), torch.randint(0, 5, (200,), generator=g)
    test, test_y = torch.randn(50, 16, generator=g), torch.randint(0, 5, (50,), generator=g)
    got = knn_top1(train, train_y, test, test_y, k=7, temperature=0.1, chunk=13)
    hits = 0
    tn = train / train.norm(dim=1, keepdim=True)
    for q, y in zip(test, test_y):
        sims = tn @ (q / q.norm())
        order = sims.argsort(descending=True)[:7]
        votes = [0.0] * 5
        for i in order.tolist():
            votes[int(train_y[i])] += float(torch.exp(sims[i] / 0.1))
        hits += int(max(range(5), key=lambda c: votes[c]) == int(y))
    assert got == pytest.approx(100.0 * hits / 50)
    # a separable case reaches 100 %
    assert knn_top1(torch.eye(4).repeat(3, 1), torch.arange(4).repeat(3), torch.eye(4),
                    torch.arange(4), k=3) == 100.0


def test_knn_matches_scikit_learn_weighted_neighbours():
    neighbors = pytest.importorskip("sklearn.neighbors")
    import numpy as np

    g = torch.Generator().manual_seed(1)
    train, train_y = torch.randn(300, 8, generator=g), torch.randint(0, 6, (300,), generator=g)
    test, test_y = torch.randn(80, 8, generator=g), torch.randint(0, 6, (80,), generator=g)
    ref = neighbors.KNeighborsClassifier(
        n_neighbors=20, metric="cosine", algorithm="brute",
        weights=lambda dist: np.exp((1.0 - dist) / 0.07)).fit(train.double().numpy(),
                                                            train_y.numpy())
    expected = 100.0 * (ref.predict(test.double().numpy()) == test_y.numpy()).mean()
    assert knn_top1(train, train_y, test, test_y, k=20, temperature=0.07) == pytest.approx(
        expected)
