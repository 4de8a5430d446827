"""The FID feature classifier: trained as a LightningModule on an ilvae datamodule (held-out
accuracy far above chance, deterministic under a seed), its file format (files of the former
trainer load, new files load by the former recipe), and the `ilvae fid-classifier` command."""

import pytest
import torch
from lightning.pytorch import Trainer

from ilvae import cli, fid
from ilvae.datamodules import Digits
from ilvae.errors import ConfigurationError
from ilvae.fid_classifier import FeatureClassifier, FeatureClassifierModule


def _fit(datamodule, seed, **trainer_args):
    torch.manual_seed(seed)
    module = FeatureClassifierModule(datamodule.data_shape, datamodule.num_classes,
                                     feature_dim=32, width=16)
    trainer = Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, accelerator="cpu", devices=1, **trainer_args)
    trainer.fit(module, datamodule=datamodule)
    return module, trainer


def test_lightning_training_on_digits_is_far_above_chance_on_held_out_images():
    datamodule = Digits(batch_size=32, seed=0)
    module, trainer = _fit(datamodule, seed=0, max_epochs=3)
    classifier = module.classifier.eval()
    # Brute-force count of correct arg-max labels on images the classifier never saw; chance
    # is 0.1, and 3 epochs measured 0.84 (test) and 0.92 (validation).
    x_test, y_test = datamodule.tensors("test")
    with torch.no_grad():
        predicted = classifier(fid.to_uint8(x_test).float() / 255).argmax(1)
    test_accuracy = (predicted == y_test).double().mean().item()
    assert test_accuracy >= 0.6
    # The logged torchmetrics accuracy is the same count on the validation split.
    x_val, y_val = datamodule.tensors("val")
    with torch.no_grad():
        val_correct = (classifier(fid.to_uint8(x_val).float() / 255).argmax(1) == y_val)
    assert float(trainer.callback_metrics["val/accuracy"]) == pytest.approx(
        val_correct.double().mean().item(), abs=1e-6)


def test_lightning_training_is_deterministic_under_a_seed():
    runs = [_fit(Digits(batch_size=32, seed=0), seed=seed, max_epochs=1,
                 limit_train_batches=5, limit_val_batches=0)[0] for seed in (3, 3, 4)]
    same = [torch.equal(a, b) for a, b in zip(runs[0].parameters(), runs[1].parameters(),
                                              strict=True)]
    assert all(same)
    assert not torch.equal(next(runs[0].parameters()), next(runs[2].parameters()))


def test_unlabelled_data_are_refused_before_training():
    with pytest.raises(ConfigurationError, match="num_classes"):
        FeatureClassifierModule((1, 8, 8), None)


# ------------------------------------------------------------------------------ file format
def _former_payload(classifier):
    """The file the former ``save_feature_classifier`` wrote, built here field by field."""
    return {"format": "ilvae.fid.FeatureClassifier", "version": 1,
            "input_shape": [1, 8, 8], "num_classes": 10, "feature_dim": 6, "width": 3,
            "metadata": {"data": "Digits", "train_accuracy": 0.5},
            "state_dict": {k: v.clone() for k, v in classifier.state_dict().items()}}


def test_former_files_load_and_new_files_load_by_the_former_recipe(tmp_path):
    torch.manual_seed(0)
    reference = FeatureClassifier((1, 8, 8), 10, feature_dim=6, width=3).eval()
    images = torch.rand(5, 1, 8, 8)
    with torch.no_grad():
        expected = reference.features(images)

    former = tmp_path / "former.pt"
    torch.save(_former_payload(reference), former)
    loaded = fid.load_feature_classifier(former)
    assert loaded.metadata == {"data": "Digits", "train_accuracy": 0.5}
    with torch.no_grad():
        assert torch.equal(loaded.features(images), expected)

    new = tmp_path / "new.pt"
    fid.save_feature_classifier(loaded, new)
    payload = torch.load(new, weights_only=True)
    assert {k: v for k, v in payload.items() if k != "state_dict"} == {
        k: v for k, v in _former_payload(reference).items() if k != "state_dict"}
    rebuilt = FeatureClassifier(payload["input_shape"], payload["num_classes"],
                                payload["feature_dim"], payload["width"])
    rebuilt.load_state_dict(payload["state_dict"])
    with torch.no_grad():
        assert torch.equal(rebuilt.eval().features(images), expected)


# ---------------------------------------------------------------------------------- command
def _command(out, *extra):
    return cli.main(["fid-classifier", "--data", "Digits", "--data.val_fraction", "0.2",
                     "--out", str(out), "--trainer.max_epochs", "1",
                     "--trainer.limit_train_batches", "4", "--trainer.enable_progress_bar",
                     "false", "--model.width", "4", "--model.feature_dim", "8", *extra])


def test_command_trains_and_writes_a_loadable_classifier(tmp_path, capsys):
    out = tmp_path / "nested" / "clf.pt"
    assert _command(out) == 0
    classifier = fid.load_feature_classifier(out)
    assert classifier.input_shape == (1, 8, 8) and classifier.feature_dim == 8
    assert classifier.width == 4 and classifier.num_classes == 10
    assert classifier.metadata["data"] == "Digits"
    assert str(out) in capsys.readouterr().out
    # The stored accuracy is the classifier's own on the validation split (20 % of the pool).
    x_val, y_val = Digits(val_fraction=0.2).tensors("val")
    assert classifier.metadata["val_accuracy"] == pytest.approx(
        fid.classifier_accuracy(classifier, x_val, y_val), abs=1e-12)
    # Same arguments (seed_everything defaults to 0): the same weights.
    again = tmp_path / "again.pt"
    assert _command(again) == 0
    for name, tensor in fid.load_feature_classifier(again).state_dict().items():
        assert torch.equal(tensor, classifier.state_dict()[name]), name


def test_command_refuses_an_existing_file_and_unknown_data(tmp_path, capsys):
    out = tmp_path / "clf.pt"
    out.write_bytes(b"the user's file")
    assert _command(out) == 2
    assert out.read_bytes() == b"the user's file"
    assert "out=" in capsys.readouterr().err
    assert cli.main(["fid-classifier", "--data", "NoSuchData", "--out",
                     str(tmp_path / "x.pt")]) == 2
    error = capsys.readouterr().err
    assert "Digits" in error and len(error.strip().splitlines()) <= 2


def test_former_command_points_to_the_new_one(tmp_path, capsys):
    assert fid.main(["train", "--data", "Digits", "--out", str(tmp_path / "x.pt")]) == 2
    printed = capsys.readouterr()
    assert printed.out == "" and "ilvae fid-classifier" in printed.err
    assert len(printed.err.strip().splitlines()) == 1
    assert not (tmp_path / "x.pt").exists()
