"""Flax modules: the ADM U-Net, the noisy classifier and GLIDE's text models."""
