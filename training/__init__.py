"""Training ManTraNet: the data it learns from.

``training.synthetic``: forgeries made on demand from authentic photographs (copy-move, splice, removal,
enhancement; polygon, Bezier and blob masks), seeded per sample, and ``write_synthetic`` (``mantranet synth``).
``training.data``: the PyTorch side: random native-resolution crops of a dataset ``evaluate`` reads, or of
synthetic forgeries, as a map-style ``Dataset``, with an ``EpochSampler`` that shards and resumes.
"""
