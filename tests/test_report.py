"""Tests of ``evaluate.py report=<sweep>``: the papers' tables from a sweep's FID curves.

Fake sweeps are written here the way train.py and ``evaluate.py run_dir=`` write them: ``config.yaml`` composed from
the real configs (presets included), ``.hydra/hydra.yaml`` with the job number, and ``fid_curve.jsonl`` lines in
run_curves' format with hand-chosen FID values. Expected numbers are computed here by hand: means, sample standard
deviations, log-linear crossings of the target, speed-ups; the published numbers are read from the preset files.
One end-to-end test trains two real tiny runs (a Hydra multirun), evaluates their checkpoints and reports them.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from configs import jsonable
from evaluation.curves import curve_baseline, run_curves, settings_key
from evaluation.curves import curve_settings as curve_settings_of
from evaluation.report import collect_report, sweep_report
from evaluation.report_format import kimg_header
from evaluation.run import run_evaluation
from evaluation.settings import eval_settings
from evaluation.sweep import report_rows
from tests.helpers import CONFIG_DIR, FAST_TRAIN, compose, run_cli

DIGITS_KEY = "fid_digits_classifier"
INCEPTION_KEY = "fid_inception"


def write_run(run_dir, overrides, curve, *, job=None, num_samples=100, sampler=None, key=DIGITS_KEY, extra=None):
    """A finished run as train.py leaves it (config.yaml, checkpoints/) plus the fid_curve.jsonl lines
    ``evaluate.py run_dir=`` appends: ``curve`` maps kimg -> metric value; ``sampler`` = evaluation-time overrides."""
    cfg = compose("train", [f"run_dir='{run_dir}'", *overrides])
    run_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
    if job is not None:  # what Hydra's multirun records for the job
        (run_dir / ".hydra").mkdir(exist_ok=True)
        (run_dir / ".hydra" / "hydra.yaml").write_text(f"hydra:\n  job:\n    name: train\n    num: {job}\n")
        OmegaConf.save(cfg, run_dir / ".hydra" / "config.yaml")  # must not be taken for a run of its own
    (run_dir / "checkpoints").mkdir(exist_ok=True)
    settings = eval_settings({"num_samples": num_samples})
    sampler_cfg = OmegaConf.merge(cfg.sampler, sampler or {})
    curve_settings = curve_settings_of(settings, cfg.data, sampler_cfg, True)
    with open(run_dir / "fid_curve.jsonl", "a") as f:
        for kimg, value in curve.items():
            nimg = round(kimg * 1000)
            (run_dir / "checkpoints" / f"checkpoint-{nimg:010d}.pt").touch()
            entry = {"run": run_dir.name, "checkpoint": f"checkpoint-{nimg:010d}.pt", "nimg": nimg,
                     "kimg": nimg / 1000, "settings_key": settings_key(curve_settings),
                     "metrics": {key: value, **(extra or {})}, "num_samples": num_samples,
                     "seeds": [0, num_samples - 1], "repeats": [{"seeds": [0, num_samples - 1],
                                                                 "metrics": {key: value}}],
                     "likelihood": None, "settings": curve_settings, "seconds": 1.0, "time": "2026-01-01 00:00:00"}
            f.write(json.dumps(jsonable(entry), allow_nan=False) + "\n")
    return run_dir


# Two schedules x two seeds on the digits; directory names deliberately say nothing about the schedule.
CURVES = {("lognormal", 0): {30: 40.0, 60: 20.0, 90: 10.0}, ("lognormal", 1): {30: 44.0, 60: 24.0, 90: 12.0},
          ("laplace", 0): {30: 30.0, 60: 12.0, 90: 8.0}, ("laplace", 1): {30: 34.0, 60: 16.0, 90: 9.0}}


@pytest.fixture
def sweep(tmp_path):
    root = tmp_path / "sweep"
    for job, ((schedule, seed), curve) in enumerate(CURVES.items()):
        write_run(root / f"job{job}", ["experiment=schedule_sweep_digits", f"schedule={schedule}", f"seed={seed}"],
                  curve, job=job, sampler={"num_steps": 5})
    return root


def mean_std(values):
    return statistics.mean(values), statistics.stdev(values)


def cell(values, bold=False):
    m, s = mean_std(values)
    text = f"**{m:.2f}**" if bold else f"{m:.2f}"
    return f"{text} ± {s:.2f} ({len(values)})"


def loglinear_crossing(k0, v0, k1, v1, target):
    return k0 + (k1 - k0) * math.log(v0 / target) / math.log(v0 / v1)


def test_sweep_report_tables_target_and_plot(sweep, capsys):
    cfg = compose("evaluate", [f"report={sweep}", "eval.baseline_run=lognormal"])
    report = run_evaluation(cfg)
    out = sweep / "report"
    md = (out / "report.md").read_text()
    assert report["markdown"] == md and md in capsys.readouterr().out

    # One table (one data config), rows from the configs' schedule names, in the sweep's job order.
    (table,) = report["tables"]
    assert table["title"] == "digits" and table["columns"] == ["schedule"]
    assert table["order"] == ["lognormal", "laplace"]
    assert sorted(r["seed"] for r in table["rows"]["laplace"]["runs"]) == [0, 1]

    # FID vs kimg: columns = the checkpoints' kimg, cells mean ± std over the two seeds (laplace is best everywhere).
    assert "| schedule | 30 kimg | 60 kimg | 90 kimg |" in md
    per_kimg = {s: [[CURVES[(s, seed)][k] for seed in (0, 1)] for k in (30, 60, 90)] for s in ("lognormal", "laplace")}
    assert "| lognormal | " + " | ".join(cell(v) for v in per_kimg["lognormal"]) + " |" in md
    assert "| laplace | " + " | ".join(cell(v, bold=True) for v in per_kimg["laplace"]) + " |" in md
    # Setup line: data, model, budget, the evaluation sampler (5 Heun steps = 9 NFE), samples, features.
    assert ("Setup: data digits 8x8x1, unconditional; model unet_tiny; budget 150 kimg, batch 128, lr 0.002; sampler "
            "heun, 5 steps, 9 NFE; FID: 100 samples per point, digits-classifier features") in md

    # Final table.
    assert "| schedule | final kimg | `fid_digits_classifier` |" in md
    assert f"| laplace | 90 | {cell(per_kimg['laplace'][2], bold=True)} |" in md

    # Images to target: target = lognormal's final seed mean (11); laplace's seed mean (32, 14, 8.5) crosses it
    # between 60 and 90 kimg (log-linear), lognormal exactly at 90.
    (variant,) = report["tables"][0]["variants"]
    target = statistics.mean([10.0, 12.0])
    assert variant["target"]["target"] == pytest.approx(target)
    lap = [statistics.mean(v) for v in per_kimg["laplace"]]
    k_lap = loglinear_crossing(60, lap[1], 90, lap[2], target)
    rows = variant["rows"]
    assert rows["lognormal"]["target"]["kimg"] == pytest.approx(90.0)
    assert rows["laplace"]["target"]["kimg"] == pytest.approx(k_lap)
    assert rows["laplace"]["target"]["speedup"] == pytest.approx(90.0 / k_lap)
    per_seed = [loglinear_crossing(60, CURVES[("laplace", s)][60], 90, CURVES[("laplace", s)][90], target)
                for s in (0, 1)]
    assert rows["laplace"]["target"]["per_seed_kimg"] == pytest.approx(per_seed)
    m, s = mean_std(per_seed)
    assert (f"| laplace | 90 | {lap[2]:.4g} | {k_lap:.1f} | {m:.2f} ± {s:.2f} (2/2) | {90 / k_lap:.2f}x |") in md
    assert "| lognormal (baseline) | 90 | 11 | 90.0 |" in md and "1.00x |" in md
    # Without eval.baseline_run the row labelled lognormal is the baseline; eval.target_fid overrides the target.
    again = collect_report(sweep, {"target_fid": 20.0})
    v = again["tables"][0]["variants"][0]
    assert again["tables"][0]["baseline"] == "lognormal" and v["target"]["target"] == 20.0
    assert v["rows"]["lognormal"]["target"]["kimg"] == pytest.approx(loglinear_crossing(60, 22.0, 90, 11.0, 20.0))
    assert v["rows"]["laplace"]["target"]["kimg"] == pytest.approx(loglinear_crossing(30, 32.0, 60, 14.0, 20.0))

    # report.json holds the same numbers; the plot is a PNG.
    data = json.loads((out / "report.json").read_text())
    points = data["tables"][0]["variants"][0]["rows"]["laplace"]["points"]
    assert [p["kimg"] for p in points] == [30, 60, 90]
    assert points[1]["mean"] == pytest.approx(14.0) and points[1]["std"] == pytest.approx(math.sqrt(8.0))
    assert sorted(points[1]["values"]) == [12.0, 16.0] and points[1]["n"] == 2
    png = (out / "fid_vs_kimg.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_curve_baseline_names_a_row(sweep):
    """`evaluate.py run_dir=<sweep> eval.baseline_run=lognormal`: with two seeds of lognormal the per-run table has no
    single baseline run (and says so) instead of failing after the evaluation; run names still work."""
    runs = {p.name: p for p in sorted(sweep.iterdir())}
    baseline, note = curve_baseline("lognormal", runs, sweep)
    assert baseline is None and "is the setting of 2 runs (seeds)" in note and f"report={sweep}" in note
    assert curve_baseline("job2", runs, sweep) == ("job2", None)
    assert curve_baseline("nope", runs, sweep) == ("nope", None)  # target_table's error lists the runs


def test_extra_metrics_incomplete_curves_and_out(sweep, tmp_path):
    # `evaluate.py ckpt=<run> eval=nll` writes eval-nll.json into the run: its metrics become final-table columns.
    bpd = {"job0": 0.30, "job1": 0.34, "job2": 0.25}
    for name, value in bpd.items():
        (sweep / name / "eval-nll.json").write_text(json.dumps(
            {"metrics": {"nll_elbo_bpd": value, "nll_elbo_bpd_sem": 0.01}, "ckpt": str(sweep / name)}))
    # A checkpoint the curve does not cover yet.
    (sweep / "job3" / "checkpoints" / "checkpoint-0000120000.pt").touch()
    report = sweep_report(sweep, out_dir=tmp_path / "elsewhere")
    md = (tmp_path / "elsewhere" / "report.md").read_text()
    assert not (sweep / "report").exists()
    assert "| schedule | final kimg | `fid_digits_classifier` | nll_elbo_bpd (eval-nll) |" in md
    m, s = mean_std([0.30, 0.34])
    assert md.count(f"| {m:.3f} ± {s:.3f} (2) |") == 1 and "| 0.250 (1) |" in md  # 3 significant digits below 1
    assert "nll_elbo_bpd_sem" not in md
    assert any("job3: the curve covers 3 of its 4 checkpoints" in n for n in report["notes"])


def test_paper_columns_guidance_variants_and_row_labels(tmp_path):
    """Hang et al.'s Table 2 layout: rows = schedule (+ weighting), columns = guidance, the published FID beside."""
    root = tmp_path / "hang"
    presets = {"cosine": 0, "min_snr": 1, "laplace": 2}
    measured = {("cosine", 1.5): 30.0, ("cosine", 3.0): 20.0, ("min_snr", 1.5): 28.0, ("min_snr", 3.0): 19.0,
                ("laplace", 1.5): 25.0, ("laplace", 3.0): 15.0}
    for name, job in presets.items():
        for guidance in (3.0, 1.5):  # the preset's own guidance (3.0) and an override
            write_run(root / f"r{job}", [f"experiment=hang2024_imagenet256_{name}"],
                      {6400: 2 * measured[(name, guidance)], 12800: measured[(name, guidance)]}, job=job,
                      num_samples=50, key=INCEPTION_KEY, sampler={"guidance": guidance})
    report = sweep_report(root)
    md = report["markdown"]
    (table,) = report["tables"]
    assert table["columns"] == ["schedule", "weighting"]  # the Laplace preset's sampler.t_max splits no row
    assert table["order"] == ["cosine/v_mse", "cosine/min_snr", "laplace/v_mse"]
    assert [v["label"] for v in table["variants"]] == ["guidance=1.5", "guidance=3"]
    assert ("| schedule | weighting | final kimg | `fid_inception` (guidance=1.5) | paper | `fid_inception` "
            "(guidance=3) | paper |") in md
    for name in presets:
        paper = OmegaConf.load(CONFIG_DIR / "experiment" / f"hang2024_imagenet256_{name}.yaml").paper.fid
        weighting = "min_snr" if name == "min_snr" else "v_mse"
        schedule = "laplace" if name == "laplace" else "cosine"
        best = name == "laplace"
        cells = [f"**{measured[(name, g)]:.2f}** (1)" if best else f"{measured[(name, g)]:.2f} (1)" for g in (1.5, 3.0)]
        assert (f"| {schedule} | {weighting} | 12800 | {cells[0]} | {paper[1.5]:g} | {cells[1]} | {paper[3.0]:g} |"
                in md)
    # 12800 kimg at batch 256 = 50K iterations; the setup names the 50-step DDIM sampler (guided: 100 NFE).
    assert "| schedule | weighting | 6400 kimg (25K it) | 12800 kimg (50K it) |" in md
    assert "sampler ddim, 50 steps, 100 NFE, guidance 1.5" in md and "Inception-v3 features" in md
    assert "Paper numbers: Hang et al. 2024, Table 2" in md
    # No lognormal row and no eval.baseline_run: target = the largest best value, no speed-ups.
    assert table["baseline"] is None and "no baseline row" in md
    # A row label names the baseline on the command line: the speed-ups of Table 2's rows against cosine.
    report = run_evaluation(compose("evaluate", [f"report={root}", "eval.baseline_run=cosine/v_mse"]))
    rows = report["tables"][0]["variants"][1]["rows"]  # guidance 3: cosine 40 -> 20, laplace 30 -> 15 (target 20)
    assert report["tables"][0]["baseline"] == "cosine/v_mse" and rows["cosine/v_mse"]["target"]["kimg"] == 12800
    k_lap = loglinear_crossing(6400, 30.0, 12800, 15.0, 20.0)
    assert rows["laplace/v_mse"]["target"]["speedup"] == pytest.approx(12800 / k_lap)
    # Evaluation settings on the report's command line select those points: here only guidance 3.
    args = [f"report={root}", "sampler.guidance=3.0", "eval.num_samples=50"]
    report = run_evaluation(compose("evaluate", args), args)
    assert [v["label"] for v in report["tables"][0]["variants"]] == [""]
    assert report["tables"][0]["variants"][0]["guidance"] == 3.0
    args = [f"report={root}", "eval.num_samples=10000"]
    with pytest.raises(ValueError, match="no curve points of imagenet256_latent were evaluated with num_samples=10000 "
                                         r"\(num_samples evaluated: 50\)"):
        run_evaluation(compose("evaluate", args), args)
    with pytest.raises(ValueError, match=r"eval.baseline_run='edm' names no row of the report; rows: imagenet256"
                                         r".*cosine/v_mse, cosine/min_snr, laplace/v_mse"):
        collect_report(root, {"baseline_run": "edm"})


