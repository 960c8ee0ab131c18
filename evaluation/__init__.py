"""Evaluation: feature extractors (torch-fidelity's Inception, the digits classifier), reference statistics, the
sampling protocol (seeds, repeats, gathering over ranks), metrics, likelihood runs, FID-vs-kimg curves, the sweep
report and the figures (schedules, InfoNoise profiles).

Modules: ``settings`` (the ``eval`` group's defaults, metric and extractor names), ``features`` (extractors,
weights, ``extract_features``), ``frechet`` (the Fréchet distance), ``reference_stats`` (reference identity and
statistics files), ``metrics`` (``compute_metrics``, ``load_samples``), ``feature_metrics`` (metrics from features),
``dinov2`` (FD-DINOv2's network and preprocessing), ``ranks`` (splitting work over torchrun ranks, gathering features
in bounded chunks), ``samples_file`` (``eval.save_samples``, streamed), ``likelihood`` (``eval.metrics=[nll]``),
``protocol`` (seeds, repeats, baselines, ``evaluate_denoiser``, ``evaluate_during_training``), ``curves``
(``run_dir=``), ``curve_keys`` (what a curve point depends on), ``sweep`` (a sweep's runs and row labels),
``report`` and ``report_format`` (``report=<sweep>``), ``figures``, ``schedule_figure``, ``infonoise_report``,
``digits_classifier``, and ``run`` (the modes of ``evaluate.py``).

Layer: imports ``configs``, ``diffusion``, ``models``, ``data`` and ``training``; only the entry points import it.
"""
