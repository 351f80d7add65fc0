"""LoRA students and LoRA export (peft), loadable with ``pipe.load_lora_weights(DIR)``.

A LoRA layer adds ``(alpha / r) * B A x`` to a frozen base layer ``W x``. Training with LoRA
(:func:`add_lora`): ``B = 0`` at the start, so the UNet with its LoRA layers *is* the teacher,
and only ``A, B`` train. Export (:func:`save_lora`) writes diffusers' LoRA format, which
applies to the base model and to fine-tunes of it (same architecture, other weights);
:func:`save_kohya_lora` writes the same weights with kohya's keys (AUTOMATIC1111, ComfyUI).

A fully fine-tuned student becomes LoRA weights by :func:`extract_lora`: per layer, the
weight change ``D = W_student - W_base`` (flattened to ``out x in*k*k`` for convolutions) is
cut to its best rank-r approximation by SVD, ``D ~ U_r S_r V_r^T``, stored as
``B = U_r S_r^{1/2}``, ``A = S_r^{1/2} V_r^T`` (alpha = r, so the scale is 1). Bias and
normalisation changes are not carried; :func:`extract_lora` reports how much of the change
the low rank keeps.
"""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path

import torch
from torch import nn

ATTENTION_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")
"""LoRA targets of diffusers' text-to-image LoRA training scripts (attention projections of every block)."""
UNET_LAYERS = (*ATTENTION_PROJECTIONS, "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2",
               "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj")
"""LoRA targets of LCM-LoRA (diffusers' ``train_lcm_distill_lora_sd_wds.py``): the attention projections and the
transformer blocks' projections and feed-forward layers, the residual blocks' convolutions and time-embedding
projections, and the down- and upsamplers."""
LORA_TARGETS = {"attention": ATTENTION_PROJECTIONS, "unet": UNET_LAYERS}
"""Setup key ``lora_targets`` -> the layer names its LoRA adapts."""


def add_lora(unet: nn.Module, rank: int, alpha: float | None = None,
             targets: tuple[str, ...] = ATTENTION_PROJECTIONS) -> nn.Module:
    """Add zero-initialised LoRA layers of rank ``rank`` to ``unet`` (a UNet, a transformer) in place; only
    they train. Through diffusers' ``add_adapter`` where the model has diffusers' PEFT mixin, else (e.g.
    ``PixArtTransformer2DModel``) through peft's ``inject_adapter_in_model``, which adds the same layers and
    sets ``unet.peft_config``."""
    from peft import LoraConfig, inject_adapter_in_model

    if rank < 1:
        raise ValueError(f"LoRA rank must be at least 1, got {rank}")
    unet.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=alpha or rank, init_lora_weights=True, target_modules=list(targets))
    if hasattr(unet, "add_adapter"):
        unet.add_adapter(config)
    else:
        inject_adapter_in_model(config, unet)
    for name, p in unet.named_parameters():
        if "lora_" in name:
            p.requires_grad_(True)
    return unet


class AdaptersDisabled(nn.Module):
    """The base model of a LoRA-adapted ``unet`` without a second copy: each call runs ``unet``
    with its adapters disabled (diffusers' ``set_adapter_layers``, what its ``disable_adapters()`` /
    ``enable_adapters()`` do, for any peft-adapted model; i.e. ``W x`` instead of
    ``W x + (alpha / r) B A x``) and in eval mode, then restores both.
    The LoRA student's original teacher (``DistillationSetup.teacher_view``)."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        object.__setattr__(self, "unet", unet)  # not a submodule: no second set of parameters

    @contextlib.contextmanager
    def _base(self):
        from diffusers.utils.peft_utils import set_adapter_layers

        training = self.unet.training
        set_adapter_layers(self.unet.eval(), enabled=False)
        try:
            yield
        finally:
            set_adapter_layers(self.unet, enabled=True)
            self.unet.train(training)

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    @property
    def config(self):
        return self.unet.config

    def forward(self, *args, **kwargs):
        with self._base():
            return self.unet(*args, **kwargs)


def lora_state_dict(unet: nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA weights of a peft-adapted UNet (peft names, ``<module>.lora_A.weight``: what
    ``load_lora_weights`` reads for any layer, attention or convolution)."""
    from peft.utils import get_peft_model_state_dict

    return get_peft_model_state_dict(unet)


