"""Evaluation: feature extractors (torch-fidelity's Inception, the digits classifier), reference statistics, the
sampling protocol (seeds, repeats, gathering over ranks), metrics, likelihood runs, FID-vs-kimg curves, the sweep
report and the figures (schedules, InfoNoise profiles).

Layer: imports ``configs``, ``diffusion``, ``models``, ``data`` and ``training``; only the entry points import it.
"""
