"""LightningModules: the model families."""

from ilvae.models.autoencoder import Autoencoder
from ilvae.models.base import LatentVariableModel
from ilvae.models.conditional import ConditionalVAE
from ilvae.models.contract import LatentTerm
from ilvae.models.hierarchical import HierarchicalVAE
from ilvae.models.lagging_vae import LaggingVAE
from ilvae.models.linear import LinearHVAE, LinearVAE
from ilvae.models.mixture import GaussianMixturePrior, MixtureVAE
from ilvae.models.mmd_vae import MMDVAE
from ilvae.models.text import TextVAE
from ilvae.models.vae import VAE

__all__ = ["MMDVAE", "VAE", "Autoencoder", "ConditionalVAE", "GaussianMixturePrior",
           "HierarchicalVAE", "LaggingVAE", "LatentTerm", "LatentVariableModel", "LinearHVAE",
           "LinearVAE", "MixtureVAE", "TextVAE"]