def test_paper_by_kimg_and_speedup_columns(tmp_path):
    """The prediction-target study (FID by training iteration, published numbers beside each column) and
    InfoNoise's published speed-up."""
    root = tmp_path / "target"
    for job, name in enumerate(("v_cosine", "v_laplace")):
        write_run(root / name, [f"experiment=hang2024_imagenet256_target_{name}"],
                  {25600: 40.0 - 10 * job, 51200: 20.0 - 5 * job}, job=job, num_samples=50, key=INCEPTION_KEY)
    md = sweep_report(root)["markdown"]
    assert "| schedule | 25600 kimg (100K it) | paper | 51200 kimg (200K it) | paper |" in md
    for job, name in enumerate(("v_cosine", "v_laplace")):
        paper = OmegaConf.load(CONFIG_DIR / "experiment" / f"hang2024_imagenet256_target_{name}.yaml").paper
        row = name.split("_")[1]
        a, b = f"{40.0 - 10 * job:.2f} (1)", f"{20.0 - 5 * job:.2f} (1)"
        a, b = (f"**{a[:5]}**{a[5:]}", f"**{b[:5]}**{b[5:]}") if job else (a, b)
        assert f"| {row} | {a} | {paper.fid_by_kimg[25600]:g} | {b} | {paper.fid_by_kimg[51200]:g} |" in md

    root = tmp_path / "infonoise"
    for job, name in enumerate(("edm_cifar10_vp_uncond", "infonoise_cifar10")):
        write_run(root / f"r{job}", [f"experiment={name}"], {2500: 10.0, 5000: 5.0 - job}, job=job,
                  num_samples=50, key=INCEPTION_KEY)
    report = sweep_report(root)
    md = report["markdown"]
    assert report["tables"][0]["order"] == ["lognormal", "infonoise"] and report["tables"][0]["baseline"] == "lognormal"
    assert "| schedule | final kimg | `fid_inception` | paper |" in md
    assert "| lognormal | 5000 | 5.00 (1) | 1.97 |" in md and "| infonoise | 5000 | **4.00** (1) | — |" in md
    assert "| paper speed-up |" in md and "| 1.4x vs lognormal |" in md


