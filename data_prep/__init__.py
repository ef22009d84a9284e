"""Data preparation: reading labelled image lists, loading images safely, and augmentations."""
