"""Checkpoint evaluation: exact NLL in bits/dim and sample metrics."""
