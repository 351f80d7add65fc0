"""The built-in text-to-image teacher ``mnist-t2i``: a real Stable Diffusion pipeline, small enough for a CPU.

A diffusers ``StableDiffusionPipeline`` folder made of the real component classes, trained here on the
built-in MNIST images (:mod:`proreflow.builtin.images`) with captions, so that the Stable Diffusion path
(``setup.name: stable-diffusion``, export, ``proreflow sample`` / ``eval``) can be distilled and measured
on a teacher that draws something:

- images: MNIST's 28 x 28 digits padded with 2 black pixels to 32 x 32, grey replicated to RGB,
  pixels in [-1, 1];
- ``AutoencoderKL`` (3 levels: 32 px <-> 4 x 8 x 8 latents), trained first with the squared error plus
  a small KL term; its ``scaling_factor`` is ``1 / std`` of the training latents, as Stable
  Diffusion set 0.18215 from its latents' standard deviation;
- ``CLIPTokenizer`` with the real CLIP BPE vocabulary (49,408 tokens, ``bpe_simple_vocab_16e6.txt.gz``
  shipped beside this module, from OpenAI CLIP / open_clip, MIT licence) and a small
  ``CLIPTextModel``, **trained with the UNet**: no CLIP weights exist offline, and a random frozen
  encoder gives "seven" and "7" unrelated states, so nothing would tie the templates of one digit
  together; it is frozen afterwards, as distillation freezes every text encoder;
- ``UNet2DConditionModel`` with cross-attention on the text states and (``text_time_embedding``) the
  text states pooled by attention into its time embedding (diffusers' ``addition_embed_type="text"``,
  ``TextTimeEmbedding``: computed inside the UNet from the same states, so the stock pipeline runs it;
  with cross-attention alone this small UNet follows the prompt too weakly, docs/research/
  2026-12-07-text-to-image.md), epsilon prediction, on SD's
  ``scaled_linear`` schedule (T = 1000) with the library's timestep convention
  (:meth:`~proreflow.schedules.VPSchedule.timestep`); captions are dropped to ``""`` with
  probability ``cond_dropout`` (10 %), so classifier-free guidance works (the pipeline's negative
  prompt is the encoding of ``""``); offset noise 0.1 as the built-in MNIST teacher (the schedule
  leaks an image's mean through ``x_1``, :mod:`proreflow.builtin.teacher`);
- EMA weights of UNet and text encoder are the teacher; the scheduler saved with the pipeline is
  diffusers' ``DDIMScheduler`` with SD1.5's settings.

Captions come from templates per digit (:data:`TRAIN_TEMPLATES`); :data:`HELDOUT_TEMPLATES` never
appear in training and caption the evaluation set. The data are written once, as a user has them
(:func:`write_data`): ``train/`` (an image folder with ``metadata.jsonl``, one caption per image),
``shards/`` (the same items as webdataset tar shards) and ``heldout/`` (the test split captioned
with held-out templates, with a ``label`` column), read by the Stable Diffusion family's own loaders.

Everything is cached under ``<cache>/teachers/mnist-t2i-<hash of config>/`` (``pipeline/``,
``data/``, ``config.json`` written last: :mod:`proreflow.builtin.store`'s layout and rules).
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import json
import math
import os
import shutil
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel

from ..files import atomic_write_text, replace_dir
from ..schedules import VPSchedule
from ..targets import sample_times
from .data import TEST_FRACTION
from .fitting import fit_record, fit_steps
from .images import load_mnist_images, stratified_split
from .store import check_writable, config_hash
from .teacher import _ema_avg, _lr_factor, teacher_loss

NAME = "mnist-t2i"
KIND = "teachers"
FORMAT = 1
RECORD = "config.json"
PIPELINE, DATA = "pipeline", "data"
RESOLUTION = 32
PAD = (RESOLUTION - 28) // 2
BPE_FILE = Path(__file__).with_name("clip_bpe") / "bpe_simple_vocab_16e6.txt.gz"

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TRAIN_TEMPLATES = (
    "a handwritten digit {word}",
    "the number {digit}, written by hand",
    "{digit}",
    "a photo of the digit {digit}",
    "handwritten {word}",
    "the digit {word} on a black background",
)
"""Caption templates of the training data (``{digit}``: 0-9, ``{word}``: zero-nine)."""
HELDOUT_TEMPLATES = (
    "an image of a handwritten {word}",
    "number {digit} in handwriting",
    "{word}",
)
"""Caption templates of the evaluation set only: never seen in training."""


def caption(label: int, template: str) -> str:
    """The caption of digit ``label`` in ``template``."""
    return template.format(digit=label, word=WORDS[label])


def caption_label(text: str) -> int | None:
    """The digit a caption of :data:`TRAIN_TEMPLATES` / :data:`HELDOUT_TEMPLATES` names (None: none or several)."""
    found = {d for d in range(10) for t in (*TRAIN_TEMPLATES, *HELDOUT_TEMPLATES) if caption(d, t) == text}
    return found.pop() if len(found) == 1 else None


@dataclass(frozen=True)
class T2ITeacherConfig:
    """Everything that determines the text-to-image teacher (its hash names the cache entry)."""

    vae_channels: tuple[int, ...] = (16, 32, 32)
    vae_steps: int = 600
    vae_lr: float = 1e-3
    vae_kl: float = 1e-6
    text_width: int = 64
    text_layers: int = 2
    max_tokens: int = 16
    unet_channels: tuple[int, ...] = (32, 64)
    unet_layers: int = 1
    text_time_embedding: bool = True
    steps: int = 8000  # 3,000 followed the prompt far less (docs/research/2026-12-07-text-to-image.md)
    batch_size: int = 64
    lr: float = 1e-3
    warmup: int = 100
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    cond_dropout: float = 0.1
    offset_noise: float = 0.1
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {**{k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()},
                "format": FORMAT}


LIMITS = {"vae_steps": (0, 10**7), "steps": (1, 10**7), "batch_size": (1, 65536), "lr": (0, 1), "vae_lr": (0, 1),
          "seed": (0, 2**63 - 1)}


def t2i_config(**overrides: Any) -> T2ITeacherConfig:
    """The default config with ``overrides`` (None values ignored), each checked against :data:`LIMITS`."""
    given = {k: v for k, v in overrides.items() if v is not None}
    names = {f.name for f in dataclasses.fields(T2ITeacherConfig)}
    unknown = sorted(set(given) - names)
    if unknown:
        raise ValueError(f"{NAME}: unknown teacher setting {unknown[0]!r}; known: {', '.join(sorted(names))}")
    defaults = T2ITeacherConfig()
    for key, value in given.items():
        if isinstance(getattr(defaults, key), bool) and not isinstance(value, bool):
            raise ValueError(f"{NAME}: {key} must be true or false, got {value!r}")
        if key in LIMITS:
            low, high = LIMITS[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
                    math.isfinite(value) and low <= value <= high):
                raise ValueError(f"{NAME}: {key} must be a finite number in [{low}, {high}], got {value!r}")
    return T2ITeacherConfig(**given)


# --- data --------------------------------------------------------------------------------------------


def mnist_t2i_images() -> tuple[Tensor, Tensor]:
    """MNIST as the teacher sees it: ``(5000, 3, 32, 32)`` in [-1, 1] (2 px black border, grey as RGB), labels."""
    x, labels = load_mnist_images()
    x = F.pad(x, (PAD,) * 4, value=-1.0)
    return x.expand(-1, 3, -1, -1).contiguous(), labels


def split() -> tuple[Tensor, Tensor]:
    """Indices ``(train, test)`` of :func:`mnist_t2i_images`: the built-in MNIST split (20 % held out)."""
    _, labels = load_mnist_images()
    return stratified_split(labels, TEST_FRACTION, seed=0)


def to_grey28(images: Tensor) -> Tensor:
    """Images in [0, 1] (N x 3 x 32 x 32, as a pipeline returns) -> the MNIST classifier's input,
    N x 1 x 28 x 28 in [-1, 1]: channel mean, border cropped (the inverse of the padding)."""
    grey = images.float().mean(dim=1, keepdim=True)
    return (grey[..., PAD:PAD + 28, PAD:PAD + 28] * 2 - 1).clamp(-1, 1)


def _png(image: Tensor) -> bytes:
    array = ((image.permute(1, 2, 0).numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _write_folder(folder: Path, rows: list[tuple[str, bytes, dict]]) -> None:
    folder.mkdir(parents=True)
    for name, png, _ in rows:
        (folder / name).write_bytes(png)
    (folder / "metadata.jsonl").write_text("".join(json.dumps({"file_name": n, **meta}) + "\n" for n, _, meta in rows))


def _write_shards(folder: Path, rows: list[tuple[str, bytes, dict]], per_shard: int = 1000) -> None:
    folder.mkdir(parents=True)
    for start in range(0, len(rows), per_shard):
        with tarfile.open(folder / f"{start // per_shard:05d}.tar", "w") as tar:
            for name, png, meta in rows[start:start + per_shard]:
                key = Path(name).stem
                for suffix, data in ((".png", png), (".txt", meta["text"].encode())):
                    info = tarfile.TarInfo(key + suffix)
                    info.size, info.mtime = len(data), 0
                    tar.addfile(info, io.BytesIO(data))


def write_data(out: Path) -> dict[str, Path]:
    """Write the data folders (module doc) under ``out`` (built beside it, moved in whole); their paths.

    Training image ``i`` (in split order) is captioned with template ``i mod 6``; held-out image ``j``
    with held-out template ``j mod 3``, and carries its ``label``.
    """
    x, labels = mnist_t2i_images()
    train_idx, test_idx = split()
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    rows = [(f"{i:05d}.png", _png(x[k]), {"text": caption(int(labels[k]), TRAIN_TEMPLATES[i % len(TRAIN_TEMPLATES)])})
            for i, k in enumerate(train_idx.tolist())]
    _write_folder(tmp / "train", rows)
    _write_shards(tmp / "shards", rows)
    held_out = HELDOUT_TEMPLATES
    held = [(f"{j:05d}.png", _png(x[k]), {"text": caption(int(labels[k]), held_out[j % len(held_out)]),
                                          "label": int(labels[k])}) for j, k in enumerate(test_idx.tolist())]
    _write_folder(tmp / "heldout", held)
    replace_dir(tmp, out)
    return data_paths(out)


def data_paths(out: Path) -> dict[str, Path]:
    return {"train": out / "train", "shards": out / "shards", "heldout": out / "heldout"}


# --- components --------------------------------------------------------------------------------------


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP's reversible map of the 256 bytes to printable characters (the BPE alphabet)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = printable[:], 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars)))


def clip_tokenizer(max_tokens: int):
    """``CLIPTokenizer`` with the real CLIP BPE vocabulary (49,408 tokens), built as CLIP's
    ``SimpleTokenizer`` builds it: the byte alphabet, the same with ``</w>``, the first 48,894 merges,
    then ``<|startoftext|>`` and ``<|endoftext|>`` (also the padding, as in SD1.5's tokenizer)."""
    from transformers import CLIPTokenizer

    lines = gzip.open(BPE_FILE, "rt", encoding="utf-8").read().split("\n")
    merges = [tuple(line.split()) for line in lines[1:49152 - 256 - 2 + 1]]
    alphabet = list(_bytes_to_unicode().values())
    tokens = alphabet + [c + "</w>" for c in alphabet] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: i for i, token in enumerate(tokens)}
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_tokens, pad_token="<|endoftext|>")


