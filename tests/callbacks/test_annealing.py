"""Schedules of β and L: every shape equals its closed form, cyclical annealing equals Fu et
al.'s definition enumerated cycle by cycle, the PI controller holds a simulated KL at its target
within its bounds, bad arguments are rejected by name, and a resumed run applies exactly the
values of an uninterrupted one."""

import itertools
import math
from fractions import Fraction

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from scipy.special import expit
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ilvae.callbacks import InverseLipschitzAnnealing, KLAnnealing, TargetKLController
from ilvae.callbacks.annealing import schedule
from ilvae.decoders.base import Decoder
from ilvae.decoders.mlp import MLPDecoder
from ilvae.encoders import MLPEncoder
from ilvae.models import VAE

# ----------------------------------------------------------------------------- shapes

ENDPOINTS = [(0.0, 1.0), (5.0, 0.5), (0.2, 3.0), (4.0, 0.0), (0.0, 2.5), (1.5, 1.5)]


def _closed_form(shape, steps, start, end, length, delay, drops=4, sharpness=10.0):
    steps = np.asarray(steps, dtype=float)
    u = np.clip((steps - delay) / length, 0.0, 1.0)
    if shape == "linear":
        return np.interp(steps, [delay, delay + length], [start, end])
    if shape == "cosine":
        return end + (start - end) * (1 + np.cos(np.pi * u)) / 2
    if shape == "exponential":
        if start == end:
            return np.full_like(steps, start)
        c = 0.0 if min(start, end) > 0 else 1e-3 * max(start, end)
        ladder = np.geomspace(start + c, end + c, length + 1) - c
        return ladder[np.clip(steps - delay, 0, length).astype(int)]
    if shape == "step":
        jumps = delay + np.arange(1, drops + 1) * length / drops
        n = (steps[:, None] >= jumps[None, :]).sum(1)
        return start + (end - start) * n / drops
    if shape == "sigmoid":
        k = sharpness
        return start + (end - start) * (expit(k * (u - 0.5)) - expit(-k / 2)) / (
            expit(k / 2) - expit(-k / 2))
    raise AssertionError(shape)


@pytest.mark.parametrize("shape", ["linear", "cosine", "exponential", "step", "sigmoid"])
@pytest.mark.parametrize("start,end", ENDPOINTS)
@pytest.mark.parametrize("length,delay", [(100, 0), (37, 11), (1, 3)])
def test_every_shape_equals_its_closed_form(shape, start, end, length, delay):
    steps = range(delay + length + 20)
    got = [schedule(s, shape=shape, start=start, end=end, length=length, delay=delay)
           for s in steps]
    expected = _closed_form(shape, steps, start, end, length, delay)
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)
    assert got[0] == start and got[-1] == end  # exact endpoints, constant after the ramp


@pytest.mark.parametrize("drops,length", [(1, 10), (3, 10), (5, 10), (4, 12), (7, 100)])
def test_step_shape_drops_exactly_at_multiples_of_length_over_drops(drops, length):
    got = [schedule(s, shape="step", start=8.0, end=0.0, length=length, drops=drops)
           for s in range(length + 2)]
    np.testing.assert_allclose(got, _closed_form("step", range(length + 2), 8.0, 0.0, length,
                                                 0, drops=drops), rtol=0, atol=1e-12)
    assert len(set(got)) == drops + 1


@pytest.mark.parametrize("sharpness", [1.0, 4.0, 25.0])
def test_sigmoid_sharpness_matches_closed_form(sharpness):
    steps = range(60)
    got = [schedule(s, shape="sigmoid", start=0.1, end=1.0, length=50, sharpness=sharpness)
           for s in steps]
    expected = _closed_form("sigmoid", steps, 0.1, 1.0, 50, 0, sharpness=sharpness)
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)