def test_row_labels_from_configs():
    def cfgs(*overrides):
        return [OmegaConf.to_container(compose("train", list(o)), resolve=False) for o in overrides]

    # The prediction-target study: precond and schedule vary; weighting follows precond and is left out.
    labels, aspects, columns = report_rows(cfgs(*([f"experiment=hang2024_imagenet256_target_{t}_{s}"]
                                                  for t in ("eps", "x0") for s in ("cosine", "laplace"))))
    assert columns == ["schedule", "precond"]
    assert labels == ["cosine/eps", "laplace/eps", "cosine/x0", "laplace/x0"]
    # A single key varied (learning rate) next to the schedule; seeds share a row label.
    labels, aspects, columns = report_rows(cfgs(["schedule=laplace", "train.lr=0.001", "seed=0"],
                                                ["schedule=laplace", "train.lr=0.001", "seed=1"],
                                                ["schedule=laplace", "train.lr=0.002"],
                                                ["schedule=cauchy", "train.lr=0.002"]))
    assert columns == ["schedule", "train.lr"]
    assert labels == ["laplace/train.lr=0.001"] * 2 + ["laplace/train.lr=0.002", "cauchy/train.lr=0.002"]
    assert aspects[0] == {"schedule": "laplace", "train.lr": "0.001"}
    # The fair-comparison sweep: a setting most runs share is left out of the labels (not of the columns), so the
    # plain arms keep their schedule's name and eval.baseline_run=lognormal names one row.
    arms = [["schedule=" + s] for s in ("lognormal", "laplace", "infonoise")]
    labels, aspects, columns = report_rows(cfgs(*arms, ["schedule=laplace", "schedule.snr_reference=data"],
                                                ["schedule=lognormal", "train.sigma_draw=stratified"]))
    assert columns == ["schedule", "schedule.snr_reference", "train.sigma_draw"]
    assert labels == ["lognormal", "laplace", "infonoise", "laplace/schedule.snr_reference=data",
                      "lognormal/train.sigma_draw=stratified"]
    assert aspects[0] == {"schedule": "lognormal", "schedule.snr_reference": "unit", "train.sigma_draw": "iid"}
    # Nothing but the seed (and bookkeeping such as the tick length) varies: one row, named by its schedule.
    labels, _, columns = report_rows(cfgs(["seed=0"], ["seed=1", "train.tick_kimg=5"]))
    assert labels == ["lognormal", "lognormal"] and columns == ["schedule"]