def build_components(config: T2ITeacherConfig) -> dict[str, Any]:
    """Fresh (seeded) VAE, tokenizer, text encoder, UNet and scheduler of the teacher."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = clip_tokenizer(config.max_tokens)
    n = len(tokenizer)
    levels = len(config.unet_channels)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=config.vae_channels,
                            down_block_types=("DownEncoderBlock2D",) * len(config.vae_channels),
                            up_block_types=("UpDecoderBlock2D",) * len(config.vae_channels), layers_per_block=1,
                            norm_num_groups=16, sample_size=RESOLUTION,
                            mid_block_add_attention=False)
        text = CLIPTextModel(CLIPTextConfig(
            vocab_size=n, hidden_size=config.text_width, intermediate_size=4 * config.text_width,
            num_hidden_layers=config.text_layers, num_attention_heads=4, max_position_embeddings=config.max_tokens,
            projection_dim=config.text_width, bos_token_id=n - 2, eos_token_id=n - 1, pad_token_id=n - 1))
        unet = UNet2DConditionModel(
            sample_size=RESOLUTION // 2 ** (len(config.vae_channels) - 1), in_channels=4, out_channels=4,
            block_out_channels=config.unet_channels,
            layers_per_block=config.unet_layers,
            down_block_types=("CrossAttnDownBlock2D",) * (levels - 1) + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (levels - 1),
            cross_attention_dim=config.text_width, attention_head_dim=8, norm_num_groups=32,
            **({"addition_embed_type": "text", "addition_embed_type_num_heads": 4} if config.text_time_embedding
               else {}))
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              num_train_timesteps=1000, prediction_type="epsilon", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    return {"vae": vae, "tokenizer": tokenizer, "text_encoder": text, "unet": unet, "scheduler": scheduler}


# --- training ----------------------------------------------------------------------------------------


def fit_vae(vae, images: Tensor, config: T2ITeacherConfig, progress: bool = True) -> dict[str, float]:
    """Train ``vae`` in place: ``mean (D(z) - x)^2 + vae_kl * KL(q(z|x) || N(0, I)) / pixels``, z ~ q(z|x)."""
    gen = torch.Generator().manual_seed(config.seed)
    opt = torch.optim.AdamW(vae.parameters(), lr=config.vae_lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, config.warmup, config.vae_steps))

    def loss_of_batch(idx: Tensor) -> Tensor:
        x = images[idx]
        dist = vae.encode(x).latent_dist
        z = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=gen)
        return F.mse_loss(vae.decode(z).sample, x) + config.vae_kl * dist.kl().mean() / x[0].numel()

    vae.train()
    losses = fit_steps(vae, loss_of_batch, opt, sched, steps=config.vae_steps, batch_size=config.batch_size,
                       size=len(images), generator=gen, grad_clip=config.grad_clip, desc=f"{NAME} VAE",
                       progress=progress)
    vae.eval().requires_grad_(False)
    return {"vae_final_loss": sum(losses[-100:]) / max(len(losses[-100:]), 1)}


@torch.no_grad()
def latent_moments(vae, images: Tensor, batch_size: int = 250) -> tuple[Tensor, Tensor]:
    """The VAE posterior's mean and std of every image (unscaled latents)."""
    means, stds = [], []
    for i in range(0, len(images), batch_size):
        dist = vae.encode(images[i:i + batch_size]).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
    return torch.cat(means), torch.cat(stds)


