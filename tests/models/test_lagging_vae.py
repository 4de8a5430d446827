"""Aggressive training (He et al. 2019): the inner-loop and mutual-information stopping rules,
the encoder/decoder step counts in both phases, and the phase surviving a checkpoint."""

import math

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from ilvae.decoders.mlp import MLPDecoder
from ilvae.encoders import MLPEncoder
from ilvae.errors import ConfigurationError
from ilvae.metrics import MutualInformation
from ilvae.models import LaggingVAE
from ilvae.models.lagging_vae import InnerLoopStop, mutual_information_stopped

X = torch.rand(64, 1, 4, 4, generator=torch.Generator().manual_seed(0))


def _stops_at(losses, window, max_steps):
    rule = InnerLoopStop(window, max_steps)
    for i, loss in enumerate(losses, 1):
        if rule.update(loss):
            return i
    return None


def _brute_force_stop(losses, window, max_steps):
    """The rule written out: window means, stop at the first window not below the one
    before, or at the cap."""
    previous = math.inf
    for end in range(1, len(losses) + 1):
        if end == max_steps:
            return end
        if end % window == 0:
            mean = sum(losses[end - window:end]) / window
            if mean >= previous:
                return end
            previous = mean
    return None


@pytest.mark.parametrize("losses,window,max_steps,expected", [
    ([10.0 - i for i in range(30)], 3, 12, 12),            # always improving: the cap
    ([5.0] * 30, 3, 100, 6),                               # flat: second window
    ([9, 8, 7, 6, 5, 4, 5, 6, 7, 8] * 3, 2, 100, 8),       # means 8.5, 6.5, 4.5, 5.5
    ([3.0, 1.0, 2.0, 2.0] + [0.0] * 20, 2, 100, 4),        # 2.0 then 2.0: not below
])
def test_inner_loop_stops_when_the_window_mean_stops_improving(losses, window, max_steps,
                                                               expected):
    assert _stops_at(losses, window, max_steps) == expected
    assert _brute_force_stop(losses, window, max_steps) == expected


def test_inner_loop_reads_tensors_as_floats():
    assert _stops_at([torch.tensor(5.0)] * 10, 2, 100) == 4


def test_inner_loop_decides_on_the_reduced_window_loss():
    # What every process would see after the mean over processes: a flat loss, although this
    # process's own losses keep falling.
    rule = InnerLoopStop(2, 100, reduce=lambda total: torch.tensor(6.0))
    stops = [rule.update(torch.tensor(10.0 - i)) for i in range(4)]
    assert stops == [False, False, False, True]


def test_mutual_information_rule_on_a_sequence():
    model = _model()
    flags = [model.record_mutual_information(mi) for mi in (0.5, 1.0, 1.2, 1.2, 1.5, 2.0)]
    assert flags == [True, True, True, False, False, False]  # 1.2 is no increase; no return
    assert model.last_mutual_info == 2.0
    assert not mutual_information_stopped(None, -1.0)
    assert mutual_information_stopped(1.0, 0.9) and not mutual_information_stopped(1.0, 1.1)


def _model(**kw):
    torch.manual_seed(0)
    return LaggingVAE(data_shape=(1, 4, 4), latent_dim=2,
                      encoder=lambda s, m: MLPEncoder(s, m, hidden=[8]),
                      decoder=lambda m, d: MLPDecoder(m, d, hidden=[8]), **kw)


class _Steps(L.Callback):
    """Records every optimiser step (``E`` encoder, ``D`` decoder) and every backward loss."""

    def __init__(self):
        self.steps, self.losses, self.start = [], [], None

    def on_train_start(self, trainer, pl_module):
        self.start = (pl_module.aggressive, pl_module.last_mutual_info)
        encoder_opt, decoder_opt = trainer.optimizers
        encoder_opt.register_step_post_hook(lambda *_: self.steps.append("E"))
        decoder_opt.register_step_post_hook(lambda *_: self.steps.append("D"))

    def on_before_backward(self, trainer, pl_module, loss):
        self.losses.append(float(loss.detach()))

    def encoder_steps_per_decoder_step(self):
        return [len(run) for run in "".join(self.steps).split("D")[:-1]]


def _fit(model, root, epochs=1, ckpt_path=None, batches=3):
    steps = _Steps()
    trainer = L.Trainer(max_epochs=epochs, default_root_dir=root, logger=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[steps], limit_train_batches=batches)
    trainer.fit(model, DataLoader(TensorDataset(X), batch_size=8, shuffle=True),
                DataLoader(TensorDataset(X[:16]), batch_size=8), ckpt_path=ckpt_path)
    return trainer, steps


