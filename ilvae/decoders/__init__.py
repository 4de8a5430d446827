"""Decoders: plug-ins registered under the ``ilvae.decoders`` entry-point group.

>>> import torch
>>> from ilvae import decoders
>>> dec = decoders.build("il_brenier", latent_dim=8, data_dim=64, L=1.5)
>>> dec(torch.randn(4, 8)).shape
torch.Size([4, 64])
"""

from __future__ import annotations

import importlib
from typing import Any

from ilvae import registry
from ilvae.decoders.base import Decoder, DecoderCallable

_CLASSES = {
    "MLPDecoder": "ilvae.decoders.mlp",
    "LipschitzDecoder": "ilvae.decoders.lipschitz",
    "ILBrenierDecoder": "ilvae.decoders.il_brenier",
    "ARELBODecoder": "ilvae.decoders.ar_elbo",
    "SkipMLPDecoder": "ilvae.decoders.skip_mlp",
}

__all__ = ["Decoder", "DecoderCallable", "available", "build", "resolve", *_CLASSES]


def __getattr__(name: str) -> Any:
    # Classes are imported on first use, so `import ilvae` stays light.
    if name in _CLASSES:
        return getattr(importlib.import_module(_CLASSES[name]), name)
    raise AttributeError(f"module 'ilvae.decoders' has no attribute {name!r}")


def available() -> dict[str, type]:
    """Registered decoders that load, by entry-point name."""
    return {n: p.cls for n, p in registry.plugins().items() if p.cls is not None}


def resolve(name: str) -> type[Decoder]:
    """Decoder class for a registered name, a registered class name or a dotted class path."""
    return registry.resolve(name, base=Decoder)


def build(name: str, latent_dim: int, data_dim: int, **params: Any) -> Decoder:
    """Build a registered decoder: ``build("il_brenier", latent_dim=8, data_dim=64, L=1.5)``."""
    return resolve(name)(latent_dim, data_dim, **params)