def encode_text(tokenizer, text_encoder, captions: list[str]) -> Tensor:
    """The pipeline's prompt encoding: padded to ``model_max_length``, last hidden states."""
    ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    return text_encoder(ids)[0]


def fit_denoiser(unet, text_encoder, tokenizer, latents: tuple[Tensor, Tensor], labels: Tensor,
                 config: T2ITeacherConfig, progress: bool = True) -> tuple[nn.Module, nn.Module, dict[str, float]]:
    """Train UNet and text encoder together (module doc); returns their EMA copies and stats.

    Per step: images ``i``, a training template per image, the caption dropped to ``""`` with
    probability ``cond_dropout``, ``z0 ~ q(z|x_i)`` scaled, ``t ~ U(0, 1]``,
    ``loss = mean (unet(x_t, tau(t), text(c)) - eps)^2``.
    """
    schedule = VPSchedule.from_betas("scaled_linear", 1000, 0.00085, 0.012)
    mean, std = latents
    gen = torch.Generator().manual_seed(config.seed + 1)
    both = nn.ModuleList([unet, text_encoder])  # one optimiser, one clipped norm over both
    opt = torch.optim.AdamW(both.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, config.warmup, config.steps))
    ema_unet, ema_text = (AveragedModel(m, avg_fn=_ema_avg(config.ema_decay), use_buffers=True)
                          for m in (unet, text_encoder))

    def network(x: Tensor, timestep: Tensor, states: Tensor) -> Tensor:
        return unet(x, timestep, encoder_hidden_states=states).sample

    def loss_of_batch(idx: Tensor) -> Tensor:
        templates = torch.randint(0, len(TRAIN_TEMPLATES), (config.batch_size,), generator=gen)
        keep = torch.rand(config.batch_size, generator=gen) >= config.cond_dropout
        captions = [caption(int(labels[i]), TRAIN_TEMPLATES[int(k)]) if kept else ""
                    for i, k, kept in zip(idx, templates, keep)]
        z0 = mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)
        noise = torch.randn(z0.shape, generator=gen)
        if config.offset_noise:
            noise = noise + config.offset_noise * torch.randn(*z0.shape[:2], 1, 1, generator=gen)
        t = sample_times(config.batch_size, gen)
        return teacher_loss(network, schedule, "epsilon", z0, noise, t, encode_text(tokenizer, text_encoder, captions))

    def update_ema() -> None:
        ema_unet.update_parameters(unet)
        ema_text.update_parameters(text_encoder)

    both.train()
    losses = fit_steps(both, loss_of_batch, opt, sched, steps=config.steps, batch_size=config.batch_size,
                       size=len(mean), generator=gen, grad_clip=config.grad_clip, after_step=update_ema,
                       desc=f"{NAME} UNet + text encoder", progress=progress)
    return (ema_unet.module.eval().requires_grad_(False), ema_text.module.eval().requires_grad_(False),
            {"final_loss": sum(losses[-100:]) / max(len(losses[-100:]), 1)})


