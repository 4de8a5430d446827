"""Lightning datamodules of ilvae (installed as ``ilvae.datamodules``)."""

from .arrays import ArrayDataModule
from .base import VAEDataModule
from .conditional import ConditionalDataModule, LinearConditionalData, MNISTQuarters
from .images import MNIST, Digits, FashionMNIST
from .synthetic import LinearGaussianData
from .text import TextDataModule, Vocabulary
from .toy import TwoGaussians

__all__ = [
    "MNIST",
    "ArrayDataModule",
    "ConditionalDataModule",
    "Digits",
    "FashionMNIST",
    "LinearConditionalData",
    "LinearGaussianData",
    "MNISTQuarters",
    "TextDataModule",
    "TwoGaussians",
    "VAEDataModule",
    "Vocabulary",
]
