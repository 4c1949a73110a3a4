"""Checkpoint layouts of other tools, which compress writes (``compress export``) and reads (``compress.load``):
each module packs and unpacks one layout's tensors and says what of a compress layer it cannot express."""
