"""``proreflow teacher``: train (or reuse) the DDPM teacher of a built-in dataset.

    proreflow teacher --data digits                 # trains once, then reuses the cache
    proreflow teacher --data mnist --steps 4000 --force --eval
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..data import DATASETS

    parser.add_argument("--data", required=True, choices=sorted(DATASETS), help="built-in dataset")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: the dataset's default)")
    parser.add_argument("--batch-size", type=int, default=None, help="batch size (default: the dataset's default)")
    parser.add_argument("--lr", type=float, default=None, help="peak learning rate (default: the dataset's default)")
    parser.add_argument("--seed", type=int, default=None, help="seed of initialisation and batches (default 0)")
    parser.add_argument("--cache-dir", default=None,
                        help="cache root (default: $PROREFLOW_CACHE or ~/.cache/proreflow); "
                             "the teacher goes to <root>/teachers/<data>-<hash of config>/")
    parser.add_argument("--force", action="store_true", help="train again even if a cached teacher exists")
    parser.add_argument("--device", default="cpu", help="torch device to train on (default cpu)")
    parser.add_argument("--eval", action="store_true",
                        help="sample DDIM-32 and print its metrics (2D: distances to the true distribution; "
                             "images: FD and class accuracy with the dataset's feature classifier)")
    parser.add_argument("--guidance", type=float, default=2.0, help="guidance scale of --eval on labelled data")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from ..data import get_spec
    from ..evaluation import evaluate_sampler
    from ..training.teacher import load_or_train_teacher
    from ..windows import TimeWindows

    teacher = load_or_train_teacher(args.data, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                                    seed=args.seed, cache_dir=args.cache_dir, force=args.force,
                                    device=args.device, progress=not args.quiet)
    how = f"trained in {teacher.stats['train_seconds']:.0f} s" if teacher.trained else "reused from the cache"
    print(f"teacher {args.data} ({teacher.config.steps} steps): {teacher.path} ({how})")
    if args.eval:
        guidance = args.guidance if get_spec(args.data).num_classes else 1.0
        teacher.module.to(args.device)
        metrics = evaluate_sampler(args.data, teacher.denoiser(), TimeWindows(32), 32, guidance=guidance,
                                   cache_dir=args.cache_dir, device=args.device)
        print(f"DDIM-32, guidance {guidance:g}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    return 0
