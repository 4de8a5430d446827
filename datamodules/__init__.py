"""Lightning datamodules of ilvae (installed as ``ilvae.datamodules``)."""

from .arrays import ArrayDataModule
from .base import VAEDataModule
from .images import MNIST, Digits, FashionMNIST
from .text import TextDataModule, Vocabulary
from .toy import TwoGaussians

__all__ = [
    "MNIST",
    "ArrayDataModule",
    "Digits",
    "FashionMNIST",
    "TextDataModule",
    "TwoGaussians",
    "VAEDataModule",
    "Vocabulary",
]
