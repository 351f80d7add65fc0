"""The PixArt family: DiT teachers on the VP path (PixArt-alpha, PixArt-Sigma: ``PixArtTransformer2DModel``).

- :mod:`~proreflow.pixart.pipeline`: load a pipeline folder, encode prompts (T5 states and their
  mask; PixArt-alpha 1024's size conditions), the transformer's network adapter (learned variance:
  the first half of the output);
- :mod:`~proreflow.pixart.setup`: the ``pixart`` setup (a ``DistillationSetup``, full or LoRA);
- :mod:`~proreflow.pixart.export`: a stock PixArt pipeline with the student's transformer and a
  trailing ``DDIMScheduler``.

The VAE, the image-caption readers, the latent cache, LoRA and the pipeline export are the Stable
Diffusion family's (:mod:`proreflow.sd`), which this family imports, not copies.
"""
