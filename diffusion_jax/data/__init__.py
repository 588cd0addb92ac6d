"""Input pipelines: the embedded `digits` TFDS dataset, TFDS, image folders."""