def test_exponential_is_geometric_and_handles_a_zero_endpoint():
    got = [schedule(s, shape="exponential", start=8.0, end=1.0, length=3) for s in range(4)]
    np.testing.assert_allclose(got, [8.0, 4.0, 2.0, 1.0], rtol=1e-12)
    decay = [schedule(s, shape="exponential", start=5.0, end=0.0, length=10) for s in range(12)]
    assert decay[0] == 5.0 and decay[10] == 0.0 == decay[11]
    assert all(a > b for a, b in itertools.pairwise(decay[:11]))  # monotone down to exactly 0
    assert all(math.isfinite(v) and v >= 0 for v in decay)


# ----------------------------------------------------------------------------- cyclical


def _fu_brute_force(total, cycles, ratio, start, end, ramp, delay=0):
    """Fu et al. (2019): M cycles of T/M steps; inside a cycle at τ ∈ [0, 1),
    β = f(τ/R) while τ ≤ R, else the end value; after T steps the end value."""
    period = Fraction(total, cycles)
    values = [start] * delay
    for c in range(cycles):
        s = math.ceil(c * period)
        while s < (c + 1) * period:
            tau = (s - c * period) / period
            values.append(ramp(float(tau / Fraction(ratio))) if tau <= Fraction(ratio) else end)
            s += 1
    return values + [end] * 5


@pytest.mark.parametrize("total,cycles,ratio,delay", [(100, 4, 0.5, 0), (100, 3, 0.25, 7),
                                                      (37, 5, 1.0, 0), (64, 1, 0.5, 2),
                                                      (50, 7, 0.8, 0)])
@pytest.mark.parametrize("shape", ["linear", "sigmoid"])
def test_cyclical_schedule_matches_brute_force_loop_of_fu_et_al(total, cycles, ratio, delay,
                                                                shape):
    start, end = 0.0, 1.0
    if shape == "linear":
        def ramp(u):
            return start + (end - start) * u
    else:
        def ramp(u):
            return float(_closed_form("sigmoid", [u * 1000], start, end, 1000, 0)[0])
    expected = _fu_brute_force(total, cycles, ratio, start, end, ramp, delay)
    callback = KLAnnealing(length=total, start=start, end=end, shape=shape, delay=delay,
                           cycles=cycles, ratio=ratio)
    got = [callback.value_at(s) for s in range(len(expected))]
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)


def test_cyclical_hand_example():
    got = [schedule(s, start=0.0, end=1.0, length=8, cycles=2, ratio=0.5) for s in range(10)]
    assert got == [0.0, 0.5, 1.0, 1.0, 0.0, 0.5, 1.0, 1.0, 1.0, 1.0]


def test_one_cycle_with_full_ratio_is_the_monotone_warm_up():
    a = KLAnnealing(length=30, cycles=1, ratio=1.0)
    b = KLAnnealing(length=30)
    assert [a.value_at(s) for s in range(40)] == [b.value_at(s) for s in range(40)]


# ----------------------------------------------------------------------------- controller


def _simulate(controller, steady_state, steps, kl0, rate=0.2, targets=None):
    """First-order plant KL(t+1) = KL(t) + rate·(g(v(t)) − KL(t)) under the controller."""
    kl, values, kls = kl0, [], []
    for t in range(steps):
        if targets is not None:
            controller.kl_target = targets(t)
        v = controller.value
        kl = kl + rate * (steady_state(v) - kl)
        controller.update(kl)
        values.append(v)
        kls.append(kl)
    return np.array(values), np.array(kls)


def test_controller_one_step_equals_the_controlvae_formula():
    c = TargetKLController(kl_target=10.0, kp=0.5, ki=0.01, min_value=0.0, max_value=2.0)
    assert c.value == 0.25  # output at zero error before any measurement
    v = c.update(13.0)
    e = 10.0 - 13.0
    assert v == pytest.approx(0.5 / (1 + math.exp(e)) - 0.01 * e, rel=1e-12)
    v2 = c.update(9.0)
    e2 = 10.0 - 9.0
    assert v2 == pytest.approx(0.5 / (1 + math.exp(e2)) - 0.01 * (e + e2), rel=1e-12)
    assert c.integral == pytest.approx(e + e2) and c.error == e2 and c.updates == 2
    assert c.update(float("nan")) == v2 and c.updates == 2  # non-finite KL ignored


