"""Lightning callbacks of ilvae (installed as ``ilvae.callbacks``)."""
