"""FLOPs of one network forward pass, measured with ``torch.utils.flop_counter.FlopCounterMode`` (not hand-derived).

Convention: ``count_flops`` returns FlopCounterMode's count, which charges **2 FLOPs per multiply-add** of every
matrix product, convolution and attention (``aten.mm/addmm/bmm/convolution/_scaled_dot_product_*``); element-wise
operations (activations, norms, bias additions, softmax) are not counted. Papers that report "Gflops" of diffusion
networks (DiT, Peebles & Xie 2023; U-ViT; ...) count multiply-adds (fvcore convention), i.e. ``count_macs`` =
``count_flops / 2``: DiT-XL/2 at 32x32x4 is 118.6 G multiply-adds.

Measurement: the network runs once with batch 1 (a random image, noise label 0, the one-hot label of class 0 when
conditional, zero augmentation labels). By default its parameters and buffers are swapped for meta-device stand-ins
(``torch.func.functional_call``), so nothing is computed or allocated and even DiT-XL costs milliseconds; if the
forward cannot run on meta tensors it falls back to a real batch-1 forward (no autograd) on the network's device.

FlopCounterMode has no formula for the CPU flash-attention kernel that ``F.scaled_dot_product_attention`` uses on
CPU tensors, so one is added here: for q [B, H, L, E], k [B, H, S, E], v [B, H, S, Ev] the two products q k^T and
(softmax) v cost 2 B H L S E + 2 B H L S Ev FLOPs (on meta tensors attention runs as two counted ``bmm``).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def _sdpa_flops(query_shape: Any, key_shape: Any, value_shape: Any, *args: Any, **kwargs: Any) -> int:
    """2 * (B H L S E + B H L S Ev) for softmax(q k^T) v (see the module docstring)."""
    *batch, length, e = query_shape
    source, ev = key_shape[-2], value_shape[-1]
    return 2 * math.prod(batch) * length * source * (e + ev)


def _custom_mapping() -> dict[Any, Any]:
    ops = {}
    cpu_flash = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if cpu_flash is not None:
        ops[cpu_flash] = _sdpa_flops
    return ops


def _example_inputs(
    img_resolution: int, img_channels: int, label_dim: int, augment_dim: int, device: torch.device | str
) -> tuple[tuple, dict]:
    x = torch.randn(1, img_channels, img_resolution, img_resolution, device=device)
    noise_labels = torch.zeros(1, device=device)
    class_labels = None
    if label_dim:
        class_labels = torch.zeros(1, label_dim, device=device)
        class_labels[:, 0] = 1
    augment_labels = torch.zeros(1, augment_dim, device=device) if augment_dim else None
    return (x, noise_labels), dict(class_labels=class_labels, augment_labels=augment_labels)


def _count(net: nn.Module, args: tuple, kwargs: dict, on_meta: bool) -> int:
    counter = FlopCounterMode(display=False, custom_mapping=_custom_mapping())
    with counter, torch.no_grad():
        if on_meta:
            state = {name: torch.empty_like(t, device="meta") for name, t in net.named_parameters()}
            state.update({name: torch.empty_like(t, device="meta") for name, t in net.named_buffers()})
            torch.func.functional_call(net, state, args, kwargs, strict=False)
        else:
            net(*args, **kwargs)
    return int(counter.get_total_flops())


def count_flops(
    net: nn.Module,
    img_resolution: int,
    img_channels: int,
    label_dim: int = 0,
    augment_dim: int = 0,
    on_meta: bool = True,
) -> int:
    """FLOPs (2 per multiply-add) of one forward pass of ``net`` on one [img_channels, R, R] image.

    ``net`` is any models/ network or a preconditioned denoiser (same call signature). ``on_meta=False`` forces the
    real batch-1 forward on the network's device. Train/eval mode is left as it was.
    """
    was_training = net.training
    net.eval()
    try:
        if on_meta:
            try:
                args, kwargs = _example_inputs(img_resolution, img_channels, label_dim, augment_dim, "meta")
                return _count(net, args, kwargs, on_meta=True)
            except (RuntimeError, NotImplementedError, TypeError, ValueError):
                pass  # some op has no meta kernel (or the network created a real tensor): measure for real
        first = next(iter(net.parameters()), None)
        device = first.device if first is not None else torch.device("cpu")
        args, kwargs = _example_inputs(img_resolution, img_channels, label_dim, augment_dim, device)
        return _count(net, args, kwargs, on_meta=False)
    finally:
        net.train(was_training)


def count_macs(
    net: nn.Module,
    img_resolution: int,
    img_channels: int,
    label_dim: int = 0,
    augment_dim: int = 0,
    on_meta: bool = True,
) -> int:
    """Multiply-adds of one forward pass (= count_flops / 2): the "Gflops" of the DiT paper, times 1e9."""
    return count_flops(net, img_resolution, img_channels, label_dim, augment_dim, on_meta) // 2


__all__ = ["count_flops", "count_macs"]
