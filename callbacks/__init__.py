"""Lightning callbacks of ilvae (installed as ``ilvae.callbacks``)."""

from ilvae.callbacks.annealing import InverseLipschitzAnnealing, KLAnnealing, TargetKLController
from ilvae.callbacks.collapse_monitor import CollapseMonitor
from ilvae.callbacks.denormals import FlushDenormals
from ilvae.callbacks.fault_tolerance import NonFiniteLossGuard, RandomStateCheckpoint
from ilvae.callbacks.fid import FID
from ilvae.callbacks.images import ImageLogger
from ilvae.callbacks.latent_plot import LatentPlot
from ilvae.callbacks.linear_theory import LinearTheoryMonitor
from ilvae.callbacks.summary import RunSummary

__all__ = [
    "InverseLipschitzAnnealing", "KLAnnealing", "TargetKLController",  # annealing
    "CollapseMonitor",  # collapse_monitor
    "FlushDenormals",  # denormals
    "NonFiniteLossGuard", "RandomStateCheckpoint",  # fault_tolerance
    "FID",  # fid
    "ImageLogger",  # images
    "LatentPlot",  # latent_plot
    "LinearTheoryMonitor",  # linear_theory
    "RunSummary",  # summary
]