def test_aggressive_phase_runs_the_inner_loop_until_the_loss_plateaus(tmp_path):
    model = _model(max_inner_steps=7, inner_window=2)
    _, steps = _fit(model, tmp_path)
    counts = steps.encoder_steps_per_decoder_step()
    assert len(counts) == 3 and all(1 < c <= 7 for c in counts)
    # Replay the rule on the losses of the encoder steps (each decoder step's loss follows).
    losses = iter(steps.losses)
    for count in counts:
        inner = [next(losses) for _ in range(count)]
        next(losses)
        assert _brute_force_stop(inner, 2, 7) == count


def test_normal_phase_alternates_one_encoder_and_one_decoder_step(tmp_path):
    model = _model()
    model.aggressive = False
    _, steps = _fit(model, tmp_path)
    assert "".join(steps.steps) == "ED" * 3


def test_the_switch_reads_the_mutual_information_of_the_validation_set(tmp_path):
    model = _model()
    _fit(model, tmp_path)
    metric = MutualInformation()
    with torch.no_grad():
        metric.update(model.encode(X[:16]))
    assert model.last_mutual_info == pytest.approx(float(metric.compute()), rel=1e-6)
    assert model.aggressive  # the first measurement never ends the phase


def test_after_the_switch_training_is_normal(tmp_path):
    class HighLastMI(L.Callback):  # epoch 1's I_q is then no increase: the switch fires
        def on_train_epoch_start(self, trainer, pl_module):
            if trainer.current_epoch == 1:
                pl_module.last_mutual_info = math.inf

    model = _model(max_inner_steps=5, inner_window=2)
    steps = _Steps()
    trainer = L.Trainer(max_epochs=3, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[steps, HighLastMI()], limit_train_batches=2)
    trainer.fit(model, DataLoader(TensorDataset(X), batch_size=8),
                DataLoader(TensorDataset(X[:16]), batch_size=8))
    counts = steps.encoder_steps_per_decoder_step()
    assert len(counts) == 6
    assert all(c > 1 for c in counts[:4]) and counts[4:] == [1, 1]
    assert not model.aggressive
    assert float(trainer.callback_metrics["train/aggressive"]) == 0.0


@pytest.mark.parametrize("aggressive", [True, False])
def test_resuming_continues_in_the_saved_phase(tmp_path, aggressive):
    model = _model(max_inner_steps=5, inner_window=2)
    model.aggressive = aggressive
    trainer, _ = _fit(model, tmp_path)
    path = tmp_path / "mid.ckpt"
    trainer.save_checkpoint(path)
    saved = torch.load(path, weights_only=True)["lagging_vae"]
    assert saved == {"aggressive": aggressive, "last_mutual_info": model.last_mutual_info}

    resumed = _model(max_inner_steps=5, inner_window=2)  # a fresh model starts aggressive
    _, steps = _fit(resumed, tmp_path, epochs=2, ckpt_path=path)
    assert steps.start == (aggressive, saved["last_mutual_info"])
    counts = steps.encoder_steps_per_decoder_step()
    assert len(counts) == 3
    if aggressive:
        assert all(c > 1 for c in counts)
    else:
        assert counts == [1, 1, 1]
        assert not resumed.aggressive


@pytest.mark.parametrize("field,value", [("max_inner_steps", 0), ("inner_window", 1.5),
                                         ("gradient_clip_val", -1.0), ("mi_samples", 0)])
def test_bad_configuration_names_the_field(field, value):
    with pytest.raises(ConfigurationError, match=f"{field}="):
        _model(**{field: value})


def test_each_update_is_clipped_by_the_model(tmp_path):
    model = _model(gradient_clip_val=1e-3, optimizer=lambda p: torch.optim.SGD(p, lr=1.0))
    model.aggressive = False
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _fit(model, tmp_path, batches=1)
    for block in ("encoder", "decoder"):
        moved = torch.cat([(v - before[k]).flatten() for k, v in model.state_dict().items()
                           if k.startswith(block)])
        # SGD with lr 1 moves the parameters by the clipped gradient: norm ≤ 1e-3.
        assert 0 < float(moved.norm()) <= 1e-3 * (1 + 1e-4)


def test_trainer_side_clipping_is_refused_in_one_line(tmp_path):
    trainer = L.Trainer(max_epochs=1, logger=False, gradient_clip_val=5.0,
                        enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(ConfigurationError, match=r"^trainer.gradient_clip_val=5.0 is not "
                                                 r"allowed: expected null with LaggingVAE"):
        trainer.fit(_model(), DataLoader(TensorDataset(X), batch_size=8))


def test_a_learning_rate_scheduler_is_refused_in_one_line():
    with pytest.raises(ConfigurationError, match="lr_scheduler=.*steps its two optimisers"):
        _model(lr_scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, 1))
