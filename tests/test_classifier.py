"""The λ_O-vs-λ_U classifier (DESIGN §1.2) on tiny synthetic image sets."""
import numpy as np
import pytest
import torch
from torch import nn

from bench import classifier as C
from bench.classifier import ClassifierConfig, ConceptClassifier, train_classifier


def _noise_images(n: int, channel: int, seed: int, size: int = 32) -> np.ndarray:
    """Dark uint8 noise with one bright channel: red (0) vs blue (2) is an easy concept."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 80, (n, size, size, 3)).astype(np.uint8)
    x[..., channel] = rng.integers(150, 256, (n, size, size))
    return x


RED, BLUE = _noise_images(40, 0, seed=0), _noise_images(40, 2, seed=1)
# Small batches so 2 epochs are 16 SGD steps at the paper's lr; one negative per anchor keeps the
# ResNet passes few (hardest-of-3 is exercised by the detector-trunk test).
SCRATCH = ClassifierConfig(backbone="resnet18_scratch", epochs=2, batch_size=8, negatives=1, seed=0)


@pytest.fixture(scope="module")
def scratch_clf() -> ConceptClassifier:
    return train_classifier(RED, BLUE, SCRATCH, device="cpu")


def test_separates_easy_concepts(scratch_clf):
    assert scratch_clf.val_accuracy >= 0.9
    assert [h["epoch"] for h in scratch_clf.history] == [1, 2]
    assert set(scratch_clf.history[0]) == {"epoch", "loss", "triplet", "ce", "val_accuracy"}
    p_o, p_u = scratch_clf.prob_original(RED), scratch_clf.prob_original(BLUE)
    assert p_o.shape == (40,) and p_o.mean() > 0.8 and p_u.mean() < 0.2
    assert scratch_clf.features(RED[:3]).shape == (3, 512)


def test_save_load_round_trip(scratch_clf, tmp_path):
    scratch_clf.save(tmp_path / "g")
    loaded = ConceptClassifier.load(tmp_path / "g", device="cpu")
    assert loaded.cfg == SCRATCH and loaded.history == scratch_clf.history
    np.testing.assert_array_equal(loaded.prob_original(BLUE[:8]), scratch_clf.prob_original(BLUE[:8]))
    np.testing.assert_array_equal(loaded.features(RED[:4]), scratch_clf.features(RED[:4]))


def test_training_is_deterministic():
    cfg = ClassifierConfig(backbone="resnet18_scratch", epochs=1, batch_size=8, negatives=1, seed=3)
    a = train_classifier(RED[:10], BLUE[:10], cfg, device="cpu")
    b = train_classifier(RED[:10], BLUE[:10], cfg, device="cpu")
    np.testing.assert_array_equal(a.prob_original(RED[:6]), b.prob_original(RED[:6]))
    assert a.history == b.history


def test_too_few_images_names_eval_n():
    assert C.min_images_per_class(ClassifierConfig()) == 10  # 2 val + 8 train ≥ 3 negatives + 2
    with pytest.raises(ValueError, match=r"`eval.n` = 9 .*at least 10"):
        train_classifier(RED[:9], BLUE[:12], ClassifierConfig(), device="cpu")


def test_rejects_bad_config_and_images():
    with pytest.raises(ValueError, match="eval.classifier.backbone"):
        train_classifier(RED, BLUE, ClassifierConfig(backbone="vgg"))
    with pytest.raises(ValueError, match="uint8"):
        train_classifier(RED.astype(np.float32), BLUE, SCRATCH)


class _TinyDetector(nn.Module):
    """Stands in for bench.world.detector.Detector: ``.trunk`` ending in Flatten + ``.preprocess``."""

    def __init__(self):
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()
        )
        self.feature_dim = 8

    @staticmethod
    def preprocess(images):
        return (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0 - 0.5) / 0.25


def test_detector_trunk_backbone(tmp_path):
    det = _TinyDetector()
    before = {k: v.clone() for k, v in det.state_dict().items()}
    cfg = ClassifierConfig(backbone="detector_trunk", epochs=3, batch_size=8, lr=1e-2)
    clf = train_classifier(RED, BLUE, cfg, init_trunk=det, device="cpu")
    assert clf.val_accuracy >= 0.9 and clf.feature_dim == 8
    for k, v in det.state_dict().items():  # the detector itself is left untouched (deep copy)
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    clf.save(tmp_path / "d")
    with pytest.raises(ValueError, match="detector"):
        ConceptClassifier.load(tmp_path / "d")
    loaded = ConceptClassifier.load(tmp_path / "d", init_trunk=det, device="cpu")
    np.testing.assert_array_equal(loaded.prob_original(RED[:5]), clf.prob_original(RED[:5]))
    with pytest.raises(ValueError, match="init_trunk"):
        train_classifier(RED, BLUE, cfg)


def test_imagenet_weights_unavailable_is_one_clear_error(monkeypatch):
    def offline(weights=None):
        raise OSError("no network")

    monkeypatch.setattr(C.torchvision.models, "resnet18", offline)
    with pytest.raises(RuntimeError, match="eval.classifier.backbone"):
        train_classifier(RED[:10], BLUE[:10], ClassifierConfig(), device="cpu")


def test_imagenet_preprocess_sizes():
    assert C.imagenet_preprocess(RED[:2]).shape == (2, 3, 64, 64)  # tiny → 64
    big = np.zeros((1, 512, 384, 3), np.uint8)
    assert C.imagenet_preprocess(big).shape == (1, 3, 341, 256)  # Resize(256): short side 256
    mid = np.zeros((1, 100, 100, 3), np.uint8)
    assert C.imagenet_preprocess(mid).shape == (1, 3, 100, 100)
