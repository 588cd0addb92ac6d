"""The training program (train.py): the loop, the compiled step, in-training grids and evaluation."""
