"""FID: ~0 for identical sets, the closed-form Fréchet distance for Gaussian features,
compute_fid (torchmetrics) equal to torch-fidelity and to numpy/scipy on the classifier's
features, the offline classifier (training, saving, plug-in extractor) and the Inception weights
path, all offline."""

import urllib.error

import numpy as np
import pytest
import scipy.linalg
import torch
import torch_fidelity
from torch.utils.data import Dataset
from torch_fidelity import feature_extractor_inceptionv3 as inception_module
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

from ilvae import fid
from ilvae.datamodules.images import Digits
from ilvae.errors import ConfigurationError

IDENTITY = "test-identity-features"


class _IdentityFeatures(FeatureExtractorBase):
    """Features = the flattened input (uint8 images read as x / 255), in float64."""

    def __init__(self, name, features_list, **kwargs):
        super().__init__(name, features_list)

    @staticmethod
    def get_provided_features_list():
        return ("x",)

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return "x"

    @staticmethod
    def can_be_compiled():
        return False

    def forward(self, x):
        x = x.double() / 255.0 if x.dtype == torch.uint8 else x.double()
        return (x.flatten(1),)


if IDENTITY not in FEATURE_EXTRACTORS_REGISTRY:
    torch_fidelity.register_feature_extractor(IDENTITY, _IdentityFeatures)


