"""The ``mantranet`` command: the one place where the model, converter, reference and parity tools meet."""
