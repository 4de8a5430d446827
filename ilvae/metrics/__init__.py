"""Collapse metrics (torchmetrics)."""

from ilvae.metrics.active_units import ActiveUnits
from ilvae.metrics.cluster_accuracy import ClusterAccuracy
from ilvae.metrics.epsilon_collapse import EpsilonCollapse
from ilvae.metrics.iw_nll import ImportanceWeightedNLL
from ilvae.metrics.kl_per_dimension import KLPerDimension
from ilvae.metrics.mutual_information import MutualInformation
from ilvae.metrics.relative_fisher import RelativeFisherDivergence
from ilvae.metrics.term_means import TermMeans
from ilvae.metrics.text_nll import TextNLL

__all__ = [
    "ActiveUnits",
    "ClusterAccuracy",
    "EpsilonCollapse",
    "ImportanceWeightedNLL",
    "KLPerDimension",
    "MutualInformation",
    "RelativeFisherDivergence",
    "TermMeans",
    "TextNLL",
]
