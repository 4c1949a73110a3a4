"""The evaluation harness (installed as ``compress.eval``): perplexity, outputs side by side, memory and
generation speed of a compressed model against its original."""
