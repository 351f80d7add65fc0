"""Small networks for the built-in datasets, described by JSON-able specs.

Denoisers follow the network convention of :mod:`proreflow.teachers`: ``net(x, timestep, cond)``
with ``timestep = max(t * T - 1, 0)`` (t = 1 noise, t = 0 data; :mod:`proreflow.schedules`) and
``cond`` a batch of class labels (``num_classes`` is the null class of classifier-free guidance), or None.

- :class:`MLPDenoiser`: residual MLP on flattened inputs (2D points, 8 x 8 digits).
- :func:`small_unet`: the spec of a diffusers ``UNet2DModel`` with class embeddings (MNIST).
- :class:`SmallClassifier`: the CNN whose penultimate features define the FD of image sets.

A spec is ``{"class": name, "kwargs": {...}}``; :func:`build_network` turns it into a module and
:func:`adapter_for_spec` gives the matching ``network(x, timestep, cond)`` adapter.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..teachers import Network, diffusers_network

Spec = dict[str, Any]


def timestep_embedding(timestep: Tensor, dim: int, max_period: float = 10_000.0) -> Tensor:
    """Sinusoidal features ``[cos(tau w_k), sin(tau w_k)]`` with ``w_k = max_period^(-k / (dim/2))``."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timestep.device) / half)
    angles = timestep.float().reshape(-1, 1) * freqs
    return torch.cat([angles.cos(), angles.sin()], dim=1)


class MLPBlock(nn.Module):
    """``h + W2 silu(W1 LayerNorm(h) + W_e emb)``."""

    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, width)
        self.emb = nn.Linear(width, width)
        self.fc2 = nn.Linear(width, width)

    def forward(self, h: Tensor, emb: Tensor) -> Tensor:
        return h + self.fc2(F.silu(self.fc1(self.norm(h)) + self.emb(emb)))


class MLPDenoiser(nn.Module):
    """Residual MLP denoiser ``net(x, timestep, cond)`` on inputs of any ``shape`` (flattened inside).

    The embedding ``emb = silu(MLP(sinusoid(timestep)) + E[cond])`` enters every block; ``E`` has
    ``num_classes + 1`` rows, the last one the null class (also used when ``cond`` is None).
    ``num_classes = 0`` makes an unconditional network (``cond`` must be None). The output layer
    starts at zero. :meth:`enable_gradient_checkpointing` recomputes each block in the backward pass
    (``torch.utils.checkpoint``), as diffusers models do.
    """

    def __init__(self, shape: tuple[int, ...] | list[int], num_classes: int = 0, width: int = 256,
                 depth: int = 3, emb_dim: int = 64):
        super().__init__()
        self.shape, self.num_classes, self.emb_dim = tuple(shape), num_classes, emb_dim
        dim = math.prod(self.shape)
        self.time = nn.Sequential(nn.Linear(emb_dim, width), nn.SiLU(), nn.Linear(width, width))
        self.label = nn.Embedding(num_classes + 1, width) if num_classes else None
        self.inp = nn.Linear(dim, width)
        self.blocks = nn.ModuleList(MLPBlock(width) for _ in range(depth))
        self.out = nn.Sequential(nn.LayerNorm(width), nn.SiLU(), nn.Linear(width, dim))
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)
        self.gradient_checkpointing = False

    def enable_gradient_checkpointing(self) -> None:
        """Store only each block's input while gradients are recorded; recompute the block when they flow back."""
        self.gradient_checkpointing = True

    def forward(self, x: Tensor, timestep: Tensor, cond: Tensor | None = None) -> Tensor:
        emb = self.time(timestep_embedding(timestep.expand(x.shape[0]), self.emb_dim).to(x.dtype))
        if self.label is not None:
            if cond is None:
                cond = torch.full((x.shape[0],), self.num_classes, device=x.device)
            emb = emb + self.label(cond.reshape(-1).long().expand(x.shape[0]))
        elif cond is not None:
            raise ValueError("this MLPDenoiser is unconditional (num_classes=0): pass cond=None")
        emb = F.silu(emb)
        h = self.inp(x.reshape(x.shape[0], -1))
        for block in self.blocks:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                h = checkpoint(block, h, emb, use_reentrant=False)
            else:
                h = block(h, emb)
        return self.out(h).reshape(x.shape)


