"""Collapse metrics (torchmetrics)."""
