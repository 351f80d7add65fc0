"""Step conditioning: one student network for several window counts (an any-step student).

A network's time embedding is two linear layers around an activation, ``emb = L2(act(L1(f(tau))))``
(diffusers' ``TimestepEmbedding``; the built-in MLP's ``time``). A student serving the window counts
``k in counts`` gets two learned offsets per count, added to the layers' outputs:

    emb_k = L2(act(L1(f(tau)) + a_k)) + b_k

``a_k`` and ``b_k`` start at zero, so a conditioned copy of the teacher is the teacher at every count
(its DDIM step over any window). A sampler with ``k`` windows (one or more steps per window) runs the
network at count ``k``. For one fixed ``k`` the offsets are constants, so they fold into the layers'
biases, ``L1.bias += a_k`` and ``L2.bias += b_k`` (:func:`fold_step_count`): the student at ``k``
windows is a stock network of the teacher's architecture, loadable in plain diffusers.

The count ``k`` is known to the sampler (the windows it steps through), not to the network's
inputs, which is why it is given per call (:meth:`StepConditioning.bound`). Related work: the
step-size input of Shortcut models (Frans et al. 2024), the ``(t, s)`` input of flow maps
(Boffi et al. 2025; MeanFlow, Geng et al. 2025), and Hyper-SD's one LoRA for several step counts.
Here the conditioning is the window count, a constant per sampler, so that it folds away.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn

from .teachers import Denoiser

TIME_EMBEDDING_LAYERS = (
    ("time_embedding.linear_1", "time_embedding.linear_2"),  # diffusers UNet2DModel, UNet2DConditionModel
    ("time_text_embed.timestep_embedder.linear_1", "time_text_embed.timestep_embedder.linear_2"),  # SD3
    ("adaln_single.emb.timestep_embedder.linear_1", "adaln_single.emb.timestep_embedder.linear_2"),  # PixArt
    ("time.0", "time.2"),  # proreflow.builtin.networks.MLPDenoiser
)
"""Where the time embedding's two linear layers live, per architecture: the first pair a network has."""

ATTRIBUTE = "step_conditioning"
"""The name of the :class:`StepConditioning` submodule in a conditioned network (its state-dict prefix)."""


def time_embedding_layers(module: nn.Module) -> tuple[str, str]:
    """The names of ``module``'s time-embedding linear layers (:data:`TIME_EMBEDDING_LAYERS`)."""
    names = dict(module.named_modules())
    for pair in TIME_EMBEDDING_LAYERS:
        if all(isinstance(names.get(name), nn.Linear) and names[name].bias is not None for name in pair):
            return pair
    raise ValueError(f"step_conditioning: a {type(module).__name__} has no time embedding this library knows "
                     f"(two biased linear layers at one of {', '.join(p[0] for p in TIME_EMBEDDING_LAYERS)}); "
                     "set step_conditioning: false")


class _AddOffset:
    """Forward hook of one time-embedding layer: adds the bound count's offset to its output. An object,
    not a closure, so that ``copy.deepcopy`` of the network points the copy's hook at the copy's offsets."""

    def __init__(self, conditioning: StepConditioning, layer: int):
        self.conditioning, self.layer = conditioning, layer

    def __call__(self, module: nn.Module, inputs, output: Tensor) -> Tensor:
        return self.conditioning.add(self.layer, output)