class SmallClassifier(nn.Module):
    """CNN classifier for ``(B, C, H, W)`` images of any size.

    Three 3x3 convolutions (the last two with stride 2), GroupNorm and SiLU, average pooling to
    2 x 2, then ``features = silu(Linear(pooled))`` (``feature_dim``, the penultimate layer used
    for the Frechet distance) and ``logits = Linear(features)``.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 32, feature_dim: int = 64):
        super().__init__()

        def conv(cin: int, cout: int, stride: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.GroupNorm(8, cout), nn.SiLU())

        self.body = nn.Sequential(conv(in_channels, width, 1), conv(width, 2 * width, 2), conv(2 * width, 4 * width, 2))
        self.fc = nn.Linear(16 * width, feature_dim)
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: Tensor) -> Tensor:
        """Penultimate features ``(B, feature_dim)``."""
        return F.silu(self.fc(F.adaptive_avg_pool2d(self.body(x), 2).flatten(1)))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def small_unet(num_classes: int, sample_size: int = 28, channels: int = 1,
               block_out_channels: tuple[int, ...] = (8, 16, 32), layers_per_block: int = 1) -> Spec:
    """Spec of a diffusers ``UNet2DModel`` with ``num_classes + 1`` class embeddings (last: null class).

    Plain ResNet blocks, no attention (CPU speed); ``len(block_out_channels) - 1`` halvings, so
    28 x 28 inputs work with three levels (28, 14, 7). The default (8, 16, 32) has 0.16 M
    parameters and costs about 3.6 ms of one CPU core per 28 x 28 image and training step.
    """
    blocks = ["DownBlock2D"] * len(block_out_channels)
    return {"class": "UNet2DModel", "kwargs": {
        "sample_size": sample_size, "in_channels": channels, "out_channels": channels,
        "block_out_channels": list(block_out_channels), "layers_per_block": layers_per_block,
        "down_block_types": blocks, "up_block_types": [b.replace("Down", "Up") for b in blocks],
        "add_attention": False, "norm_num_groups": 8, "num_class_embeds": num_classes + 1,
    }}


def mlp_spec(shape: tuple[int, ...], num_classes: int = 0, width: int = 256, depth: int = 3) -> Spec:
    """Spec of an :class:`MLPDenoiser`."""
    return {"class": "MLPDenoiser", "kwargs": {"shape": list(shape), "num_classes": num_classes,
                                               "width": width, "depth": depth}}


def _unet(**kwargs) -> nn.Module:
    from diffusers import UNet2DModel

    return UNet2DModel(**kwargs)


NETWORKS: dict[str, Callable[..., nn.Module]] = {
    "MLPDenoiser": MLPDenoiser,
    "SmallClassifier": SmallClassifier,
    "UNet2DModel": _unet,
}


def build_network(spec: Spec) -> nn.Module:
    """A freshly initialised module from ``{"class": ..., "kwargs": {...}}``."""
    name = spec.get("class")
    if name not in NETWORKS:
        raise ValueError(f"unknown network class {name!r}; choose one of {sorted(NETWORKS)}")
    return NETWORKS[name](**spec.get("kwargs", {}))


def adapter_for_spec(spec: Spec) -> Callable[[nn.Module], Network]:
    """``diffusers_network`` for a diffusers UNet (cond -> ``class_labels``), else ``module(x, timestep, cond)``."""
    from ..training.setup import call_module

    return diffusers_network if spec.get("class") == "UNet2DModel" else call_module
