"""The model contract: what every model family offers to the callbacks that observe or steer it.

A model offers, for a batch, one :class:`LatentTerm` per latent level (``latent_terms(batch)``):
the level's posterior and its KL against the model's own matching prior, per example and latent
dimension. Callbacks compute every collapse metric from these terms, so they never ask which
model they measure. A model also names the hyper-parameters that schedules may set
(``schedulable``) and sets and reads them by name (``set_hparam``, ``get_hparam``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor
from torch.distributions import Normal, kl_divergence

from ilvae.errors import ConfigurationError


@dataclass(frozen=True)
class LatentTerm:
    """One latent level of a batch.

    Attributes:
        name: the level's name, as in the logged metrics (``"z"``, ``"z1"``, ``"z2"``).
        posterior: q of the level, a ``Normal`` with loc/scale of shape (B, m).
        kl: KL(q(z_i|·) ‖ p(z_i|·)) against the model's own matching prior, per example and
            latent dimension, shape (B, m) (closed form where the model has one).
        kl_rest: the part of the level's KL that belongs to no latent dimension, shape (B,),
            e.g. the mixture's KL(q(c|x) ‖ p(c)); None when there is none. The level's total
            KL is Σ_i kl_i + kl_rest.
        prior_scale: η when the level's prior is N(0, η² I) and ``posterior`` is ``encode(x)``
            for the data alone (the estimators that need both, such as the relative Fisher
            divergence through ``encode`` and ``decoder``, apply); None otherwise.
    """

    name: str
    posterior: Normal
    kl: Tensor
    kl_rest: Tensor | None = None
    prior_scale: float | None = None


def two_level_terms(q1: Normal, encode_z2: Any, conditional_z1: Any,
                    prior: Any) -> list[LatentTerm]:
    """The latent terms of a two-level Markov HVAE x → z₁ → z₂ for q(z₁|x) = ``q1``, evaluated
    at the posterior means z̄₁ = E q(z₁|x) and z̄₂ = E q(z₂|z̄₁) (a reading of ours: the
    ELBO's terms integrate over z₁ and z₂, which has no closed form):

        z1:  KL(q(z₁|x) ‖ p(z₁|z̄₂))      per z₁ dimension, (B, d₁)
        z2:  KL(q(z₂|z̄₁) ‖ p(z₂))        per z₂ dimension, (B, d₂), p(z₂) = N(0, η_enc² I).

    The z₂ posterior is the one whose means the active units of z₂ are counted on."""
    q2 = encode_z2(q1.loc)
    p1 = conditional_z1(q2.loc)
    return [LatentTerm("z1", q1, kl_divergence(q1, p1)),
            LatentTerm("z2", q2, prior.kl(q2))]


class Schedulable:
    """The named hyper-parameters of a model that schedules and controllers set (β, L, β₂, L₁,
    …): a model lists them in ``schedulable`` and, where one lives in a block rather than on
    the model, says where in ``hparam_owner``; callbacks use only ``get_hparam`` and
    ``set_hparam``."""

    @property
    def schedulable(self) -> tuple[str, ...]:
        """Names of the hyper-parameters that schedules and controllers may set
        (:meth:`set_hparam`); the model logs each as ``train/<name>`` while training."""
        return ()

    def get_hparam(self, name: str) -> float:
        """The current value of the schedulable hyper-parameter ``name``."""
        owner, attribute = self.hparam_owner(self._check_schedulable(name))
        return float(getattr(owner, attribute))

    def set_hparam(self, name: str, value: float) -> None:
        """Set the schedulable hyper-parameter ``name`` to ``value``."""
        owner, attribute = self.hparam_owner(self._check_schedulable(name))
        setattr(owner, attribute, float(value))

    def schedulable_note(self, name: str) -> str:
        """Why ``name`` is not schedulable here, for the one-line refusal ('' when no reason is
        known beyond the list of names)."""
        return ""

    def hparam_owner(self, name: str) -> tuple[Any, str]:
        """(object, attribute) holding the schedulable hyper-parameter ``name``."""
        return self, name

    def _check_schedulable(self, name: str, field: str = "target") -> str:
        names = self.schedulable
        if name not in names:
            allowed = ", ".join(names) if names else "none"
            note = self.schedulable_note(name)
            raise ConfigurationError(
                f"{field}={name!r} is not allowed: expected a hyper-parameter that "
                f"{type(self).__name__} declares schedulable ({allowed}){note}")
        return name


__all__ = ["LatentTerm", "Schedulable", "two_level_terms"]
