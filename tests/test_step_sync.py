"""The training step never waits for the device between boundaries, and its fused updates keep the numbers.

A host read of a device value (``t.item()``, ``bool(t)``, ``float(t)``, ``t.tolist()``, ``t.cpu()``) stalls a GPU
run until the device catches up. The probe below counts every such call on the real ``Trainer`` on the CPU (no CUDA
needed: the calls are the same, only their cost differs), outside the boundary work (tick, grid, checkpoint, the
non-finite report). The fused EMA and the foreach / fused Adam paths are compared with plain per-parameter loops.
"""

from __future__ import annotations

import copy
import traceback

import pytest
import torch

from tests.helpers import FAST_TRAIN, compose
from training.distributed import init_distributed
from training.ema import EMA
from training.step_checks import _masked_step
from training.trainer import Trainer

# 16 steps of 32 images; a tick every 4 steps, a checkpoint every 8: 12 of the 16 steps are not boundaries.
SYNC_RUN = [*FAST_TRAIN, "train.total_kimg=0.512", "train.tick_kimg=0.128", "train.checkpoint_kimg=0.256"]

_READS = ("item", "__bool__", "__float__", "tolist", "cpu")


class HostReadProbe:
    """Counts the host reads of tensors while ``active``, except those ``ignore(tensor)`` exempts, and those made by
    the DataLoader's machinery (``torch.utils.data``: the sampler's index permutation and the dataset run on the host,
    or in worker processes, and never touch the device)."""

    def __init__(self, monkeypatch, ignore=lambda t: False):
        self.active, self.calls, self.ignore = False, [], ignore
        for name in _READS:
            original = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._wrap(name, original))

    def _wrap(self, name, original):
        def probe(tensor, *args, **kwargs):
            if self.active and not self.ignore(tensor):
                stack = traceback.extract_stack()[:-1]
                if not any("torch/utils/data/" in frame.filename.replace("\\", "/") for frame in stack):
                    self.calls.append((name, "".join(traceback.format_list(stack[-6:]))))
            return original(tensor, *args, **kwargs)

        return probe

    def paused(self, fn):
        def run(*args, **kwargs):
            was, self.active = self.active, False
            try:
                return fn(*args, **kwargs)
            finally:
                self.active = was

        return run


def test_the_probe_sees_every_kind_of_host_read(monkeypatch):
    """The probe must catch what the old step did every step (``bool(torch.isfinite(loss))``), or the next test
    could not fail."""
    probe = HostReadProbe(monkeypatch)
    x = torch.ones(2)
    probe.active = True
    bool(torch.isfinite(x).all())
    x.sum().item()
    float(x.sum())
    x.tolist()
    x.cpu()
    probe.active = False
    assert sorted(name for name, _ in probe.calls) == sorted(_READS)


def test_no_host_read_between_boundaries_on_the_real_trainer(tmp_path, monkeypatch):
    cfg = compose("train", [f"run_dir={tmp_path}", *SYNC_RUN])
    trainer = Trainer(cfg, init_distributed("cpu"))

    def host_counter(t):
        """A step counter of the foreach Adam: a CPU tensor by design, on a GPU too (read without a device wait)."""
        state = getattr(trainer, "optimizer", None)
        return state is not None and any(t is s.get("step") for s in trainer.optimizer.state.values())

    probe = HostReadProbe(monkeypatch, ignore=host_counter)
    boundaries = []
    original_loop, original_boundary = trainer._loop, trainer._boundary

    def loop(*args):
        probe.active = True
        try:
            return original_loop(*args)
        finally:
            probe.active = False

    def boundary(prev_nimg, stop):
        due = original_boundary(prev_nimg, stop)
        boundaries.append(due)
        return due

    trainer._loop, trainer._boundary = loop, boundary
    trainer._periodic = probe.paused(trainer._periodic)
    trainer._report_nonfinite = probe.paused(trainer._report_nonfinite)
    trainer.run(tmp_path)

    assert len(boundaries) == 16 and boundaries.count(True) == 4, boundaries
    where = "\n".join(f"{name}:\n{stack}" for name, stack in probe.calls[:3])
    assert not probe.calls, f"{len(probe.calls)} host reads between boundaries, first ones:\n{where}"
    # The run itself is the ordinary one: ticks logged, the final checkpoint written.
    assert (tmp_path / "metrics.jsonl").read_text().count('"loss"') == 4


def test_fused_ema_is_bit_identical_to_a_per_parameter_loop():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.Linear(6, 5))
    ema = EMA(net, halflife_kimg=0.5, rampup_ratio=0.05)
    reference = copy.deepcopy(net)
    for step in range(1, 25):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
        net(torch.randn(4, 3, 8, 8))  # BatchNorm's running statistics: buffers, copied
        beta = ema.update(net, step * 64, 64)
        with torch.no_grad():  # EDM's update, one parameter at a time
            for p_ema, p in zip(reference.parameters(), net.parameters()):
                p_ema.lerp_(p, 1.0 - beta)
            for b_ema, b in zip(reference.buffers(), net.buffers()):
                b_ema.copy_(b)
    for (name, a), b in zip(ema.model.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(a, b), name


def _adam_run(steps, **kwargs):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s)) for s in [(16, 3, 3, 3), (16,), (10, 16)]]
    optimizer = torch.optim.Adam(params, lr=1e-2, **kwargs)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        optimizer.step()
    return params, optimizer