def test_controller_drives_beta_to_the_target_kl():
    # Steady-state KL falls with β: g(β) = 20 / (0.1 + β); KL* = 40 ⇔ β* = 0.4.
    c = TargetKLController(kl_target=40.0, kp=0.01, ki=1e-4, min_value=0.0, max_value=1.0)
    values, kls = _simulate(c, lambda b: 20.0 / (0.1 + b), 3000, kl0=150.0)
    assert abs(kls[-1] - 40.0) < 0.2 and abs(values[-1] - 0.4) < 0.01
    assert values.min() >= 0.0 and values.max() <= 1.0


def test_controller_drives_L_to_the_target_kl():
    # Steady-state KL rises with L: g(L) = 5 + 10 L; KL* = 25 ⇔ L* = 2.
    c = TargetKLController(kl_target=25.0, target="L", kp=0.1, ki=2e-3, min_value=0.0,
                           max_value=5.0)
    values, kls = _simulate(c, lambda L: 5.0 + 10.0 * L, 3000, kl0=1.0)
    assert abs(kls[-1] - 25.0) < 0.1 and abs(values[-1] - 2.0) < 0.01
    assert values.min() >= 0.0 and values.max() <= 5.0


def test_controller_respects_bounds_and_does_not_wind_up():
    # KL* = 5 is out of reach (g(β) ≥ 18.2 for β ≤ 1): β saturates at max_value. When the
    # target becomes reachable again, β leaves the bound at once (no integral wind-up).
    c = TargetKLController(kl_target=5.0, kp=0.01, ki=1e-4, min_value=0.05, max_value=1.0)
    values, _ = _simulate(c, lambda b: 20.0 / (0.1 + b), 4000, kl0=150.0,
                          targets=lambda t: 5.0 if t < 2000 else 40.0)
    assert values.min() >= 0.05 and values.max() <= 1.0
    np.testing.assert_allclose(values[1500:2000], 1.0, rtol=0, atol=1e-12)
    assert c.ki * abs(c.integral) <= (c.max_value - c.min_value) + c.kp
    assert values[2010] < 1.0
    assert abs(values[-1] - 0.4) < 0.01


# ----------------------------------------------------------------------------- bad arguments


@pytest.mark.parametrize("make,field", [
    (lambda: KLAnnealing(length=10, start=-1.0), "start"),
    (lambda: KLAnnealing(length=10, end=float("nan")), "end"),
    (lambda: KLAnnealing(length=10, end=float("inf")), "end"),
    (lambda: KLAnnealing(length=0), "length"),
    (lambda: KLAnnealing(length=10, shape="cubic"), "shape"),
    (lambda: KLAnnealing(length=10, cycles=-1), "cycles"),
    (lambda: KLAnnealing(length=10, cycles=2, ratio=0.0), "ratio"),
    (lambda: KLAnnealing(length=10, ratio=1.5), "ratio"),
    (lambda: KLAnnealing(length=10, delay=-3), "delay"),
    (lambda: InverseLipschitzAnnealing(start=-0.5, end=1.0, length=10), "start"),
    (lambda: InverseLipschitzAnnealing(start=1.0, end=1.0, length=-5), "length"),
    (lambda: InverseLipschitzAnnealing(start=1.0, end=0.0, length=10, shape="log"), "shape"),
    (lambda: InverseLipschitzAnnealing(start=1.0, end=0.0, length=10, drops=0), "drops"),
    (lambda: InverseLipschitzAnnealing(start=1.0, end=0.0, length=10, sharpness=0.0),
     "sharpness"),
    (lambda: TargetKLController(kl_target=-1.0), "kl_target"),
    (lambda: TargetKLController(kl_target=5.0, kp=float("nan")), "kp"),
    (lambda: TargetKLController(kl_target=5.0, ki=-1.0), "ki"),
    (lambda: TargetKLController(kl_target=5.0, min_value=2.0, max_value=1.0), "max_value"),
    (lambda: TargetKLController(kl_target=5.0, initial=3.0), "initial"),
    (lambda: TargetKLController(kl_target=5.0, target="gamma"), "target"),
    (lambda: TargetKLController(kl_target=5.0, update_every=0), "update_every"),
])
def test_bad_arguments_raise_value_error_naming_the_field(make, field):
    with pytest.raises(ValueError, match=rf"^{field}="):
        make()