def test_sweep_of_sweeps_and_errors(tmp_path, sweep):
    # runs/repro holding a digits and a binary-digits sweep: one table per data config.
    root = tmp_path / "repro"
    for data in ("digits", "binary_digits"):
        for job, schedule in enumerate(("lognormal", "cosine")):
            write_run(root / data / schedule, [f"data={data}", f"schedule={schedule}"], {1: 50.0 - job, 2: 30.0},
                      job=job)
    report = collect_report(root)
    assert [t["title"] for t in report["tables"]] == ["binary_digits", "digits"]
    assert all(t["order"] == ["lognormal", "cosine"] for t in report["tables"])

    # Runs without curves: the error says what to run.
    bare = tmp_path / "bare"
    for name in ("a", "b"):
        (bare / name / "checkpoints").mkdir(parents=True)
        (bare / name / "checkpoints" / "checkpoint-0000000128.pt").touch()
        OmegaConf.save(compose("train", [f"run_dir={bare / name}"]), bare / name / "config.yaml", resolve=True)
    with pytest.raises(FileNotFoundError, match=rf"2 of 2 runs under {bare} have no FID curve \(fid_curve.jsonl\): a,"
                                                rf" b\. Evaluate their checkpoints first: python evaluate.py "
                                                rf"run_dir={bare}"):
        run_evaluation(compose("evaluate", [f"report={bare}"]))
    with pytest.raises(ValueError, match="no runs under"):
        collect_report(tmp_path / "bare" / "a" / "checkpoints")
    with pytest.raises(FileNotFoundError, match="sweep directory not found"):
        collect_report(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="report=.* is a mode of its own: drop run_dir="):
        run_evaluation(compose("evaluate", [f"report={sweep}", f"run_dir={sweep}"]))
    with pytest.raises(ValueError, match="report=infonoise needs run_dir="):
        run_evaluation(compose("evaluate", ["report=infonoise"]))
    with pytest.raises(ValueError, match="no InfoNoise run"):
        run_evaluation(compose("evaluate", ["report=infonoise", f"run_dir={sweep}"]))
    with pytest.raises(ValueError, match="eval.curve_metric='kid_x' is not among the evaluated metrics"):
        collect_report(sweep, {"curve_metric": "kid_x"})


