"""What every program shares: the device mesh, orbax checkpoints, the text-conditioning glue, XLA flags."""