def test_unknown_shape_lists_the_allowed_values():
    with pytest.raises(ValueError, match="linear, cosine, exponential, step, sigmoid"):
        InverseLipschitzAnnealing(start=1.0, end=0.0, length=10, shape="cubic")


# ----------------------------------------------------------------------------- training


class _ILStandIn(Decoder):
    """θ = MLP(z) + L·[z, 0]: a small decoder with a settable ``L`` backed by a buffer."""

    def __init__(self, latent_dim: int, data_dim: int, L: float = 1.0,
                 likelihood: str = "gaussian") -> None:
        super().__init__(latent_dim, data_dim, likelihood)
        self.net = nn.Sequential(nn.Linear(latent_dim, 8), nn.Tanh(), nn.Linear(8, data_dim))
        self.register_buffer("L_buffer", torch.tensor(float(L)))

    @property
    def L(self) -> float:
        return float(self.L_buffer)

    @L.setter
    def L(self, value: float) -> None:
        self.L_buffer.fill_(float(value))

    def forward(self, z):
        pad = z.new_zeros(z.shape[0], self.data_dim - self.latent_dim)
        return self.net(z) + self.L_buffer * torch.cat([z, pad], 1)


class _Recorder(pl.Callback):
    """Records (global_step, β, L) at each training and validation batch; reseeds the global
    RNG from the step, so the reparameterisation noise of a step does not depend on whether the
    run was resumed."""

    def __init__(self):
        self.train, self.val = [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        torch.manual_seed(1000 + trainer.global_step)
        self.train.append((trainer.global_step, pl_module.beta, pl_module.decoder.L))

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self.val.append((trainer.global_step, pl_module.beta, pl_module.decoder.L))


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 4, generator=g) * torch.tensor([3.0, 1.0, 0.3, 0.1])
    xv = torch.randn(8, 4, generator=g)
    return (DataLoader(TensorDataset(x), batch_size=4, shuffle=False),
            DataLoader(TensorDataset(xv), batch_size=4, shuffle=False))


def _model(decoder=_ILStandIn):
    torch.manual_seed(0)
    return VAE(data_shape=(4,), latent_dim=2, decoder=decoder,
               encoder=lambda shape, m: MLPEncoder(shape, m, hidden=[16]))


def _fit(callbacks, max_steps, tmp_path, ckpt_path=None, model=None, save_to=None):
    recorder = _Recorder()
    trainer = pl.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0,
                         default_root_dir=tmp_path, callbacks=[*callbacks, recorder])
    model = model or _model()
    train, val = _data()
    trainer.fit(model, train, val, ckpt_path=ckpt_path)
    if save_to is not None:
        trainer.save_checkpoint(save_to)
    return recorder, model