def test_schedules_report(tmp_path):
    """report=schedules: the schedules figure and table (evaluation/schedule_figure.py) into out=."""
    out = run_evaluation(compose("evaluate", ["report=schedules", f"out={tmp_path / 'figures'}"]))
    assert sorted(Path(p).name for p in out["files"].values()) == ["schedules.md", "schedules.png"]
    assert "laplace" in (tmp_path / "figures" / "schedules.md").read_text()


def test_end_to_end_two_real_runs(tmp_path):
    """train.py -m (two schedules) -> run_dir= evaluation of every checkpoint (run_curves) -> report=."""
    sweep = tmp_path / "sweep"
    run_cli("train.py", "-m", f"hydra.sweep.dir={sweep}", "schedule=lognormal,cosine", *FAST_TRAIN, "device=cpu",
            timeout=300)
    cfg = compose("evaluate", [f"run_dir={sweep}", "eval.num_samples=20", "sampler.num_steps=3", "device=cpu",
                               "eval.baseline_run=lognormal"])
    curves = run_curves(cfg, ["sampler.num_steps=3"])
    # The per-run table takes the row label `lognormal` for the one run trained with it (Hydra names it by overrides).
    assert "schedule=lognormal" in curves["summary"]["baseline"]
    assert curves["summary"]["rows"][curves["summary"]["baseline"]]["speedup"] == pytest.approx(1.0)
    run_evaluation(compose("evaluate", [f"report={sweep}", "eval.baseline_run=lognormal"]))
    md = (sweep / "report" / "report.md").read_text()
    assert (sweep / "report" / "fid_vs_kimg.png").is_file()

    # Independent reading of what the runs wrote: each run's schedule from its config.yaml, its points from its
    # fid_curve.jsonl; one seed per row, so each cell is that value (FID > 100 at this budget: one decimal).
    runs = [p.parent for p in sweep.glob("*/config.yaml")]
    assert len(runs) == 2
    values = {}
    for run in runs:
        schedule = OmegaConf.load(run / "config.yaml").schedule.name
        values[schedule] = [json.loads(line)["metrics"][DIGITS_KEY]
                            for line in (run / "fid_curve.jsonl").read_text().splitlines()]
        assert len(values[schedule]) == 2  # checkpoints at 0.128 and 0.256 kimg
    assert "| schedule | 0.128 kimg | 0.256 kimg |" in md
    for schedule, row in values.items():
        best = [v == min(values[s][i] for s in values) for i, v in enumerate(row)]
        cells = [(f"**{v:.1f}**" if b else f"{v:.1f}") + " (1)" for v, b in zip(row, best)]
        assert f"| {schedule} | {cells[0]} | {cells[1]} |" in md
    assert md.index("| lognormal |") < md.index("| cosine |")  # the sweep's job order
    assert f"≤ {values['lognormal'][-1]:.4g}" in md and "| lognormal (baseline) | 0.256 |" in md
    assert "sampler heun, 3 steps, 5 NFE; FID: 20 samples per point" in md


