"""The sampling program (sample.py): options, validation, sharded generation, output files."""
