"""Fake-quantization engine: quantizers, model transform, block reconstruction, BN inversion."""
