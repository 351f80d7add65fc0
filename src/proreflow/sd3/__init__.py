"""The Stable Diffusion 3 family: flow-matching transformer teachers (SD3 / SD3.5, ``StableDiffusion3Pipeline``).

- :mod:`~proreflow.sd3.pipeline`: load a pipeline folder (T5 optional), encode prompts (sequence
  + pooled states) and images (VAE latents with ``shift_factor`` / ``scaling_factor``), the
  teacher's :class:`~proreflow.flow.FlowSchedule` and the transformer's network adapter;
- :mod:`~proreflow.sd3.setup`: the ``stable-diffusion-3`` setup (a ``DistillationSetup``);
- :mod:`~proreflow.sd3.export`: a stock ``StableDiffusion3Pipeline`` with the student's
  transformer, or LoRA weights for its base, and the window-edge sigmas of its stock
  ``FlowMatchEulerDiscreteScheduler``; loading an export back (``proreflow sample`` / ``eval``);
- :mod:`~proreflow.sd3.t2i`: the teacher's Euler-N and the student as methods of
  :func:`proreflow.sd.t2i.evaluate` (``proreflow eval``).
"""
