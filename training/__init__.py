"""Training: the Trainer, the checkpoint format, EMA, distributed helpers, the run directory and its logger, building
a denoiser from a config, and turning a denoiser into images (shared by ``sample.py``, the Trainer's snapshot grids
and ``evaluation``).

Layer: imports ``configs``, ``diffusion``, ``models`` and ``data``; ``evaluation`` and the entry points import it.
"""
