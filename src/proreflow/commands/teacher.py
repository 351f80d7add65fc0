"""``proreflow teacher``: train (or reuse) the DDPM or flow-matching teacher of a built-in dataset.

    proreflow teacher --data digits                 # trains once, then reuses the cache
    proreflow teacher --data digits --teacher flow --eval
    proreflow teacher --data mnist --steps 4000 --force --eval
    proreflow teacher --data mnist-t2i --eval      # the text-to-image teacher: a Stable Diffusion pipeline folder
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..builtin import DATASETS
    from ..builtin.t2i import NAME as T2I
    from ..builtin.teacher import TEACHER_KINDS
    from . import bounded_int, finite_float

    parser.add_argument("--data", required=True, choices=sorted([*DATASETS, T2I]),
                        help=f"built-in dataset; {T2I}: the text-to-image teacher, a StableDiffusionPipeline folder "
                             "trained on MNIST with captions, and its data folders (proreflow.builtin.t2i)")
    parser.add_argument("--teacher", choices=TEACHER_KINDS, default="ddpm",
                        help="ddpm (epsilon prediction, default) or flow (flow matching: predicts eps - x0 on "
                             "x = (1 - sigma) x0 + sigma eps, sampled by Euler)")
    parser.add_argument("--steps", type=bounded_int(1, 10**7), default=None,
                        help="training steps (default: the dataset's default)")
    parser.add_argument("--batch-size", type=bounded_int(1, 65536), default=None,
                        help="batch size (default: the dataset's default)")
    parser.add_argument("--lr", type=finite_float(0, 1), default=None,
                        help="peak learning rate (default: the dataset's default)")
    parser.add_argument("--seed", type=bounded_int(0, 2**63 - 1), default=None,
                        help="seed of initialisation and batches (default 0)")
    parser.add_argument("--cache-dir", default=None,
                        help="cache root (default: $PROREFLOW_CACHE or ~/.cache/proreflow); "
                             "the teacher goes to <root>/teachers/<data>-<hash of config>/")
    parser.add_argument("--force", action="store_true", help="train again even if a cached teacher exists")
    parser.add_argument("--device", default="cpu", help="torch device to train on (default cpu)")
    parser.add_argument("--eval", action="store_true",
                        help="sample DDIM-32 (flow: Euler-32) and print its metrics (2D: distances to the true "
                             "distribution; images: FD and class accuracy with the dataset's feature classifier)")
    parser.add_argument("--guidance", type=finite_float(0, 100), default=2.0,
                        help="guidance scale of --eval on labelled data")
    parser.add_argument("--samples", type=bounded_int(2, 10**6), default=None,
                        help="number of samples of --eval (default: 10000 for 2D data, whose distances have a "
                             "finite-sample floor of about 1 / sqrt(n); 1000 images)")
    parser.add_argument("--threads", type=bounded_int(1, 1024), default=None,
                        help="CPU threads of torch (the small networks often train fastest on 1, "
                             "always on a machine that other jobs keep busy)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    import torch

    from ..builtin import get_spec
    from ..builtin.suite import make_eval_set, quality
    from ..builtin.teacher import SAMPLER_NAMES, load_or_train_teacher
    from . import check_device, writable_dir

    check_device(args.device)
    if args.cache_dir is not None:
        writable_dir(args.cache_dir, "--cache-dir")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.data == "mnist-t2i":
        return _text_to_image(args)
    teacher = load_or_train_teacher(args.data, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                                    seed=args.seed, teacher=args.teacher, cache_dir=args.cache_dir,
                                    force=args.force, device=args.device, progress=not args.quiet)
    how = f"trained in {teacher.stats['train_seconds']:.0f} s" if teacher.trained else "reused from the cache"
    kind = "" if args.teacher == "ddpm" else f"{args.teacher} "
    print(f"{kind}teacher {args.data} ({teacher.config.steps} steps): {teacher.path} ({how})")
    if args.eval:
        spec = get_spec(args.data)
        guidance = args.guidance if spec.num_classes else 1.0
        n = args.samples or (10_000 if spec.is_2d else 1000)
        evalset = make_eval_set(args.data, teacher.denoiser(), n, guidance, cache_dir=args.cache_dir,
                                progress=not args.quiet)  # its reference is the teacher's DDIM-32 / Euler-32 output
        metrics = {k: v for k, v in quality(evalset, evalset.reference).items() if k != "fidelity"}
        print(f"{SAMPLER_NAMES[args.teacher]}-32, guidance {guidance:g}, {n} samples: "
              + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    return 0


def _text_to_image(args: argparse.Namespace) -> int:
    """``--data mnist-t2i``: train (or reuse) the text-to-image teacher; with --eval, its DDIM-32 on the held-out
    captions (FD in the MNIST classifier's features and prompt accuracy)."""
    from ..builtin.t2i import load_or_train_t2i_teacher

    if args.teacher != "ddpm" or args.device != "cpu" or args.batch_size or args.lr:
        raise ValueError("--data mnist-t2i takes --steps, --seed, --cache-dir, --force, --eval, --guidance and "
                         "--samples (its teacher is an epsilon Stable Diffusion pipeline trained on the CPU)")
    teacher = load_or_train_t2i_teacher(cache_dir=args.cache_dir, force=args.force, progress=not args.quiet,
                                        steps=args.steps, seed=args.seed)
    how = f"trained in {teacher.stats['train_seconds']:.0f} s" if teacher.trained else "reused from the cache"
    print(f"teacher mnist-t2i: StableDiffusionPipeline folder {teacher.pipeline} ({how}); data: "
          + ", ".join(f"{k} {v}" for k, v in teacher.data.items()))
    if args.eval:
        rows = evaluate_t2i_teacher(teacher, [32], args.guidance, args.samples or 1000, args.cache_dir,
                                    progress=not args.quiet)
        for row in rows:
            print(f"{row.name}, guidance {args.guidance:g}, {row.images} held-out prompts: FD {row.fd:.4f}, "
                  f"accuracy {row.accuracy:.4f}")
    return 0


def evaluate_t2i_teacher(teacher, steps: list[int], guidance: float, samples: int, cache_dir=None,
                         progress: bool = True):
    """The teacher's DDIM-n (``n`` in ``steps``) on the first ``samples`` held-out captions: eval rows."""
    import torch
    from diffusers import StableDiffusionPipeline

    from ..builtin.t2i import DigitJudge
    from ..sd.coco import load_image_folder
    from ..sd.fid import load_reference_image
    from ..sd.pipeline import SDTeacher
    from ..sd.t2i import ddim_sampler, evaluate

    prompt_set = load_image_folder(teacher.data["heldout"], samples)
    judge = DigitJudge(cache_dir, progress).set_reference(
        torch.stack([load_reference_image(p, None) for p in prompt_set.image_paths]))
    pipe = StableDiffusionPipeline.from_pretrained(teacher.pipeline)
    methods = [ddim_sampler(pipe, n, guidance) for n in steps]
    sd = SDTeacher(pipe, str(teacher.pipeline))
    evaluation = evaluate(methods[0], methods[1:], prompt_set.prompts, sd.latent_shape(sd.resolution), batch_size=100,
                          judge=judge, labels=prompt_set.labels, progress=progress)
    return evaluation.results
