"""``proreflow teacher``: train (or reuse) the DDPM or flow-matching teacher of a built-in dataset.

    proreflow teacher --data digits                 # trains once, then reuses the cache
    proreflow teacher --data digits --teacher flow --eval
    proreflow teacher --data mnist --steps 4000 --force --eval
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..builtin import DATASETS
    from ..builtin.teacher import TEACHER_KINDS
    from . import bounded_int, finite_float

    parser.add_argument("--data", required=True, choices=sorted(DATASETS), help="built-in dataset")
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