SCENARIOS = {
    "cyclical_beta_and_cosine_L": lambda: [
        KLAnnealing(length=12, start=0.0, end=1.0, cycles=2, ratio=0.75, shape="sigmoid"),
        InverseLipschitzAnnealing(start=3.0, end=0.5, length=14, shape="cosine", delay=1)],
    "controlled_beta_and_exponential_L": lambda: [
        TargetKLController(kl_target=0.5, kp=0.2, ki=0.05, max_value=2.0),
        InverseLipschitzAnnealing(start=2.0, end=0.0, length=10, shape="exponential")],
    "controlled_L_and_warm_up": lambda: [
        KLAnnealing(length=9, start=0.1, end=1.0),
        TargetKLController(kl_target=3.0, target="L", kp=0.5, ki=0.1, max_value=4.0,
                           update_every=3)],
}


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_resumed_run_applies_exactly_the_uninterrupted_values(name, tmp_path):
    n = 16  # 4 batches per epoch: the checkpoint at n/2 falls on an epoch boundary
    full, full_model = _fit(SCENARIOS[name](), n, tmp_path / "full")
    ckpt = tmp_path / "half.ckpt"
    first, _ = _fit(SCENARIOS[name](), n // 2, tmp_path / "half", save_to=ckpt)
    callbacks = SCENARIOS[name]()
    resumed, resumed_model = _fit(callbacks, n, tmp_path / "resumed", ckpt_path=str(ckpt))

    assert [r[0] for r in full.train] == list(range(n))
    assert first.train == full.train[: n // 2]
    assert resumed.train == full.train[n // 2:]
    assert first.val + resumed.val == full.val  # validation at every epoch end
    betas = [r[1] for r in full.train]
    Ls = [r[2] for r in full.train]
    assert len(set(betas)) > 3 and len(set(Ls)) > 3  # both values actually move

    # Schedules: the applied value is the schedule at the global step, in training and
    # validation alike (L through a float32 buffer).
    for cb in callbacks:
        if isinstance(cb, (KLAnnealing, InverseLipschitzAnnealing)):
            column = 1 if cb.target == "beta" else 2
            for rec in full.train + full.val:
                assert rec[column] == pytest.approx(cb.value_at(rec[0]), rel=1e-6, abs=1e-7)
        else:
            # The controller's state went through the checkpoint and ended where the
            # uninterrupted run's did.
            saved = torch.load(ckpt, weights_only=False)["callbacks"][cb.state_key]
            assert saved["updates"] == n // 2 // cb.update_every
            assert set(saved) >= {"value", "integral", "error", "updates"}
            assert cb.updates == n // cb.update_every
    full_state, resumed_state = full_model.state_dict(), resumed_model.state_dict()
    for a, b in zip(full_state.values(), resumed_state.values(), strict=True):
        assert torch.equal(a, b)


def test_controller_state_round_trips_through_state_dict():
    a = TargetKLController(kl_target=2.0, kp=0.3, ki=0.02, max_value=3.0)
    for kl in (5.0, 4.0, 1.0):
        a.update(kl)
    a._kl_sum, a._kl_count = torch.tensor(1.5), 1
    b = TargetKLController(kl_target=2.0, kp=0.3, ki=0.02, max_value=3.0)
    b.load_state_dict(a.state_dict())
    assert b.state_dict() == a.state_dict()
    assert [b.update(k) for k in (2.5, 0.5)] == [a.update(k) for k in (2.5, 0.5)]


def test_decoder_without_L_is_rejected_at_fit_start_naming_the_decoder(tmp_path):
    callback = InverseLipschitzAnnealing(start=1.0, end=0.0, length=5)
    with pytest.raises(ValueError, match="MLPDecoder.*`L`|`L`.*MLPDecoder"):
        _fit([callback], 2, tmp_path, model=_model(decoder=MLPDecoder))


def test_two_callbacks_setting_beta_are_rejected(tmp_path):
    callbacks = [KLAnnealing(length=5), TargetKLController(kl_target=1.0)]
    with pytest.raises(ValueError, match="KLAnnealing and TargetKLController both set `beta`"):
        _fit(callbacks, 2, tmp_path)


def test_controller_names_a_missing_kl_key(tmp_path):
    callback = TargetKLController(kl_target=1.0, kl_key="train/nope")
    with pytest.raises(ValueError, match="kl_key='train/nope'.*train/kl"):
        _fit([callback], 2, tmp_path)


def test_controller_reads_the_logged_step_kl(tmp_path):
    # With ki = kp = 0 the integral is the plain sum of errors, so the KL it read each step is
    # recoverable and must equal the train/kl that the VAE's step returned for that batch.
    callback = TargetKLController(kl_target=0.0, kp=0.0, ki=0.0)
    seen = []

    class _Spy(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append((float(outputs["train/kl"]), -callback.integral))

    _fit([callback, _Spy()], 3, tmp_path)
    kls = [k for k, _ in seen]
    np.testing.assert_allclose([s for _, s in seen], np.cumsum(kls), rtol=1e-6)
    assert min(kls) > 0


# ----------------------------------------------------------------------------- named targets
def _hvae():
    from ilvae.models import HierarchicalVAE

    torch.manual_seed(0)
    return HierarchicalVAE(data_shape=(4,), latent_dim=2, hidden_2=[8], num_iw_samples=0,
                           beta_1=0.7, encoder={"class_path": "ilvae.encoders.MLPEncoder",
                                                "init_args": {"hidden": [8]}},
                           decoder={"class_path": "mlp",
                                    "init_args": {"hidden": [8], "likelihood": "gaussian"}})


def test_kl_annealing_of_beta_2_sets_the_hvae_weight_by_the_formula_and_logs_it(tmp_path):
    seen = []

    class _Spy(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append((trainer.global_step - 1, pl_module.beta_1, pl_module.beta_2,
                         float(trainer.callback_metrics["train/beta_2"])))

    annealing = KLAnnealing(length=6, start=0.2, end=1.4, delay=2, target="beta_2")
    trainer = pl.Trainer(max_steps=10, accelerator="cpu", devices=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0,
                         log_every_n_steps=1, default_root_dir=tmp_path,
                         callbacks=[annealing, _Spy()])
    model = _hvae()
    train, val = _data()
    trainer.fit(model, train, val)
    assert [s for s, *_ in seen] == list(range(10))
    for step, beta_1, beta_2, logged in seen:
        # β₂ = 0.2 until step 2, then linear to 1.4 over 6 steps
        expected = 0.2 + 1.2 * min(max(step - 2, 0), 6) / 6
        assert beta_2 == pytest.approx(expected, abs=1e-12)
        assert logged == pytest.approx(expected, rel=1e-6)
        assert beta_1 == 0.7  # the other level's weight is left alone
    assert model.get_hparam("beta_2") == pytest.approx(1.4)


@pytest.mark.parametrize("make", [
    lambda: KLAnnealing(length=5, target="beta_3"),
    lambda: InverseLipschitzAnnealing(start=1.0, end=0.0, length=5),
    lambda: TargetKLController(kl_target=1.0, target="beta"),
])
def test_a_target_the_model_does_not_declare_is_one_line_naming_its_schedulable_names(
        make, tmp_path):
    callback = make()
    trainer = pl.Trainer(max_steps=2, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=tmp_path, callbacks=[callback])
    train, val = _data()
    with pytest.raises(ValueError) as error:
        trainer.fit(_hvae(), train, val)
    message = str(error.value)
    assert "\n" not in message
    assert f"target={callback.target!r} is not allowed" in message
    assert "HierarchicalVAE" in message and "(beta_1, beta_2)" in message


def test_a_non_default_target_keeps_its_own_checkpoint_state():
    assert KLAnnealing(length=5).state_key == "KLAnnealing"
    assert KLAnnealing(length=5, target="beta_2").state_key != "KLAnnealing"


def test_the_controller_sign_follows_the_target_name():
    assert TargetKLController(kl_target=1.0, target="beta_2").sign == 1
    assert TargetKLController(kl_target=1.0, target="L1").sign == -1
    assert TargetKLController(kl_target=1.0, target="gamma", sign=-1).sign == -1
