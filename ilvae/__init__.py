"""ilvae: variational autoencoders with plug-in decoders, for studying posterior collapse."""

__version__ = "0.1.0"