class StepConditioning(nn.Module):
    """The offsets ``a_k, b_k`` of the window counts ``counts`` (module doc), rows in the order of ``counts``.

    Outside :meth:`bound` the offsets are not added: the network is its unconditioned self.
    """

    def __init__(self, counts: Sequence[int], widths: Sequence[int], layers: Sequence[str]):
        super().__init__()
        counts = tuple(int(k) for k in counts)
        if not counts or len(set(counts)) != len(counts) or min(counts) < 1:
            raise ValueError(f"step conditioning needs distinct positive window counts, got {counts}")
        self.counts, self.layers = counts, tuple(layers)
        self.offsets = nn.ParameterList(nn.Parameter(torch.zeros(len(counts), w)) for w in widths)
        self._rows: Tensor | None = None

    def rows(self, count: int | Tensor) -> Tensor:
        """The table rows of window ``count`` (an int, or one per sample)."""
        count = torch.as_tensor(count).reshape(-1).long()
        table = torch.tensor(self.counts)
        found = count.cpu().unsqueeze(1) == table.unsqueeze(0)
        if not bool(found.any(dim=1).all()):
            unknown = sorted(set(count.tolist()) - set(self.counts))
            raise ValueError(f"this student serves {'/'.join(map(str, self.counts))} windows, not {unknown}: "
                             "sample it with one of those window counts (steps a multiple of one)")
        return found.float().argmax(dim=1)

    @contextlib.contextmanager
    def bound(self, count: int | Tensor) -> Iterator[None]:
        """Run the network at window ``count`` (an int, or a ``(B,)`` tensor of counts, one per sample)."""
        previous, self._rows = self._rows, self.rows(count)
        try:
            yield
        finally:
            self._rows = previous

    def add(self, layer: int, output: Tensor) -> Tensor:
        if self._rows is None:
            return output
        offset = self.offsets[layer][self._rows.to(output.device)].to(output.dtype)
        n = output.shape[0]
        if offset.shape[0] not in (1, n):  # a guided call stacks the batch: [unconditional; conditional]
            offset = offset.repeat(n // offset.shape[0], 1)
        return output + offset


def attach_step_conditioning(module: nn.Module, counts: Sequence[int]) -> StepConditioning:
    """Give ``module`` (in place) zero offsets for ``counts`` on its time embedding (module doc)."""
    if isinstance(getattr(module, ATTRIBUTE, None), StepConditioning):
        raise ValueError("this network is already step-conditioned")
    layers = time_embedding_layers(module)
    linears = [module.get_submodule(name) for name in layers]
    conditioning = StepConditioning(counts, [linear.out_features for linear in linears], layers)
    conditioning.to(device=linears[0].bias.device, dtype=torch.float32)
    module.add_module(ATTRIBUTE, conditioning)
    for i, linear in enumerate(linears):
        linear.register_forward_hook(_AddOffset(conditioning, i))
    return conditioning


def find_step_conditioning(module: nn.Module) -> StepConditioning | None:
    """The :class:`StepConditioning` of ``module`` (or of the network a DDP / compile wrapper holds)."""
    for candidate in (module, getattr(module, "module", None), getattr(module, "_orig_mod", None)):
        found = getattr(candidate, ATTRIBUTE, None)
        if isinstance(found, StepConditioning):
            return found
    return None


def fold_step_count(state: dict[str, Tensor], counts: Sequence[int], layers: Sequence[str],
                    count: int) -> dict[str, Tensor]:
    """A conditioned network's state dict at window ``count`` as the unconditioned network's: each layer's
    offset row added to its bias (in float64, then the bias's dtype), the offsets left out."""
    counts = [int(k) for k in counts]
    if count not in counts:
        raise ValueError(f"the student serves {'/'.join(map(str, counts))} windows, not {count}: choose "
                         "--steps among those (or a multiple of one)")
    row = counts.index(count)
    folded = {key: value for key, value in state.items() if not key.startswith(ATTRIBUTE + ".")}
    for i, layer in enumerate(layers):
        bias = state[f"{layer}.bias"]
        offset = state[f"{ATTRIBUTE}.offsets.{i}"][row]
        folded[f"{layer}.bias"] = (bias.double() + offset.double()).to(bias.dtype)
    return folded


def conditioned_denoiser(denoiser: Denoiser, module: nn.Module) -> Denoiser:
    """``denoiser`` (over ``module``) as a step-conditioned one when ``module`` has step conditioning: its
    network takes the window count as a fourth argument; else ``denoiser`` itself."""
    conditioning = find_step_conditioning(module)
    if conditioning is None:
        return denoiser
    network = denoiser.network

    def run(x: Tensor, timestep: Tensor, cond, count: int | Tensor) -> Tensor:
        with conditioning.bound(count):
            return network(x, timestep, cond)

    return dataclasses.replace(denoiser, network=run, step_counts=conditioning.counts)
