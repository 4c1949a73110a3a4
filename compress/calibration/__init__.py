"""Calibration: reading and packing calibration text, and the layer-wise engine that walks decoder blocks."""
