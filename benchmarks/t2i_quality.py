"""Text-to-image quality benchmark: the Stable Diffusion path on the built-in mnist-t2i teacher.

Every method is a set of overrides of ``configs/mnist-t2i.yaml`` (ProReflow-II, cfg_sync, 400 optimiser
steps), trained, exported and evaluated exactly as a user runs them (``proreflow train``, ``proreflow
export``, ``proreflow eval`` in subprocesses), at equal optimiser steps:

- ``ProReflow-II``: the config as it is (full student);
- ``ProReflow-II LoRA``: the same with ``setup.lora_rank`` (LoRA on the UNet's attention projections);
- ``ProReflow-II LoRA unet lr 8e-4``: LoRA on LCM-LoRA's targets (``setup.lora_targets: unet``) at 10x the
  learning rate (docs/research/2026-12-07-text-to-image.md, round 4);
- ``ProReflow-II baked``: guidance 4 baked into the targets (``guidance_mode: baked``), sampled at 1;
- ``PeRFlow``: one stage of 4 windows, 8 solver steps per window, plain MSE (``alpha 0``, no window
  weighting, no start share), PeRFlow's public recipe;
- ``2-Rectified Flow``: one window, 32 solver steps, plain MSE;
- ``ProReflow any-step``: the ``proreflow-any-step`` preset's change to the config: the last stage trains 4-, 2-
  and 1-window targets at once, step-conditioned, ``alpha`` 10; exported once per step count (``export --steps``).

Each run is evaluated on the held-out captions (templates never seen in training) against the teacher's
DDIM-32 with the built-in MNIST classifier (FD in its features against the held-out real images, and the
accuracy of the digit each caption names); the teacher's DDIM-32 / 8 / 4 / 2 / 1 and DPM-Solver++ 4 are
evaluated once per seed (the seed of the evaluation noise). ``--fid-methods`` adds Inception FID rows
(slow on a CPU). Rows go to ``--out`` (a JSON run file) and, with ``--merge``, replace the ``mnist-t2i``
rows of ``docs/results.json``.

    python benchmarks/t2i_quality.py --seeds 0 1 2 --jobs 2 --work /tmp/t2i --out docs/research/runs/t2i.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "mnist-t2i.yaml"
PLAIN_MSE = ["defaults.alpha=0", "defaults.loss_weighting=none", "defaults.start_share=0"]
METHODS: dict[str, list[str]] = {
    "ProReflow-II": [],
    "ProReflow-II LoRA": ["setup.lora_rank=16"],
    "ProReflow-II LoRA unet lr 8e-4": ["setup.lora_rank=16", "setup.lora_targets=unet", "defaults.lr=8.0e-4"],
    "ProReflow-II baked": ["defaults.guidance_mode=baked"],
    "PeRFlow": [*PLAIN_MSE, "stages=[{windows: 4, steps: 400, solver_steps: 8}]"],
    "2-Rectified Flow": [*PLAIN_MSE, "stages=[{windows: 1, steps: 400, solver_steps: 32}]"],
    "ProReflow any-step": ["stages.2.windows=4", "stages.2.extra_windows=[2, 1]", "step_conditioning=true",
                           "defaults.alpha=10.0"],
    "ProReflow any-step, extra teacher previous": [
        "stages.2.windows=4", "stages.2.extra_windows=[2, 1]", "step_conditioning=true", "defaults.alpha=10.0",
        "stages.2.extra_teacher=previous"],
}
"""Method -> overrides of configs/mnist-t2i.yaml (module doc)."""
STUDENT_STEPS = "4,2,1"
DATA = "mnist-t2i"


THREADS = {"count": "1"}
"""CPU threads of each subprocess (the first run, alone, takes every core)."""


def proreflow(*words: str, log: Path) -> None:
    """``proreflow WORDS`` in a subprocess on ``THREADS`` CPU threads, its output in ``log``; raises on failure."""
    env = {**os.environ, "OMP_NUM_THREADS": THREADS["count"], "MKL_NUM_THREADS": THREADS["count"],
           "HF_HUB_OFFLINE": "1"}
    with open(log, "a") as out:
        out.write(f"$ proreflow {' '.join(words)}\n")
        out.flush()
        done = subprocess.run([sys.executable, "-m", "proreflow.cli", *words], stdout=out, stderr=subprocess.STDOUT,
                              env=env)
    if done.returncode != 0:
        raise RuntimeError(f"proreflow {words[0]} failed ({done.returncode}): see {log}")


def evaluate(teacher, student: Path, seed: int, out: Path, samples: int, log: Path, fid: bool,
             baselines: bool, steps: str = STUDENT_STEPS) -> list[dict]:
    words = ["eval", "--teacher", str(teacher.pipeline), "--images", str(teacher.data["heldout"]), "--classifier",
             "mnist", "--num", str(samples), "--teacher-steps", "32", "--batch-size", "100", "--device", "cpu",
             "--seed", str(seed), "--out", str(out), "--workers", "0", "--fid" if fid else "--no-fid"]
    words += ["--student", str(student), "--steps", "2" if baselines else steps]
    if baselines:  # the teacher's rows; the student row (the teacher's UNet as a student) is not kept
        words += ["--teacher-baselines", "8,4,2,1", "--dpm-solver-steps", "4"]
    proreflow(*words, log=log)
    return json.loads((out / "results.json").read_text())["results"]


def teacher_evaluations(run: Path) -> int:
    """Teacher network evaluations of a run, summed over its stage summaries (``summary.json``)."""
    return sum(stage["teacher_evals"] for stage in json.loads((run / "summary.json").read_text()))


def one_run(method: str, seed: int, teacher, work: Path, samples: int, fid_methods: set[str]) -> list[dict]:
    """Train (or resume), export and evaluate one method at one seed; its student rows. A finished run
    keeps its training time (``train_seconds.txt``) and its evaluation is reused."""
    folder = work / f"{re.sub(r'[^A-Za-z0-9]+', '-', method).strip('-')}_s{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    log, seconds = folder / "commands.log", folder / "train_seconds.txt"
    start = time.perf_counter()
    proreflow("train", "--config", str(CONFIG), "--out", str(folder / "run"), "--resume", "--no-progress",
              f"setup.teacher={teacher.pipeline}", f"setup.data={teacher.data['train']}",
              f"setup.cache_dir={work / 'latents'}", f"seed={seed}", *METHODS[method], log=log)
    if not seconds.is_file():
        seconds.write_text(f"{time.perf_counter() - start:.1f}\n")
    info = json.loads((folder / "run" / "student.json").read_text())
    counts = info["served_windows"] if info.get("step_counts") else None
    evals = {None: folder / "eval"} if not counts else {n: folder / f"eval-{n}" for n in counts}
    for n, eval_dir in evals.items():  # a step-conditioned student: one export and evaluation per step count
        if not (eval_dir / "results.json").is_file():
            export = folder / ("export" if n is None else f"export-{n}")
            proreflow("export", "--run", str(folder / "run"), "--out", str(export),
                      *(() if n is None else ("--steps", str(n))), log=log)
            evaluate(teacher, export, seed, eval_dir, samples, log, method in fid_methods, baselines=False,
                     steps=STUDENT_STEPS if n is None else str(n))
    results = [r for eval_dir in evals.values() for r in json.loads((eval_dir / "results.json").read_text())["results"]]
    budget = {"budget": 400, "teacher_evals": teacher_evaluations(folder / "run"),
              "train_seconds": float(seconds.read_text())}
    return [row(method, seed, r, budget) for r in results if r["name"].startswith("student")]


def row(method: str, seed: int, result: dict, budget: dict | None = None) -> dict:
    return {"data": DATA, "seed": seed, "method": method, "steps": result["steps"], **(budget or {}),
            "samples": result["images"], "fd": result["fd"], "accuracy": result["accuracy"], "fid": result["fid"],
            "rmse_to_teacher": result["rmse_to_teacher"], "seconds_per_image": result["seconds_per_image"]}


def aggregate(rows: list[dict]) -> list[dict]:
    """Mean and sample standard deviation over seeds per (method, steps)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["steps"]), []).append(r)
    out = []
    for (method, steps), rs in groups.items():
        entry = {"data": DATA, "method": method, "steps": steps, "seeds": sorted(r["seed"] for r in rs)}
        for key in ("fd", "accuracy", "fid", "teacher_evals"):
            values = [r[key] for r in rs if r.get(key) is not None]
            if values:
                entry[key] = statistics.fmean(values)
                entry[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        out.append(entry)
    return out


def markdown(aggregated: list[dict]) -> str:
    """One row per method: seeds, teacher evaluations, FD and accuracy at 4 / 2 / 1 steps (mean ± std);
    teacher rows one per sampler."""
    def cell(a: dict | None, key: str) -> str:
        if a is None or key not in a:
            return "–"
        return f"{a[key]:.3f} ± {a[key + '_std']:.3f}" if len(a["seeds"]) > 1 else f"{a[key]:.3f}"

    lines = ["| method | seeds | teacher evals | FD 4 steps | 2 steps | 1 step | accuracy 4 steps | 2 steps | 1 step |",
             "|---|---|---|---|---|---|---|---|---|"]
    by_method: dict[str, dict[int, dict]] = {}
    for a in aggregated:
        by_method.setdefault(a["method"], {})[a["steps"]] = a
    for method, rows in by_method.items():
        if method.startswith("teacher"):
            a = next(iter(rows.values()))
            lines.append(f"| {method} | {len(a['seeds'])} | 0 | {cell(a, 'fd')} | | | {cell(a, 'accuracy')} | | |")
            continue
        first = next(iter(rows.values()))
        evals = f"{first['teacher_evals']:,.0f}" if "teacher_evals" in first else "–"
        lines.append(f"| {method} | {len(first['seeds'])} | {evals} | "
                     + " | ".join(cell(rows.get(n), "fd") for n in (4, 2, 1)) + " | "
                     + " | ".join(cell(rows.get(n), "accuracy") for n in (4, 2, 1)) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--samples", type=int, default=1000, help="held-out captions per evaluation (at most 1000)")
    parser.add_argument("--first-seed-only", nargs="*", default=[], choices=list(METHODS), metavar="METHOD",
                        help="methods run on the first seed only (the costliest baselines, where time is short)")
    parser.add_argument("--fid-methods", nargs="*", default=[], help="methods that also get Inception FID rows "
                        "(and the teacher when any is given)")
    parser.add_argument("--jobs", type=int, default=2, help="runs at once (one CPU thread each)")
    parser.add_argument("--work", type=Path, help="runs, exports and evaluations (required to run)")
    parser.add_argument("--cache-dir", default=None, help="teacher cache (default: $PROREFLOW_CACHE)")
    parser.add_argument("--out", type=Path, help="run file (JSON rows; required to run)")
    parser.add_argument("--merge", action="store_true", help="replace the mnist-t2i rows of docs/results.json")
    parser.add_argument("--table", type=Path, help="print the table of this run file and exit (no training)")
    args = parser.parse_args(argv)
    if args.table is not None:
        print(markdown(json.loads(args.table.read_text())["aggregate"]), end="")
        return 0
    if args.work is None or args.out is None:
        parser.error("--work and --out are required to run the benchmark")

    sys.path.insert(0, str(ROOT / "src"))
    from proreflow.builtin.t2i import load_or_train_t2i_teacher

    teacher = load_or_train_t2i_teacher(cache_dir=args.cache_dir)
    args.work.mkdir(parents=True, exist_ok=True)
    fid_methods = set(args.fid_methods)
    # the first seed of every method, then the later seeds method by method (an interrupted benchmark keeps
    # whole comparisons); a finished run is resumed as finished and its evaluation reused
    jobs = [(m, args.seeds[0]) for m in args.methods] + [(m, s) for m in args.methods for s in args.seeds[1:]
                                                          if m not in args.first_seed_only]
    teacher_as_student(teacher, args.work)
    rows: list[dict] = []

    def save() -> list[dict]:  # after every finished job, so an interrupted benchmark keeps what it measured
        aggregated = aggregate(rows)
        payload = {"argv": sys.argv[1:], "date": time.strftime("%Y-%m-%d"), "machine": os.uname().machine,
                   "cpus": os.cpu_count(), "rows": rows, "aggregate": aggregated}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(payload, indent=1) + "\n")
        return aggregated

    THREADS["count"] = str(args.jobs)
    rows += one_run(*jobs[0], teacher, args.work, args.samples, fid_methods)  # alone: it fills the latent cache
    save()
    THREADS["count"] = "1"
    with ThreadPoolExecutor(args.jobs) as pool:
        futures = {("teacher", s): pool.submit(teacher_rows, teacher, s, args, bool(fid_methods)) for s in args.seeds}
        futures.update({job: pool.submit(one_run, *job, teacher, args.work, args.samples, fid_methods)
                        for job in jobs[1:]})
        for job, future in futures.items():
            rows += future.result()
            save()
            print(f"done: {job[0]} seed {job[1]}", flush=True)
    aggregated = save()
    print(markdown(aggregated))
    if args.merge:
        results = ROOT / "docs" / "results.json"
        data = json.loads(results.read_text())
        data["rows"] = [r for r in data["rows"] if r.get("data") != DATA] + rows
        data["aggregate"] = [a for a in data.get("aggregate", []) if a.get("data") != DATA] + aggregated
        results.write_text(json.dumps(data, indent=1) + "\n")
    return 0


def teacher_as_student(teacher, work: Path) -> Path:
    """The teacher's UNet exported as a 2-window student at guidance 4 (``proreflow eval`` needs a student)."""
    export = work / "teacher-as-student"
    if not (export / "model_index.json").is_file():
        from proreflow.sd.export import export_pipeline
        from proreflow.sd.pipeline import load_teacher

        sd = load_teacher(teacher.pipeline)
        export_pipeline(sd.unet, sd, export, num_windows=2, guidance=4.0)
    return export


def teacher_rows(teacher, seed: int, args, fid: bool) -> list[dict]:
    """The teacher's DDIM-32 / 8 / 4 / 2 / 1 and DPM-Solver++ 4, on the evaluation noise of ``seed``; the
    student rows of this evaluation (the teacher's UNet as a 2-window student) are dropped."""
    folder = args.work / f"teacher_s{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    if (folder / "eval" / "results.json").is_file():
        results = json.loads((folder / "eval" / "results.json").read_text())["results"]
    else:
        results = evaluate(teacher, teacher_as_student(teacher, args.work), seed, folder / "eval", args.samples,
                           folder / "commands.log", fid, baselines=True)
    return [row(r["name"], seed, r) for r in results if r["name"].startswith("teacher")]


if __name__ == "__main__":
    sys.exit(main())
