"""The one home of scoring: images -> experts -> fake probabilities (:mod:`scoring.pipeline`), videos as
sampled frames through the same pipeline (:mod:`scoring.video`), how good those probabilities are
(:mod:`scoring.metrics`), and submissions written from them (:mod:`scoring.submission`). ``infer.py``, training's validation, ``evaluation/`` and ``bench/`` all score
through here, so every reported number comes from the code users run."""
