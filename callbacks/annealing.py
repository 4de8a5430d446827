"""Schedules of the model's named hyper-parameters: any name the model declares in its
``schedulable`` (the model contract of :mod:`ilvae.models.contract`), e.g. ``beta`` (the KL
weight), ``L`` (the decoder's inverse-Lipschitz constant, Kinoshita et al. 2023), ``beta_1``,
``beta_2`` (a hierarchy's level weights) or ``L1`` (a mixture's mean-map constant), chosen with
``target``. A callback sets the value through the model's ``set_hparam(name, value)``; an
unknown name is refused in one line when fitting starts.

Each schedule is a callback with saved state: it sets the value at ``on_fit_start``, at every
``on_train_batch_start`` and at ``on_validation_start``, and ``state_dict``/``load_state_dict``
carry it through checkpoints, so a resumed run continues where it stopped. The callbacks only
set values; the model logs every schedulable value as ``train/<name>`` while training.

- :func:`schedule` — the shapes, a pure function of the step.
- :class:`KLAnnealing` — β warm-up (Bowman et al. 2016) or cyclical annealing (Fu et al. 2019).
- :class:`InverseLipschitzAnnealing` — the same schedules applied to L.
- :class:`TargetKLController` — PI control of β or L towards a target KL (ControlVAE, Shao
  et al. 2020).

At most one of these callbacks may set a given hyper-parameter; a second one is rejected at
``on_fit_start``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn

from ilvae.errors import ConfigurationError, check, check_int

SHAPES = ("linear", "cosine", "exponential", "step", "sigmoid")
Shape = Literal["linear", "cosine", "exponential", "step", "sigmoid"]

# With a zero endpoint, the exponential shape interpolates geometrically in v + c with
# c = _EXPONENTIAL_OFFSET · max(start, end): three decades of decay (or growth) over `length`.
_EXPONENTIAL_OFFSET = 1e-3


# ----------------------------------------------------------------------------- validation
def _number(field: str, value: Any, *, minimum: float | None = 0.0, strict: bool = False,
            maximum: float | None = None) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (minimum is None or (value > minimum if strict else value >= minimum))
    ok = ok and (maximum is None or value <= maximum)
    if not ok:
        low = "" if minimum is None else f" {'>' if strict else '>='} {minimum:g}"
        high = "" if maximum is None else f" and <= {maximum:g}"
        check(field, value, f"a finite number{low}{high}")
    return float(value)


def _choice(field: str, value: Any, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        check(field, value, f"one of {', '.join(allowed)}")
    return value


def _name(field: str, value: Any) -> str:
    if not isinstance(value, str) or not value.isidentifier():
        check(field, value, "the name of a hyper-parameter the model declares schedulable, "
                            "e.g. 'beta'")
    return value


def _check_schedule(shape: str, start: float, end: float, length: int, delay: int, cycles: int,
                    ratio: float, drops: int, sharpness: float) -> dict[str, Any]:
    return {
        "shape": _choice("shape", shape, SHAPES),
        "start": _number("start", start),
        "end": _number("end", end),
        "length": check_int("length", length, minimum=1),
        "delay": check_int("delay", delay, minimum=0),
        "cycles": check_int("cycles", cycles, minimum=0),
        "ratio": _number("ratio", ratio, strict=True, maximum=1.0),
        "drops": check_int("drops", drops, minimum=1),
        "sharpness": _number("sharpness", sharpness, strict=True),
    }


# ----------------------------------------------------------------------------- shapes
def _progress(step: int, length: int, delay: int, cycles: int, ratio: float) -> float:
    """u ∈ [0, 1]: how far along the ramp from start to end the schedule is at ``step``."""
    s = step - delay
    if s <= 0:
        return 0.0
    if s >= length:
        return 1.0
    if cycles == 0:
        return s / length
    # Position τ ∈ [0, 1) inside the current cycle, in exact integer arithmetic: cycles of
    # length/cycles steps need not start on whole steps.
    tau = (s * cycles % length) / length
    return min(tau / ratio, 1.0)


def _interpolate(shape: str, u: float, start: float, end: float, drops: int,
                 sharpness: float) -> float:
    if u <= 0.0:
        return start
    if u >= 1.0:
        return end
    if shape == "linear":
        return start + (end - start) * u
    if shape == "cosine":
        return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * u))
    if shape == "exponential":
        if start == end:
            return start
        c = 0.0 if min(start, end) > 0 else _EXPONENTIAL_OFFSET * max(start, end)
        return (start + c) * ((end + c) / (start + c)) ** u - c
    if shape == "step":
        # The slack absorbs rounding of u = s/length, so a jump lands exactly on its step.
        return start + (end - start) * math.floor(drops * u + 1e-9) / drops
    lo, hi = _logistic(-0.5 * sharpness), _logistic(0.5 * sharpness)
    return start + (end - start) * (_logistic(sharpness * (u - 0.5)) - lo) / (hi - lo)


def _logistic(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


def schedule(step: int, *, start: float, end: float, length: int, shape: Shape = "linear",
             delay: int = 0, cycles: int = 0, ratio: float = 1.0, drops: int = 4,
             sharpness: float = 10.0) -> float:
    """Value of a schedule at optimizer step ``step``: ``start`` until ``delay``, a ramp over
    the next ``length`` steps, then ``end`` for ever.

    With u = (step − delay)/length clipped to [0, 1] (a = start, b = end):

    - ``linear``: a + (b − a)·u
    - ``cosine``: b + (a − b)·(1 + cos πu)/2
    - ``exponential``: geometric interpolation a·(b/a)^u. If an endpoint is 0 it is
      (a + c)·((b + c)/(a + c))^u − c with c = 10⁻³·max(a, b): still exact at both ends and
      monotone, falling (or rising) through three decades. Needs a, b ≥ 0.
    - ``step``: a + (b − a)·⌊drops·u⌋/drops: ``drops`` equal jumps, the k-th at step
      delay + k·length/drops, the last one landing on b at delay + length.
    - ``sigmoid``: a + (b − a)·(σ(k(u − ½)) − σ(−k/2))/(σ(k/2) − σ(−k/2)), σ the logistic
      function and k = ``sharpness``: exact at both ends.

    Cyclical annealing (Fu et al. 2019) with ``cycles`` = M ≥ 1 and ``ratio`` = R ∈ (0, 1]:
    the ``length`` steps are split into M cycles of length/M steps; at position τ ∈ [0, 1)
    inside a cycle, u = min(τ/R, 1), so each cycle ramps from a to b over its first R fraction
    and stays at b for the rest. After the last cycle the value stays at b. ``cycles=0``
    (default) is the monotone schedule; ``cycles=1, ratio=1`` is the same.

    Examples:
        >>> schedule(5, start=0.0, end=1.0, length=10)
        0.5
        >>> [schedule(s, start=0.0, end=1.0, length=8, cycles=2, ratio=0.5) for s in range(9)]
        [0.0, 0.5, 1.0, 1.0, 0.0, 0.5, 1.0, 1.0, 1.0]
    """
    p = _check_schedule(shape, start, end, length, delay, cycles, ratio, drops, sharpness)
    u = _progress(int(step), p["length"], p["delay"], p["cycles"], p["ratio"])
    return _interpolate(p["shape"], u, p["start"], p["end"], p["drops"], p["sharpness"])


# ----------------------------------------------------------------------------- targets
class _SetsHyperParameter(Callback):
    """A callback that owns one named hyper-parameter of the module (``target``)."""

    target: str
    #: The target when none is given: the saved state of a callback with this target keeps
    #: the plain class name as its key, so checkpoints written before ``target`` existed load.
    default_target: str

    @property
    def state_key(self) -> str:
        if self.target == self.default_target:
            return super().state_key
        return self._generate_state_key(target=self.target)

    def _check_target(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        name = type(self).__name__
        for other in trainer.callbacks:
            if other is not self and isinstance(other, _SetsHyperParameter) \
                    and other.target == self.target:
                raise ConfigurationError(
                    f"trainer.callbacks: {name} and {type(other).__name__} both set "
                    f"`{self.target}`; keep one of them")
        names = tuple(getattr(pl_module, "schedulable", ()))
        if self.target not in names:
            note = getattr(pl_module, "schedulable_note", lambda _: "")(self.target)
            check("target", self.target, f"one of the hyper-parameters "
                  f"{type(pl_module).__name__} declares schedulable ({', '.join(names) or 'none'})"
                  f" for {name}{note}")

    def _apply(self, pl_module: pl.LightningModule, value: float) -> None:
        pl_module.set_hparam(self.target, value)


class _Schedule(_SetsHyperParameter):
    """Sets ``target`` to :func:`schedule` at ``trainer.global_step`` (optimizer steps)."""

    def __init__(self, start: float, end: float, length: int, shape: str, delay: int,
                 cycles: int, ratio: float, drops: int, sharpness: float) -> None:
        super().__init__()
        p = _check_schedule(shape, start, end, length, delay, cycles, ratio, drops, sharpness)
        self.shape = p["shape"]
        self.start, self.end = p["start"], p["end"]
        self.length, self.delay = p["length"], p["delay"]
        self.cycles, self.ratio = p["cycles"], p["ratio"]
        self.drops, self.sharpness = p["drops"], p["sharpness"]
        self.value: float | None = None
        self.step: int | None = None
        self._restored = False

    def value_at(self, step: int) -> float:
        """The scheduled value at optimizer step ``step``."""
        u = _progress(step, self.length, self.delay, self.cycles, self.ratio)
        return _interpolate(self.shape, u, self.start, self.end, self.drops, self.sharpness)

    def _set(self, pl_module: pl.LightningModule, step: int) -> None:
        self.step = int(step)
        self.value = self.value_at(self.step)
        self._apply(pl_module, self.value)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._check_target(trainer, pl_module)
        # Lightning restores the global step only after on_fit_start: a resumed run sets the
        # value it saved, the step counter takes over from the first batch on.
        if self._restored and self.value is not None:
            self._apply(pl_module, self.value)
            self._restored = False
        else:
            self._set(pl_module, trainer.global_step)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                             batch: Any, batch_idx: int) -> None:
        self._set(pl_module, trainer.global_step)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # A stand-alone validate/test run restored from a checkpoint keeps the saved value.
        if trainer.state.fn == TrainerFn.FITTING or not self._restored or self.value is None:
            self._set(pl_module, trainer.global_step)
        else:
            self._apply(pl_module, self.value)

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value, "step": self.step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.value = state_dict["value"]
        self.step = state_dict["step"]
        self._restored = True


class KLAnnealing(_Schedule):
    """β warm-up: sets the model's ``target`` (``beta`` by default; ``beta_1``, ``beta_2`` of a
    hierarchy, any name in the model's ``schedulable``) to :func:`schedule` at
    ``trainer.global_step``.

    The default is the linear KL warm-up of Bowman et al. (2016), β from 0 to 1 over
    ``length`` optimizer steps. ``cycles=M`` (≥ 1) with ``ratio=R`` gives the cyclical
    annealing of Fu et al. (2019): the ``length`` steps hold M cycles, each ramping from
    ``start`` to ``end`` over its first R fraction and then flat at ``end``; afterwards β stays
    at ``end``. ``shape`` is the ramp (``linear`` or ``sigmoid`` as in the papers; any shape of
    :func:`schedule` is accepted), ``delay`` holds β at ``start`` for that many steps first.

    In a config::

        trainer:
          callbacks:
            - class_path: ilvae.callbacks.KLAnnealing
              init_args: {length: 5000, cycles: 4, ratio: 0.5}
    """

    default_target = "beta"

    def __init__(self, length: int, start: float = 0.0, end: float = 1.0,
                 shape: Shape = "linear", delay: int = 0, cycles: int = 0, ratio: float = 0.5,
                 drops: int = 4, sharpness: float = 10.0, target: str = "beta") -> None:
        super().__init__(start, end, length, shape, delay, cycles, ratio, drops, sharpness)
        self.target = _name("target", target)


class InverseLipschitzAnnealing(_Schedule):
    """Anneals an inverse-Lipschitz constant: sets the model's ``target`` (``L``, the decoder's
    constant, by default; ``L1`` of a mixture's mean map, any name in the model's
    ``schedulable``) to :func:`schedule` at ``trainer.global_step`` (Kinoshita et al. 2023
    propose annealing L; a large L early keeps the posterior from collapsing, a smaller final
    L constrains the decoder less).

    ``shape`` is ``linear``, ``cosine``, ``exponential`` (geometric; handles L = 0) or ``step``
    (``drops`` equal drops), or ``sigmoid``; ``cycles``/``ratio`` give cyclical annealing as in
    :class:`KLAnnealing`. The model must declare ``target`` schedulable (checked at
    ``on_fit_start``).
    """

    default_target = "L"

    def __init__(self, start: float, end: float, length: int, shape: Shape = "linear",
                 delay: int = 0, cycles: int = 0, ratio: float = 0.5, drops: int = 4,
                 sharpness: float = 10.0, target: str = "L") -> None:
        super().__init__(start, end, length, shape, delay, cycles, ratio, drops, sharpness)
        self.target = _name("target", target)


# ----------------------------------------------------------------------------- controller
class TargetKLController(_SetsHyperParameter):
    """PI control of β (or of L) that holds the KL at ``kl_target`` nats (ControlVAE, Shao et
    al. 2020).

    After each training batch t the KL of that batch, KL(t), gives the error
    e(t) = s·(KL* − KL(t)) with s = +1 for a KL weight (β, β₁, β₂: a larger one lowers the KL)
    and s = −1 for an inverse-Lipschitz constant (L, L₁: a larger one raises it), and the value
    used from the next batch on is

        v(t) = clip(v_min + K_p / (1 + exp e(t)) − K_i Σ_{j≤t} e(j),  v_min, v_max)

    with anti-windup: when adding e(t) would push v out of [v_min, v_max], the integral
    stops where v reaches the bound (and never moves further out), so it does not wind up
    while the target is out of reach. Before the first measurement v = ``initial``
    (default: the output at zero error, v_min + K_p/2, clipped).

    The KL is read at ``on_train_batch_end``: the value named ``kl_key`` (``train/kl``) in the
    training step's ``outputs`` (ilvae models return their step's terms under their logged
    names), else the step value in ``trainer.callback_metrics`` (``train/kl_step`` for a value
    logged with ``on_step=True`` and ``on_epoch=True``, ``kl_key`` itself for one logged on step
    only). The values stay on the device and are averaged over ``update_every`` batches (and
    across processes); the controller then reads one number, so ``update_every=k`` costs one
    host synchronisation per k batches.

    Args:
        kl_target: KL* ≥ 0 in nats (the total KL Σ_i KL_i averaged over the batch).
        target: the hyper-parameter to control, a name the model declares schedulable
            (``beta``, ``L``, ``beta_2``, …), set through the model's ``set_hparam``.
        sign: s above; by default +1 for a name starting with ``beta`` and −1 for one
            starting with ``L``; give it for any other name.
        kp, ki: gains K_p, K_i ≥ 0 (the paper's defaults).
        min_value, max_value: bounds v_min ≤ v_max of the controlled value.
        initial: value before the first measurement, within the bounds.
        kl_key: logged metric holding the KL.
        update_every: batches per controller update.
    """

    default_target = "beta"

    def __init__(self, kl_target: float, target: str = "beta", kp: float = 0.01,
                 ki: float = 0.0001, min_value: float = 0.0, max_value: float = 1.0,
                 initial: float | None = None, kl_key: str = "train/kl",
                 update_every: int = 1, sign: int | None = None) -> None:
        super().__init__()
        self.kl_target = _number("kl_target", kl_target)
        self.target = _name("target", target)
        if sign is None:
            sign = 1 if target.startswith("beta") else -1 if target.startswith("L") else None
            if sign is None:
                check("target", target, "a name starting with 'beta' (a KL weight) or 'L' (an "
                      "inverse-Lipschitz constant), or a sign: sign=+1 (a larger value lowers "
                      "the KL) or sign=-1 (it raises the KL)")
        if sign not in (1, -1) or isinstance(sign, bool):
            check("sign", sign, "1 or -1")
        self.sign = int(sign)
        self.kp = _number("kp", kp)
        self.ki = _number("ki", ki)
        self.min_value = _number("min_value", min_value)
        self.max_value = _number("max_value", max_value, minimum=self.min_value)
        if initial is None:
            initial = min(self.min_value + 0.5 * self.kp, self.max_value)
        self.initial = _number("initial", initial, minimum=self.min_value,
                               maximum=self.max_value)
        if not isinstance(kl_key, str) or not kl_key:
            check("kl_key", kl_key, "the name of a logged metric, e.g. 'train/kl'")
        self.kl_key = kl_key
        self.update_every = check_int("update_every", update_every, minimum=1)
        self.value = self.initial
        self.integral = 0.0
        self.error: float | None = None
        self.updates = 0
        self._kl_sum: Any = 0.0
        self._kl_count = 0

    @property
    def state_key(self) -> str:
        return self._generate_state_key(target=self.target)

    def update(self, kl: float) -> float:
        """One PI step from a measured KL (nats); returns the new value. A non-finite KL is
        ignored (the state is unchanged)."""
        kl = float(kl)
        if not math.isfinite(kl):
            return self.value
        error = self.sign * (self.kl_target - kl)
        proportional = self.kp * _logistic(-error)
        integral = self.integral + error
        raw = self.min_value + proportional - self.ki * integral
        if self.ki > 0 and raw > self.max_value and error < 0:
            # Integrate only up to the integral that puts the output on the bound.
            integral = min(self.integral, (self.min_value + proportional - self.max_value)
                           / self.ki)
        elif self.ki > 0 and raw < self.min_value and error > 0:
            integral = max(self.integral, proportional / self.ki)
        raw = self.min_value + proportional - self.ki * integral
        self.integral = integral
        self.error = error
        self.updates += 1
        self.value = min(max(raw, self.min_value), self.max_value)
        return self.value

    def _read_kl(self, trainer: pl.Trainer, outputs: Any = None) -> Any:
        if isinstance(outputs, Mapping) and self.kl_key in outputs:
            return torch.as_tensor(outputs[self.kl_key]).detach()
        metrics = trainer.callback_metrics
        for key in (f"{self.kl_key}_step", self.kl_key):
            if key in metrics:
                return metrics[key].detach()
        names = set(metrics) | (set(outputs) - {"loss"} if isinstance(outputs, Mapping) else set())
        raise ConfigurationError(
            f"TargetKLController: kl_key={self.kl_key!r} was not returned or logged by the "
            f"training step; its terms and logged metrics: {', '.join(sorted(names)) or 'none'}")

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._check_target(trainer, pl_module)
        self._apply(pl_module, self.value)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                             batch: Any, batch_idx: int) -> None:
        self._apply(pl_module, self.value)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._apply(pl_module, self.value)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        self._kl_sum = self._kl_sum + self._read_kl(trainer, outputs)
        self._kl_count += 1
        if self._kl_count < self.update_every:
            return
        mean = self._kl_sum / self._kl_count
        if trainer.world_size > 1:
            mean = trainer.strategy.reduce(mean, reduce_op="mean")
        self._kl_sum, self._kl_count = 0.0, 0
        self.update(float(mean))

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value, "integral": self.integral, "error": self.error,
                "updates": self.updates, "kl_sum": float(self._kl_sum),
                "kl_count": self._kl_count}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.value = state_dict["value"]
        self.integral = state_dict["integral"]
        self.error = state_dict["error"]
        self.updates = state_dict["updates"]
        self._kl_sum = state_dict["kl_sum"]
        self._kl_count = state_dict["kl_count"]
