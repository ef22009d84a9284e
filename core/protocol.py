"""Settings that several stages must agree on, in one place.

Training validates, ``evaluation/`` measures and ``train/token_cache.py`` caches under one protocol; a
literal repeated in each would drift. Commands take these as their defaults, and a weights folder's
manifest records the values it was trained and thresholded with (read those back where they exist).
"""
from __future__ import annotations

#: Validation images of both classes are resized, then re-encoded at this JPEG quality, so a model cannot
#: score from the classes' different compression histories (the ``gan_faces`` trap).
VALIDATION_JPEG_QUALITY = 75

#: Share of each training set's groups held out for validation when no splits file is given.
VAL_FRACTION = 0.2

#: ``--device`` of every command: the GPU when there is one, else the CPU.
DEFAULT_DEVICE = "auto"

#: Share of validation reals a stored threshold calls fake (the operating point screening teams use).
THRESHOLD_FPR = 0.05