def test_foreach_adam_is_bit_identical_to_the_per_parameter_loop():
    """The CPU default (foreach) gives PyTorch's per-parameter Adam bit for bit: runs and resumes keep their numbers."""
    loop, _ = _adam_run(10, foreach=False)
    multi, _ = _adam_run(10, foreach=True)
    assert all(torch.equal(a, b) for a, b in zip(loop, multi))


@pytest.mark.parametrize("fresh", [False, True], ids=["mid-run", "first step"])
def test_masked_step_undoes_a_bad_step_exactly(fresh):
    """nonfinite=skip on the CPU: the step taken and undone on the device leaves parameters, moments and step count
    exactly as if it never happened — also on the first step, whose state the step itself creates."""
    params, optimizer = _adam_run(0 if fresh else 3, foreach=True)
    before = [p.detach().clone() for p in params]
    state_before = copy.deepcopy(optimizer.state_dict()["state"])
    for p in params:
        p.grad = torch.full_like(p, float("nan"))
    _masked_step(optimizer, torch.tensor(True))
    assert all(torch.equal(a, b) for a, b in zip(before, params))
    for i, p in enumerate(params):
        state = optimizer.state[p]
        old = state_before.get(i, {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p),
                                   "exp_avg_sq": torch.zeros_like(p)})
        assert all(torch.equal(state[k], old[k]) for k in ("step", "exp_avg", "exp_avg_sq"))
    # A good step through the same path is the plain step.
    reference = copy.deepcopy(optimizer)
    ref_params = [group_p for group in reference.param_groups for group_p in group["params"]]
    grads = [torch.randn_like(p) for p in params]
    for p, q, g in zip(params, ref_params, grads):
        p.grad, q.grad = g.clone(), g.clone()
    _masked_step(optimizer, torch.tensor(False))
    reference.step()
    assert all(torch.equal(p, q) for p, q in zip(params, ref_params))


def test_fused_adam_skips_on_found_inf():
    """The CUDA path of nonfinite=skip (fused Adam, CPU kernel here): found_inf = 1 leaves everything unchanged."""
    params, optimizer = _adam_run(3, fused=True)
    before = [p.detach().clone() for p in params]
    steps = [optimizer.state[p]["step"].clone() for p in params]
    for p in params:
        p.grad = torch.full_like(p, float("nan"))
    optimizer.found_inf = torch.ones(())
    optimizer.step()
    del optimizer.found_inf
    assert all(torch.equal(a, b) for a, b in zip(before, params))
    assert all(torch.equal(optimizer.state[p]["step"], s) for p, s in zip(params, steps))


@pytest.mark.slow  # ~10 s on an idle 2-core machine, 25 s on a busy one
def test_compile_traces_the_whole_loss_in_one_graph_without_breaks(tmp_path, monkeypatch):
    """train.compile=true: the loss (noise, preconditioning, network, weighting, squared error) is one graph, with no
    graph break and no recompilation in the steady state. Dynamo's tracing decides both, whatever the backend:
    ``aot_eager`` (forward and backward graphs, no code generation) keeps this test to seconds on a CPU; the GPU tests
    (tests/test_gpu.py) run the default inductor backend."""
    import functools

    import torch._dynamo
    from torch._dynamo.utils import counters

    # The counter must see a graph break when there is one, or the assertions below could not fail.
    torch._dynamo.reset()
    counters.clear()
    torch.compile(lambda x: torch._dynamo.graph_break() or x + 1, backend="eager")(torch.ones(2))
    assert sum(counters["graph_break"].values()) == 1

    torch._dynamo.reset()
    counters.clear()
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    cfg = compose("train", [f"run_dir={tmp_path}", *FAST_TRAIN, "train.compile=true"])
    compiled = Trainer(cfg, init_distributed("cpu"))
    compiled.build_optimisation()
    eager = Trainer(compose("train", [f"run_dir={tmp_path}", *FAST_TRAIN]), init_distributed("cpu"))
    eager.build_optimisation()
    losses = []
    for trainer in (compiled, eager):
        torch.manual_seed(0)
        batches = trainer.data_stream()
        losses.append(float(trainer.train_step(batches)["loss_sum"]))
        if trainer is compiled:
            graphs = counters["stats"]["unique_graphs"]
            for _ in range(3):
                trainer.train_step(batches)
    assert counters["stats"]["unique_graphs"] == graphs == 1  # one graph, compiled once: no recompilation
    assert not counters["graph_break"], dict(counters["graph_break"])
    # The compiled loss is the eager one (same weights, σ, noise and images).
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    torch._dynamo.reset()