def _cast(state: dict[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    return state if dtype is None else {k: v.to(dtype) for k, v in state.items()}


def save_lora(model: nn.Module, out_dir: str | Path, pipeline: str, component: str = "unet",
              dtype: torch.dtype | None = None) -> Path:
    """Write ``model``'s LoRA weights (and their config: rank, alpha) as ``pytorch_lora_weights.safetensors``
    with the ``save_lora_weights`` of the diffusers pipeline class named ``pipeline``, as its ``component``
    (``"unet"`` of Stable Diffusion / SDXL, ``"transformer"`` of SD3): what its ``load_lora_weights`` reads."""
    import diffusers

    out_dir = Path(out_dir)
    layers = {f"{component}_lora_layers": _cast(lora_state_dict(model), dtype),
              f"{component}_lora_adapter_metadata": model.peft_config["default"].to_dict()}
    getattr(diffusers, pipeline).save_lora_weights(out_dir, safe_serialization=True, **layers)
    return out_dir / "pytorch_lora_weights.safetensors"


def kohya_state_dict(unet: nn.Module) -> dict[str, torch.Tensor]:
    """``unet``'s LoRA weights with kohya keys: ``lora_unet_<module, dots as _>.lora_down.weight`` (A),
    ``.lora_up.weight`` (B) and ``.alpha`` (scale ``alpha / rank``), as AUTOMATIC1111 and ComfyUI read them.

    diffusers' ``convert_state_dict_to_kohya`` names the keys; it writes ``alpha = rank`` (scale 1),
    so the alphas are set to the adapter's own ``lora_alpha`` afterwards.
    """
    from diffusers.utils import convert_state_dict_to_kohya

    config = unet.peft_config["default"]
    if config.rank_pattern or config.alpha_pattern:
        raise ValueError("kohya export supports one rank and alpha for all LoRA layers")
    state = convert_state_dict_to_kohya({f"unet.{k}": v for k, v in lora_state_dict(unet).items()})
    return {k: torch.tensor(float(config.lora_alpha)) if k.endswith(".alpha") else v for k, v in state.items()}


def save_kohya_lora(unet: nn.Module, path: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Write :func:`kohya_state_dict` (weights in ``dtype``, alphas float32) as one safetensors file."""
    from safetensors.torch import save_file

    state = {k: v if k.endswith(".alpha") else (v.to(dtype) if dtype is not None else v).contiguous()
             for k, v in kohya_state_dict(unet).items()}
    save_file(state, str(path), metadata={"format": "pt", "ss_network_module": "networks.lora"})
    return Path(path)


def has_lora(unet: nn.Module) -> bool:
    return bool(getattr(unet, "peft_config", None))


def merge_lora(unet: nn.Module) -> nn.Module:
    """Fold the LoRA layers into the base weights and remove them (in place): a plain model. What diffusers'
    ``fuse_lora()`` + ``unload_lora()`` do, for any peft-adapted model (PixArt's transformer has no
    diffusers PEFT mixin): each peft layer's ``merge()``, then ``recurse_remove_peft_layers``."""
    from diffusers.utils import recurse_remove_peft_layers
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in unet.modules():
        if isinstance(module, BaseTunerLayer):
            module.merge()
    recurse_remove_peft_layers(unet)
    del unet.peft_config
    if getattr(unet, "_hf_peft_config_loaded", None):
        unet._hf_peft_config_loaded = None
    return unet


@torch.no_grad()
def extract_lora(student: nn.Module, base: nn.Module, rank: int) -> tuple[nn.Module, float]:
    """A copy of ``base`` with LoRA layers approximating ``student - base`` (module doc).

    Covers every ``nn.Linear`` and ``nn.Conv2d`` whose weight changed. Returns the adapted copy
    and the kept fraction ``1 - |D - D_r|_F^2 / |D|_F^2`` over all covered weights.
    """
    from peft import LoraConfig

    students = dict(student.named_modules())
    deltas = {}
    for name, module in base.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            delta = students[name].weight.float() - module.weight.float()
            if bool(delta.any()):
                deltas[name] = delta
    if not deltas:
        raise ValueError("the student's weights equal the base model's: there is no change to extract")
    adapted = copy.deepcopy(base)
    adapted.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=True, target_modules=list(deltas)))
    layers = dict(adapted.named_modules())
    total = lost = 0.0
    for name, delta in deltas.items():
        u, s, vh = torch.linalg.svd(delta.flatten(1), full_matrices=False)
        r = min(rank, s.numel())
        root = s[:r].sqrt()
        a = torch.zeros(rank, vh.shape[1])
        b = torch.zeros(u.shape[0], rank)
        a[:r], b[:, :r] = root[:, None] * vh[:r], u[:, :r] * root
        layer = layers[name]
        weight_a, weight_b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        weight_a.copy_(a.reshape(weight_a.shape))
        weight_b.copy_(b.reshape(weight_b.shape))
        total += float(s.pow(2).sum())
        lost += float(s[r:].pow(2).sum())
    return adapted, 1.0 - lost / total


def as_lora(student: nn.Module, base: nn.Module, rank: int) -> tuple[nn.Module, float]:
    """The LoRA form of a student, and the kept fraction of its weight change: a LoRA student as trained
    (fraction 1), else :func:`extract_lora` of its change from ``base`` at ``rank``; its weights must be finite."""
    from ..training.checkpoint import check_finite

    adapted, kept = (student, 1.0) if has_lora(student) else extract_lora(student, base, rank)
    check_finite(adapted.state_dict(), "refusing to export the student's LoRA weights")
    return adapted, kept