def fit_t2i_teacher(config: T2ITeacherConfig, out: Path, progress: bool = True) -> dict[str, Any]:
    """Train the teacher and save its pipeline folder to ``out`` (built beside it, moved in whole); stats."""
    from diffusers import StableDiffusionPipeline

    start = time.perf_counter()
    parts = build_components(config)
    images, labels = mnist_t2i_images()
    train_idx, _ = split()
    images, labels = images[train_idx], labels[train_idx]
    stats = fit_vae(parts["vae"], images, config, progress)
    mean, std = latent_moments(parts["vae"], images)
    z = mean + std * torch.randn(mean.shape, generator=torch.Generator().manual_seed(config.seed))
    scaling = float(1 / z.std())
    parts["vae"].register_to_config(scaling_factor=scaling)
    unet, text, fit_stats = fit_denoiser(parts["unet"], parts["text_encoder"], parts["tokenizer"],
                                         (mean * scaling, std * scaling), labels, config, progress)
    pipe = StableDiffusionPipeline(vae=parts["vae"], text_encoder=text, tokenizer=parts["tokenizer"], unet=unet,
                                   scheduler=parts["scheduler"], safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    pipe.save_pretrained(tmp)
    replace_dir(tmp, out)
    return {**stats, **fit_stats, "scaling_factor": scaling, "train_seconds": round(time.perf_counter() - start, 2),
            **fit_record("cpu")}


@dataclass
class T2ITeacher:
    """The cached text-to-image teacher: its folder, pipeline and data paths, config and stats."""

    path: Path
    config: T2ITeacherConfig
    stats: dict[str, Any]
    trained: bool

    @property
    def pipeline(self) -> Path:
        return self.path / PIPELINE

    @property
    def data(self) -> dict[str, Path]:
        return data_paths(self.path / DATA)


def teacher_dir(config: T2ITeacherConfig, cache_dir: str | os.PathLike | None = None) -> Path:
    from .store import cache_root

    return cache_root(cache_dir) / KIND / f"{NAME}-{config_hash(config.to_dict())}"


def load_or_train_t2i_teacher(cache_dir: str | os.PathLike | None = None, force: bool = False, progress: bool = True,
                              **overrides: Any) -> T2ITeacher:
    """The cached ``mnist-t2i`` teacher for this config, or train it (always with ``force``): the pipeline
    folder and the data folders, then ``config.json`` last (a folder without it is incomplete)."""
    config = t2i_config(**overrides)
    path = teacher_dir(config, cache_dir)
    record = path / RECORD
    if record.is_file() and not force:
        try:
            stats = json.loads(record.read_text())["stats"]
        except (OSError, ValueError, KeyError) as err:
            raise ValueError(f"the cached teacher record {record} is damaged ({err}); delete {path} or retrain "
                             "with --force") from None
        return T2ITeacher(path, config, stats, trained=False)
    made = not path.exists()
    try:
        check_writable(path, need=128 * 2**20)  # data folders and pipeline: about 50 MB
        record.unlink(missing_ok=True)
        write_data(path / DATA)
        stats = fit_t2i_teacher(config, path / PIPELINE, progress)
        atomic_write_text(record, json.dumps({"kind": KIND, "name": NAME, "config": config.to_dict(),
                                              "stats": stats}, indent=2, sort_keys=True))
    except BaseException:  # a full disk, a stop signal: no incomplete entry of ours is left behind
        if made:
            shutil.rmtree(path, ignore_errors=True)
        raise
    return T2ITeacher(path, config, stats, trained=True)


# --- evaluation --------------------------------------------------------------------------------------


class DigitJudge:
    """The built-in MNIST feature classifier as a judge of generated 32 px digits
    (:class:`proreflow.sd.t2i.Judge`): features and predicted class of uint8 N x 3 x 32 x 32 images
    through :func:`to_grey28`; ``reference``: the features of real images (set with :meth:`set_reference`)."""

    name = "built-in MNIST classifier"
    classes = 10

    def __init__(self, cache_dir: str | os.PathLike | None = None, progress: bool = True) -> None:
        from .classifier import load_or_train_classifier

        self.classifier = load_or_train_classifier("mnist", cache_dir=cache_dir, progress=progress)
        self.reference = torch.empty(0)

    @staticmethod
    def _input(images: Tensor) -> Tensor:
        if tuple(images.shape[-2:]) != (RESOLUTION, RESOLUTION):
            raise ValueError(f"the built-in digit classifier judges {RESOLUTION} x {RESOLUTION} images (the "
                             f"{NAME} teacher's size), got {tuple(images.shape[-2:])}: evaluate at --resolution "
                             f"{RESOLUTION}")
        return to_grey28(images.float() / 255 if images.dtype == torch.uint8 else images)

    def features(self, images: Tensor) -> Tensor:
        return self.classifier.features(self._input(images))

    def predict(self, images: Tensor) -> Tensor:
        return self.classifier.predict(self._input(images))

    def set_reference(self, images: Tensor) -> DigitJudge:
        """Take the features of real images (uint8 N x 3 x 32 x 32) as the reference of the FD."""
        self.reference = self.features(images)
        return self


JUDGES = {"mnist": DigitJudge}
"""``proreflow eval --classifier NAME``: the built-in judges of generated images."""
