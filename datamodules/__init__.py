"""Lightning datamodules of ilvae (installed as ``ilvae.datamodules``)."""
