"""Datasets: the embedded Fashion-MNIST world and image folders for real users."""
