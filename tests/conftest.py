"""Test-wide settings."""

import torch

# The tests train tiny networks: one thread avoids synchronisation overhead that dominates at
# these sizes on a 2-core machine (and keeps timings stable when other processes run).
torch.set_num_threads(1)