class _Rows(Dataset):
    def __init__(self, rows):
        self.rows = torch.as_tensor(rows)

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def _frechet(mu1, sigma1, mu2, sigma2):
    """‖μ1 − μ2‖² + tr(Σ1 + Σ2 − 2 (Σ1 Σ2)^{1/2}).

    tr (Σ1 Σ2)^{1/2} = tr (Σ1^{1/2} Σ2 Σ1^{1/2})^{1/2}: a symmetric PSD square root (scipy's
    eigh), so covariances made singular by inactive features are handled exactly.
    """
    w, v = scipy.linalg.eigh(sigma1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    tr_covmean = np.sqrt(np.clip(scipy.linalg.eigvalsh(root1 @ sigma2 @ root1), 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def _empirical_frechet(f1, f2):
    f1, f2 = np.asarray(f1, np.float64), np.asarray(f2, np.float64)
    return _frechet(f1.mean(0), np.cov(f1, rowvar=False), f2.mean(0), np.cov(f2, rowvar=False))


@pytest.fixture(scope="module")
def digits():
    dm = Digits(seed=0)
    return {split: dm.tensors(split) for split in ("train", "val", "test")}


@pytest.fixture(scope="module")
def classifier_path(digits, tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    path = tmp_path_factory.mktemp("fid") / "digits_classifier.pt"
    (x, y), (xv, yv) = digits["train"], digits["val"]
    fid.train_feature_classifier(x, y, num_classes=10, x_val=xv, y_val=yv, width=16,
                                 feature_dim=32, epochs=6, path=path, metadata={"data": "Digits"})
    torch.set_num_threads(threads)
    return path


# --------------------------------------------------------------------- torch-fidelity maths
def test_torch_fidelity_fid_of_gaussian_features_matches_closed_form():
    rng = np.random.default_rng(0)
    n = 20000
    mu1, mu2 = np.zeros(3), np.array([1.0, -0.5, 0.25])
    a = np.array([[1.0, 0.3, 0.0], [0.0, 0.6, 0.2], [0.1, 0.0, 0.8]])
    sigma1, sigma2 = a @ a.T, np.diag([0.6, 1.2, 0.4])
    f1 = rng.multivariate_normal(mu1, sigma1, size=n)
    f2 = rng.multivariate_normal(mu2, sigma2, size=n)
    value = torch_fidelity.calculate_metrics(
        input1=_Rows(f1), input2=_Rows(f2), fid=True, feature_extractor=IDENTITY, cuda=False,
        cache=False, save_cpu_ram=True, verbose=False, batch_size=4096,
    )[torch_fidelity.KEY_METRIC_FID]
    # Same samples: torch-fidelity (eigenvalues of Σ1Σ2) equals scipy's sqrtm closed form.
    assert value == pytest.approx(_empirical_frechet(f1, f2), rel=1e-9)
    # Population value: the estimate's standard error is about 0.035 at n = 20000.
    population = _frechet(mu1, sigma1, mu2, sigma2)
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2).real
    assert population == pytest.approx(
        float(((mu1 - mu2) ** 2).sum() + np.trace(sigma1 + sigma2 - 2 * covmean)), rel=1e-10)
    assert population > 1.0
    assert value == pytest.approx(population, abs=0.15)


def test_compute_fid_passes_uint8_images_and_matches_closed_form():
    torch.manual_seed(0)
    shift = torch.tensor([0.0, 0.04, -0.02, 0.03])
    x1 = 0.5 + 0.05 * torch.randn(20000, 1, 2, 2)
    x2 = 0.5 + shift.view(1, 1, 2, 2) + 0.08 * torch.randn(20000, 1, 2, 2)
    value = fid.compute_fid(x1, x2, feature_extractor=IDENTITY, device="cpu", batch_size=5000)
    features = [fid.to_uint8(x).flatten(1).double().numpy() / 255 for x in (x1, x2)]
    assert value == pytest.approx(_empirical_frechet(*features), rel=1e-9)
    # Population: ‖shift‖² + 4 (σ1 − σ2)²; standard error about 2 % at n = 20000.
    population = float((shift ** 2).sum()) + 4 * (0.05 - 0.08) ** 2
    assert value == pytest.approx(population, rel=0.1)


def test_to_uint8_rounds_clamps_and_rejects_nan():
    x = torch.tensor([-0.2, 0.0, 0.5, 1.0, 1.7, 0.1]).view(1, 1, 2, 3)
    assert fid.to_uint8(x).flatten().tolist() == [0, 0, 128, 255, 255, 26]
    assert fid.to_uint8(torch.zeros(2, 3, 3)).shape == (2, 1, 3, 3)
    with pytest.raises(ValueError, match="NaN"):
        fid.to_uint8(torch.full((2, 1, 2, 2), float("nan")))


# --------------------------------------------------------------------------- classifier
def test_classifier_trains_on_digits_and_reloads_identically(digits, classifier_path):
    x_test, y_test = digits["test"]
    classifier = fid.load_feature_classifier(classifier_path)
    assert classifier.metadata["val_accuracy"] >= 0.85
    assert fid.classifier_accuracy(classifier, x_test, y_test) >= 0.85

    payload = torch.load(classifier_path, weights_only=True)
    assert payload["input_shape"] == [1, 8, 8] and payload["num_classes"] == 10
    assert payload["feature_dim"] == 32 and payload["metadata"]["data"] == "Digits"
    assert payload["state_dict"].keys() == classifier.state_dict().keys()
    for name, tensor in payload["state_dict"].items():
        assert torch.equal(tensor, classifier.state_dict()[name])

    # Saving the reloaded classifier again and reloading gives the same outputs bit for bit.
    copy = classifier_path.with_name("copy.pt")
    fid.save_feature_classifier(classifier, copy)
    again = fid.load_feature_classifier(copy)
    assert again.metadata == classifier.metadata
    with torch.no_grad():
        assert torch.equal(again.features(x_test), classifier.features(x_test))
        assert torch.equal(again(x_test), classifier(x_test))


def test_training_is_deterministic_in_seed_and_keeps_global_rng(digits):
    x, y = digits["train"][0][:200], digits["train"][1][:200]
    state = torch.get_rng_state()
    a = fid.train_feature_classifier(x, y, width=4, feature_dim=8, epochs=1, seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    b = fid.train_feature_classifier(x, y, width=4, feature_dim=8, epochs=1, seed=3)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)


def test_classifier_rejects_unlabelled_data_and_foreign_files(tmp_path):
    with pytest.raises(ConfigurationError, match="labelled"):
        fid.train_feature_classifier(torch.rand(10, 1, 8, 8), torch.full((10,), -1))
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, other)
    with pytest.raises(ConfigurationError, match=r"^weights_path='.*other\.pt' is not allowed: "
                                                 "expected an ilvae feature classifier file"):
        fid.load_feature_classifier(other)
    with pytest.raises(ConfigurationError, match=r"^weights_path='.*missing\.pt' is not allowed: "
                                                 "expected an existing classifier file"):
        fid.load_feature_classifier(tmp_path / "missing.pt")


# ------------------------------------------------------------------ plug-in feature extractor
def test_identical_sets_give_zero_fid_with_plugin_classifier(digits, classifier_path):
    x = digits["val"][0]
    assert fid.compute_fid(x, x.clone(), weights_path=classifier_path, device="cpu") == (
        pytest.approx(0.0, abs=1e-6))


def test_plugin_classifier_fid_matches_features_closed_form(digits, classifier_path):
    real, other = digits["val"][0], digits["test"][0]
    noise = torch.rand_like(other)
    classifier = fid.load_feature_classifier(classifier_path)
    with torch.no_grad():
        feats = [classifier.features(fid.to_uint8(x).float() / 255).double().numpy()
                 for x in (real, other, noise)]
    same_data = fid.compute_fid(real, other, feature_extractor=fid.CLASSIFIER_EXTRACTOR,
                                weights_path=classifier_path, device="cpu")
    vs_noise = fid.compute_fid(real, noise, weights_path=classifier_path, device="cpu")
    assert same_data == pytest.approx(_empirical_frechet(feats[0], feats[1]), rel=1e-4)
    assert vs_noise == pytest.approx(_empirical_frechet(feats[0], feats[2]), rel=1e-4)
    assert 0 < same_data < vs_noise / 5


def test_compute_fid_equals_torch_fidelity_and_scipy_sqrtm_on_classifier_features(
        digits, classifier_path):
    real, other = digits["train"][0][:400], digits["test"][0]
    value = fid.compute_fid(real, other, weights_path=classifier_path, device="cpu",
                            batch_size=96)
    # torch-fidelity on the same images and the same (registered) feature network.
    by_fidelity = torch_fidelity.calculate_metrics(
        input1=_Rows(fid.to_uint8(real)), input2=_Rows(fid.to_uint8(other)), fid=True,
        feature_extractor=fid.CLASSIFIER_EXTRACTOR,
        feature_extractor_weights_path=str(classifier_path), cuda=False, cache=False,
        save_cpu_ram=True, verbose=False, batch_size=128)[torch_fidelity.KEY_METRIC_FID]
    # Closed form with numpy statistics and scipy's sqrtm of Σ1Σ2.
    classifier = fid.load_feature_classifier(classifier_path)
    with torch.no_grad():
        f1, f2 = (classifier.features(fid.to_uint8(x).float() / 255).double().numpy()
                  for x in (real, other))
    # Features that are 0 on every image (dead ReLUs) add 0 to every term; dropping them keeps
    # Σ1Σ2 non-singular for sqrtm.
    alive = (f1 != 0).any(0) | (f2 != 0).any(0)
    assert 0 < alive.sum() < 32
    f1, f2 = f1[:, alive], f2[:, alive]
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    closed = float(((f1.mean(0) - f2.mean(0)) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))
    assert closed > 0.1
    assert value == pytest.approx(closed, rel=1e-6)
    assert by_fidelity == pytest.approx(closed, rel=1e-6)
    assert value == pytest.approx(by_fidelity, rel=1e-6)


def test_plugin_extractor_converts_channels_and_size(digits, classifier_path):
    extractor = fid.ClassifierFeatureExtractor(fid.CLASSIFIER_EXTRACTOR, ["features", "logits"],
                                               feature_extractor_weights_path=classifier_path)
    grey = fid.to_uint8(digits["val"][0][:16])
    features, logits = extractor(grey)
    assert features.dtype == torch.float64 and features.shape == (16, 32)
    assert logits.shape == (16, 10)
    rgb_features, _ = extractor(grey.expand(-1, 3, -1, -1))
    torch.testing.assert_close(rgb_features, features, rtol=1e-5, atol=1e-6)
    big = grey.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    assert extractor(big)[0].shape == (16, 32)
    with pytest.raises(ValueError, match="uint8"):
        extractor(grey.float())


def test_plugin_classifier_needs_a_weights_path(digits):
    x = digits["val"][0]
    with pytest.raises(ConfigurationError, match=r"^weights_path=None is not allowed: expected a "
                                                 "classifier file"):
        fid.compute_fid(x, x)
    with pytest.raises(ConfigurationError, match=r"^feature_extractor='no-such-network' is not "
                                                 "allowed: expected one of the extractors "
                                                 "registered with torch-fidelity"):
        fid.compute_fid(x, x, feature_extractor="no-such-network")


# ------------------------------------------------------------------------------ Inception
def test_inception_without_weights_offline_fails_with_clear_message(monkeypatch):
    def no_network(url, *args, **kwargs):
        raise urllib.error.URLError("network unreachable")

    monkeypatch.setattr(inception_module, "load_state_dict_from_url", no_network)
    x = torch.rand(4, 1, 8, 8)
    with pytest.raises(ConfigurationError) as error:
        fid.compute_fid(x, x, feature_extractor=fid.INCEPTION_EXTRACTOR, device="cpu")
    message = str(error.value)
    assert "weights_path" in message and fid.CLASSIFIER_EXTRACTOR in message
    assert "network unreachable" in message


def test_inception_reads_the_given_weights_path_and_never_downloads(monkeypatch, tmp_path):
    def download(*args, **kwargs):
        raise AssertionError("must not download when weights_path is given")

    loaded = []
    real_load = torch.load

    def spy_load(path, *args, **kwargs):
        loaded.append(str(path))
        return real_load(path, *args, **kwargs)

    monkeypatch.setattr(inception_module, "load_state_dict_from_url", download)
    monkeypatch.setattr(torch, "load", spy_load)
    weights = tmp_path / "inception.pth"
    torch.save({"not_inception": torch.zeros(1)}, weights)
    x = torch.rand(4, 1, 8, 8)
    # The file is read and rejected by load_state_dict: proof torch-fidelity got this path.
    with pytest.raises(RuntimeError, match="state_dict"):
        fid.compute_fid(x, x, feature_extractor=fid.INCEPTION_EXTRACTOR, weights_path=weights,
                        device="cpu")
    assert loaded == [str(weights)]
    with pytest.raises(ConfigurationError, match=r"^weights_path='.*missing\.pth' is not "
                                                 "allowed: expected an existing file"):
        fid.compute_fid(x, x, feature_extractor=fid.INCEPTION_EXTRACTOR,
                        weights_path=tmp_path / "missing.pth")
