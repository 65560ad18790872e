"""The shipped digits classifier: test accuracy above the floor (measured here), card consistent, deterministic."""

from __future__ import annotations

import pytest
import torch
from quickstep.train.data import load_dataset
from quickstep.train.eval import classifier as clf

ACCURACY_FLOOR = 0.95


def test_shipped_classifier_accuracy_on_the_test_split():
    test = load_dataset("digits", split="test")
    acc = float((clf.classify(test.x) == test.y).float().mean())
    card = clf.classifier_card()
    assert acc >= ACCURACY_FLOOR
    assert acc == pytest.approx(card["test_accuracy"], abs=1e-3)  # the card states what the weights do
    assert clf.WEIGHTS_PATH.stat().st_size < 1_000_000
    f = clf.features(test.x[:10])
    assert f.shape == (10, clf.FEATURE_DIM) and bool((f >= 0).all())
    assert clf.class_accuracy(test.x, test.y) == pytest.approx(acc)


def test_classifier_rejects_wrong_image_shapes():
    with pytest.raises(ValueError, match=r"\[N, 1, 16, 16\]"):
        clf.features(torch.zeros(2, 3, 32, 32))


def test_training_is_deterministic_and_leaves_global_rng_alone():
    cfg = clf.ClassifierConfig(steps=3, batch_size=16)
    state = torch.random.get_rng_state()
    m1, card1 = clf.train_classifier(cfg, evaluate=False)
    m2, _ = clf.train_classifier(cfg, evaluate=False)
    assert torch.equal(state, torch.random.get_rng_state())
    for (k, a), (_, b) in zip(m1.state_dict().items(), m2.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    assert card1["recipe"]["steps"] == 3
