"""The diffusion mathematics of sigmalab, in EDM's parameterisation x = y + σ·n.

- ``preconditioning``  D(x; σ) = c_skip·x + c_out·F(c_in·x; c_noise) for each prediction target (EDM, VP, VE, ...).
- ``schedules``        the training noise-level distributions p(ln σ) (log-normal, Laplace, ..., InfoNoise).
- ``weighting``        the loss weights w(σ) applied to the denoising error ‖D − y‖².
- ``loss``             the training loss: draw σ from the schedule, noise the data, weight the error.
- ``sigma_grids``      sampling discretisations σ_0 > σ_1 > ... > σ_N = 0.
- ``samplers``         ODE/SDE samplers (EDM's Heun, ...).
- ``per_image_noise``  per-image random streams, so that image i depends only on its seed.
"""
