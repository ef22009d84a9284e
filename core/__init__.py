"""The ground floor: what every stage needs and nothing that knows a model.

Image decoding (:mod:`core.images`), video frames (:mod:`core.video`), lists of images and labels
(:mod:`core.image_lists`, :mod:`core.labels`), the resize and augmentation transforms (:mod:`core.transforms`), the Dataset
(:mod:`core.dataset`), face crops (:mod:`core.faces`), the torch device and threads (:mod:`core.device`),
progress bars (:mod:`core.progress`) and the one atomic file writer (:mod:`core.files`).

Imports read top to bottom: ``core`` -> ``experts`` -> ``scoring`` -> ``train`` / ``evaluation`` /
``data_prep`` -> commands. Nothing here imports from a later stage, and importing ``core`` itself costs
nothing: each module pulls in only what it uses.
"""
