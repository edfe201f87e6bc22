"""Text-to-image calibration data: pipelines, generation, the embedded mini generator."""
