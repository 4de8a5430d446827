"""Lightning callbacks of ilvae (installed as ``ilvae.callbacks``)."""

from ilvae.callbacks.annealing import InverseLipschitzAnnealing, KLAnnealing, TargetKLController

__all__ = [
    "InverseLipschitzAnnealing", "KLAnnealing", "TargetKLController",  # annealing
]