def test_infonoise_report_of_a_sweep(tmp_path):
    """report=infonoise run_dir=<sweep>: the profile figure of every InfoNoise run below it (here 1 of 2)."""
    sweep = tmp_path / "sweep"
    write_run(sweep / "lognormal", ["schedule=lognormal"], {1: 10.0})
    run_cli("train.py", f"run_dir={sweep / 'info'}", "schedule=infonoise", "schedule.warmup_steps=2",
            "schedule.refresh_every=2", "schedule.min_count=1", *FAST_TRAIN, "device=cpu", timeout=300)
    out = run_evaluation(compose("evaluate", ["report=infonoise", f"run_dir={sweep}"]))
    assert out["files"] == [str(sweep / "info" / "infonoise_profile.png")]
    assert (sweep / "info" / "infonoise_profile.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(("kimg", "batch", "header"), [
    (30.08, 128, "30.1 kimg"),                  # a checkpoint lands on a whole batch: 235 x 128 images
    (150.016, 128, "150 kimg (1.172K it)"),     # 1172 iterations exactly
    (12800.0, 256, "12800 kimg (50K it)"),
    (0.128, 64, "0.128 kimg"),                  # below 10 kimg: four significant digits, no iteration count
])
def test_kimg_column_headers(kimg, batch, header):
    assert kimg_header(kimg, batch) == header
