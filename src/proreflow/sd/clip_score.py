"""CLIP score: ``max(100 * cos(E_image, E_text), 0)`` per image, averaged (Hessel et al. 2021).

No CLIP weights ship with proreflow or its dependencies: the user names a CLIP model, a local
folder or a hub id that ``transformers.CLIPModel`` / ``CLIPProcessor`` load (e.g. a local copy of
``openai/clip-vit-large-patch14``). Scores depend on the CLIP model, so results record which.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from .fid import to_uint8_rgb

NO_CLIP_MESSAGE = ("CLIP score not computed: no CLIP model given. Pass --clip-model with a local CLIP folder or a "
                   "hub id (e.g. openai/clip-vit-large-patch14) to get it; FID and fidelity are unaffected.")


class ClipScorer:
    """CLIP embeddings and scores with a ``transformers`` CLIPModel and its processor.

    Images are N x 3 x H x W, uint8 or float in [0, 1]; captions longer than the text
    encoder's window are truncated.
    """

    def __init__(self, model, processor, device: str | torch.device = "cpu", name: str = "") -> None:
        self.model = model.to(device).eval()
        self.processor = processor
        self.device = torch.device(device)
        self.name = name or getattr(model.config, "_name_or_path", "") or type(model).__name__

    @classmethod
    def load(cls, name_or_path: str | Path, device: str | torch.device = "cpu") -> ClipScorer:
        """Load a CLIP model and processor from a local folder or a hub id; a clear error when it fails."""
        from transformers import CLIPModel, CLIPProcessor

        source = str(Path(name_or_path).expanduser())
        if Path(source).is_file():
            raise FileNotFoundError(f"CLIP model {source} is a file: pass the folder holding it (--clip-model DIR)")
        try:
            model = CLIPModel.from_pretrained(source)
            processor = CLIPProcessor.from_pretrained(source)
        except (OSError, ValueError) as err:
            place = "the folder" if Path(source).is_dir() else "no such folder, and the hub id"
            raise FileNotFoundError(
                f"cannot load the CLIP model {source!r} ({place} did not load: {err}). Pass a folder saved with "
                "CLIPModel.save_pretrained and CLIPProcessor.save_pretrained (config, weights, tokenizer and "
                "image processor files), or a hub id where the hub is reachable") from err
        return cls(model, processor, device, name=source)

    @torch.no_grad()
    def encode_text(self, captions: Sequence[str]) -> Tensor:
        """Unit-norm text embeddings, N x D."""
        window = self.model.config.text_config.max_position_embeddings
        tokens = self.processor.tokenizer(list(captions), padding=True, truncation=True, max_length=window,
                                          return_tensors="pt").to(self.device)
        out = self.model.text_model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
        return _unit(self.model.text_projection(out.pooler_output))

    @torch.no_grad()
    def encode_images(self, images: Tensor) -> Tensor:
        """Unit-norm image embeddings, N x D."""
        arrays = list(to_uint8_rgb(images).permute(0, 2, 3, 1).cpu().numpy())
        pixels = self.processor.image_processor(images=arrays, return_tensors="pt")["pixel_values"]
        out = self.model.vision_model(pixel_values=pixels.to(self.device, self.model.dtype))
        return _unit(self.model.visual_projection(out.pooler_output))

    @staticmethod
    def score_embeddings(image_embeds: Tensor, text_embeds: Tensor) -> Tensor:
        """Per-pair CLIP score ``max(100 * cos, 0)``, N values."""
        return (100 * (image_embeds * text_embeds).sum(-1)).clamp(min=0).float().cpu()

    def score(self, images: Tensor, captions: Sequence[str]) -> Tensor:
        """CLIP score of each image with its caption, N values."""
        if len(images) != len(captions):
            raise ValueError(f"{len(images)} images but {len(captions)} captions")
        return self.score_embeddings(self.encode_images(images), self.encode_text(captions))


def _unit(x: Tensor) -> Tensor:
    return x / x.norm(dim=-1, keepdim=True)
