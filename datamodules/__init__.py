"""Lightning datamodules of ilvae (installed as ``ilvae.datamodules``)."""

from .arrays import ArrayDataModule
from .base import VAEDataModule
from .conditional import (
    ConditionalDataModule,
    DigitsQuarters,
    LinearConditionalData,
    MNIST5kQuarters,
    MNISTQuarters,
)
from .images import MNIST, Digits, FashionMNIST, MNIST5k
from .synthetic import LinearGaussianData
from .text import TextDataModule, Vocabulary
from .toy import TwoGaussians

__all__ = [
    "MNIST",
    "MNIST5k",
    "ArrayDataModule",
    "ConditionalDataModule",
    "Digits",
    "FashionMNIST",
    "LinearConditionalData",
    "LinearGaussianData",
    "MNIST5kQuarters",
    "MNISTQuarters",
    "DigitsQuarters",
    "TextDataModule",
    "TwoGaussians",
    "VAEDataModule",
    "Vocabulary",
]
