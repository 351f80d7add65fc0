"""Fault campaign: malformed inputs and faults through the real command line, as a user and an operator meet them.

Each case runs ``proreflow ...`` in a subprocess and gets a verdict against what it should do:

- ``refused``: bad input, one line on stderr and exit code 2 (a damaged file the user names is bad input);
- ``failed``: an environment or run-time failure (a full disk, a damaged file of a run's own), one line and
  exit code 1;
- ``stopped``: a stop signal, one line and 128 + its number;
- ``accepted``: a valid input with a documented meaning (the case says which), exit code 0.

A verdict is ``ok`` or one of: ``traceback``, ``hang`` (over ``--limit`` seconds), ``silently accepted`` (exit 0
where a refusal was due), ``wrong code``, ``several lines`` (more than one line on stderr, progress bars aside),
``left files`` (a temporary, or a half-written output, left behind). The fixtures are the built-in text-to-image
teacher (``proreflow teacher --data mnist-t2i``, the cached one), a 2-step run of ``configs/mnist-t2i.yaml`` on
it, its export, and a built-in ``moons`` run. The table goes to ``--report`` with the command, machine and date.

    python benchmarks/faults.py --work /tmp/faults --report docs/research/fault-campaign.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CODES = {"refused": 2, "failed": 1, "accepted": 0}


@dataclass
class Case:
    """One input or fault. ``argv``: the words after ``proreflow``, where ``{T}`` etc. name the fixtures
    (:func:`fixtures`) and ``{case}`` the case's own folder; ``prepare(folder)`` builds what the case reads;
    ``signal_after``: (signal, seconds) sent to the process; ``file_limit``: RLIMIT_FSIZE in bytes (a full
    disk as the process sees it: writes past it fail with EFBIG); ``check(folder)``: files the case must
    (not) leave, returns a complaint or None."""

    id: str
    group: str
    argv: list[str]
    expect: str = "refused"
    meaning: str = ""
    prepare: Callable[[Path], None] | None = None
    env: dict[str, str] = field(default_factory=dict)
    signal_after: tuple[int, float] | None = None
    file_limit: int | None = None
    check: Callable[[Path], str | None] | None = None


# --- fixtures ---------------------------------------------------------------------------------------------


def run(words: list[str], log: Path, env: dict | None = None) -> None:
    with open(log, "a") as out:
        subprocess.run([sys.executable, "-m", "proreflow.cli", *words], check=True, stdout=out, stderr=out,
                       env={**os.environ, **(env or {})})


def fixtures(work: Path) -> dict[str, str]:
    """The teacher pipeline (P), its train / held-out data (D / H), an SD run (R), its export (E) and LoRA
    export (L), a built-in moons run (B) and its config (BC), the SD config (C)."""
    from proreflow.builtin.t2i import load_or_train_t2i_teacher

    teacher = load_or_train_t2i_teacher(progress=False)
    log = work / "fixtures.log"
    f = {"P": str(teacher.pipeline), "D": str(teacher.data["train"]), "H": str(teacher.data["heldout"]),
         "R": str(work / "sd-run"), "E": str(work / "sd-export"), "L": str(work / "sd-lora"),
         "B": str(work / "moons-run"), "C": str(ROOT / "configs" / "mnist-t2i.yaml"), "BC": str(work / "moons.yaml")}
    tiny = ["stages.*.steps=2", "defaults.batch_size=8", "defaults.warmup_steps=0", "checkpoint_every=1"]
    if not Path(f["R"], "student.safetensors").is_file():
        run(["train", "--config", f["C"], f"setup.teacher={f['P']}", f"setup.data={f['D']}",
             f"setup.cache_dir={work / 'latents'}", "--out", f["R"], "--no-progress", *tiny], log)
    if not Path(f["E"]).is_dir():
        run(["export", "--run", f["R"], "--out", f["E"]], log)
    if not Path(f["L"]).is_dir():
        run(["export", "--run", f["R"], "--out", f["L"], "--lora", "--lora-rank", "4"], log)
    Path(f["BC"]).write_text("setup: {name: moons}\nname: moons-tiny\nseed: 0\ncheckpoint_every: 1\n"
                             "defaults: {steps: 2, batch_size: 16}\nstages: [{windows: 2}]\n")
    if not Path(f["B"], "student.safetensors").is_file():
        run(["train", "--config", f["BC"], "--out", f["B"], "--no-progress"], log)
    return f


# --- cases ------------------------------------------------------------------------------------------------


def write(name: str, data: bytes | str) -> Callable[[Path], None]:
    """``prepare``: the case folder holds file ``name`` with ``data``."""
    def prepare(folder: Path) -> None:
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data.encode() if isinstance(data, str) else data)
    return prepare


def copy_of(fixture: str, edit: Callable[[Path], None]) -> Callable[[Path], None]:
    """``prepare``: ``{case}/copy`` is a copy of the fixture folder, then ``edit(copy)``."""
    def prepare(folder: Path) -> None:
        shutil.copytree(FIXTURES[fixture], folder / "copy")
        edit(folder / "copy")
    return prepare


def truncate(rel: str, keep: float = 0.5) -> Callable[[Path], None]:
    def edit(root: Path) -> None:
        path = root / rel
        data = path.read_bytes()
        path.write_bytes(data[: int(len(data) * keep)])
    return edit


def overwrite(rel: str, data: bytes | str) -> Callable[[Path], None]:
    def edit(root: Path) -> None:
        (root / rel).write_bytes(data.encode() if isinstance(data, str) else data)
    return edit


def remove(rel: str) -> Callable[[Path], None]:
    def edit(root: Path) -> None:
        path = root / rel
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    return edit


def nan_weights(rel: str) -> Callable[[Path], None]:
    """The safetensors file ``rel`` with its first floating tensor set to NaN (a well-formed file)."""
    def edit(root: Path) -> None:
        import torch
        from safetensors.torch import load_file, save_file

        tensors = load_file(str(root / rel))
        name = next(k for k, v in tensors.items() if v.is_floating_point())
        tensors[name] = torch.full_like(tensors[name], float("nan"))
        save_file(tensors, str(root / rel), metadata={"format": "pt"})
    return edit


def json_edit(rel: str, change: Callable[[dict], object]) -> Callable[[Path], None]:
    def edit(root: Path) -> None:
        data = json.loads((root / rel).read_text())
        data = change(data) or data
        (root / rel).write_text(json.dumps(data))
    return edit


def no_temporaries(folder: Path) -> str | None:
    left = [str(p.relative_to(folder)) for p in folder.rglob("*") if re.fullmatch(r"\..+\.(tmp|old)-\d+", p.name)]
    return f"temporaries left: {left}" if left else None


def nothing_at(rel: str) -> Callable[[Path], str | None]:
    def check(folder: Path) -> str | None:
        return no_temporaries(folder) or (f"{rel} was written" if (folder / rel).exists() else None)
    return check


def option_cases() -> list[Case]:
    """Every number-taking option of every command with values outside its domain (the parsers' own checks)."""
    from proreflow.cli import build_parser

    parser = build_parser(load="*")
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    base = {"sample": ["--model", "{E}", "--prompt", "a"], "export": ["--run", "{R}", "--out", "{case}/x"],
            "eval": ["--teacher", "{P}", "--student", "{E}", "--images", "{H}"], "teacher": ["--data", "moons"],
            "demo": [], "train": ["--config", "{BC}"]}
    cases = []
    for name, sp in sub.choices.items():
        for action in sp._actions:
            kind = getattr(action.type, "__qualname__", "")
            if not action.option_strings or not kind.startswith(("bounded_int", "finite_float", "_steps")):
                continue
            option = action.option_strings[-1]
            bad = (["-1", "1e400", "0x10", "", "1.5"] if kind.startswith("bounded_int")
                   else ["nan", "-inf", "1e400", "1,5", ""] if kind.startswith("finite_float")
                   else ["0", "1,,2", "2,x", "-4", ""])
            for value in bad:
                cases.append(Case(f"{name} {option}={value!r}", "options", [name, *base[name], option, value]))
    return cases


def cases() -> list[Case]:
    sample = ["sample", "--prompt", "a handwritten digit seven", "--out", "{case}/out"]
    ev = ["eval", "--teacher", "{P}", "--classifier", "mnist", "--steps", "1", "--num", "4", "--teacher-steps", "2",
          "--no-fid", "--batch-size", "4", "--out", "{case}/out"]
    ev_h = [*ev, "--student", "{E}", "--images", "{H}"]
    export = ["export", "--out", "{case}/out"]
    sd_train = ["train", "--config", "{C}", "setup.teacher={P}", "setup.data={D}", "--out", "{case}/run",
                "--no-progress", "stages.*.steps=2", "defaults.batch_size=8", "defaults.warmup_steps=0"]
    jsonl = "metadata.jsonl"
    one_png = _png(32)  # the judge's size: the eval cases reach the check they are about
    c: list[Case] = []
    add = c.append

    # sample: the model folder
    add(Case("sample: --model is a run folder, not an export", "sample", [*sample, "--model", "{R}"]))
    add(Case("sample: --model is the teacher pipeline (no student)", "sample", [*sample, "--model", "{P}"]))
    add(Case("sample: --model model_index.json garbage", "sample", [*sample, "--model", "{case}/copy"],
             prepare=copy_of("E", overwrite("model_index.json", "{not json"))))
    add(Case("sample: --model model_index.json a list", "sample", [*sample, "--model", "{case}/copy"],
             prepare=copy_of("E", overwrite("model_index.json", "[1, 2]"))))
    add(Case("sample: --model unet weights truncated", "sample", [*sample, "--model", "{case}/copy"],
             prepare=copy_of("E", truncate("unet/diffusion_pytorch_model.safetensors"))))
    add(Case("sample: --model unet weights NaN", "sample", [*sample, "--model", "{case}/copy"],
             prepare=copy_of("E", nan_weights("unet/diffusion_pytorch_model.safetensors")),
             check=nothing_at("out")))
    add(Case("sample: --model unet folder missing", "sample", [*sample, "--model", "{case}/copy"],
             prepare=copy_of("E", remove("unet"))))
    add(Case("sample: --model vae config garbage", "sample", [*sample, "--model", "{case}/copy"],
             prepare=copy_of("E", overwrite("vae/config.json", "\x00\x01"))))
    add(Case("sample: --model proreflow.json garbage", "sample", [*sample, "--model", "{case}/copy"],
             prepare=copy_of("E", overwrite("proreflow.json", "{"))))
    add(Case("sample: --model proreflow.json windows 0", "sample", [*sample, "--model", "{case}/copy"],
             prepare=copy_of("E", json_edit("proreflow.json", lambda d: d.update(num_windows=0)))))
    add(Case("sample: --model proreflow.json windows 'two'", "sample", [*sample, "--model", "{case}/copy"],
             prepare=copy_of("E", json_edit("proreflow.json", lambda d: d.update(num_windows="two")))))
    add(Case("sample: --model scheduler config deleted", "sample", [*sample, "--model", "{case}/copy"],
             prepare=copy_of("E", remove("scheduler"))))
    add(Case("sample: --model a file", "sample", [*sample, "--model", "{case}/f"], prepare=write("f", "x")))
    add(Case("sample: --model an empty folder", "sample", [*sample, "--model", "{case}/e"],
             prepare=lambda d: (d / "e").mkdir()))
    add(Case("sample: --lora is a full export", "sample", [*sample, "--model", "{P}", "--lora", "{E}"]))
    add(Case("sample: --lora of another base", "sample", [*sample, "--model", "{E}", "--lora", "{L}"],
             "accepted", "documented: a LoRA applies to any pipeline of its base's architecture"))
    add(Case("sample: --lora weights truncated", "sample", [*sample, "--model", "{P}", "--lora", "{case}/copy"],
             prepare=copy_of("L", truncate("pytorch_lora_weights.safetensors"))))
    add(Case("sample: --steps 3 on a 2-window student", "sample", [*sample, "--model", "{E}", "--steps", "3"],
             "accepted", "documented: steps spread over the windows, earlier windows take the rest"))
    add(Case("sample: --windows 3 with 4 steps", "sample", [*sample, "--model", "{E}", "--windows", "3",
                                                             "--steps", "4"],
             "accepted", "documented: --windows overrides the export's windows"))
    add(Case("sample: --height 20 (not a multiple of 8)", "sample", [*sample, "--model", "{E}", "--height", "20"]))
    add(Case("sample: --width 36", "sample", [*sample, "--model", "{E}", "--width", "36"]))
    add(Case("sample: --prompt ''", "sample", ["sample", "--model", "{E}", "--prompt", "", "--out", "{case}/out"],
             "accepted", "an empty prompt is the unconditional prompt"))
    add(Case("sample: --prompts empty file", "sample", ["sample", "--model", "{E}", "--prompts", "{case}/p.txt",
                                                        "--out", "{case}/out"], prepare=write("p.txt", "")))
    add(Case("sample: --prompts blank lines only", "sample", ["sample", "--model", "{E}", "--prompts",
                                                              "{case}/p.txt", "--out", "{case}/out"],
             prepare=write("p.txt", "\n  \n\t\n")))
    add(Case("sample: --prompts not UTF-8", "sample", ["sample", "--model", "{E}", "--prompts", "{case}/p.txt",
                                                       "--out", "{case}/out"],
             prepare=write("p.txt", b"\xff\xfe\x00a")))
    add(Case("sample: --prompts a folder", "sample", ["sample", "--model", "{E}", "--prompts", "{case}",
                                                      "--out", "{case}/out"]))
    add(Case("sample: --prompts with NUL bytes", "sample", ["sample", "--model", "{E}", "--prompts", "{case}/p.txt",
                                                            "--out", "{case}/out"], "accepted",
             "a prompt is any text (the tokenizer reads a NUL as any other character)",
             prepare=write("p.txt", "a\x00b\n")))
    add(Case("sample: a 10,000-word prompt", "sample", ["sample", "--model", "{E}", "--prompt", "seven " * 10000,
                                                        "--out", "{case}/out"],
             "accepted", "truncated to the tokenizer's length, as diffusers does (it warns)"))
    add(Case("sample: --out is a file", "sample", [*sample[:-2], "--model", "{E}", "--out", "{case}/f"],
             prepare=write("f", "x")))
    add(Case("sample: --out below a file", "sample", [*sample[:-2], "--model", "{E}", "--out", "{case}/f/out"],
             prepare=write("f", "x")))
    add(Case("sample: --out name of 300 characters", "sample", [*sample[:-2], "--model", "{E}", "--out",
                                                                "{case}/" + "o" * 300]))
    add(Case("sample: --out in /proc", "sample", [*sample[:-2], "--model", "{E}", "--out", "/proc/proreflow"]))
    add(Case("sample: --device cuda without CUDA", "sample", [*sample, "--model", "{E}", "--device", "cuda"]))
    add(Case("sample: --device 'gpu'", "sample", [*sample, "--model", "{E}", "--device", "gpu"]))
    add(Case("sample: --device meta", "sample", [*sample, "--model", "{E}", "--device", "meta"]))
    add(Case("sample: --device cpu:7", "sample", [*sample, "--model", "{E}", "--device", "cpu:7"], "accepted",
             "torch reads any CPU index as the CPU"))
    add(Case("sample: --out a path with spaces and unicode", "sample", [*sample[:-2], "--model", "{E}", "--out",
                                                                        "{case}/dossier été ✓"],
             "accepted", "any path name the file system takes"))

    # export
    add(Case("export: --run a run of the built-in family", "export", [*export, "--run", "{B}"]))
    add(Case("export: --run an empty folder", "export", [*export, "--run", "{case}/e"],
             prepare=lambda d: (d / "e").mkdir()))
    add(Case("export: --run student.safetensors truncated", "export", [*export, "--run", "{case}/copy"], "failed",
             prepare=copy_of("R", truncate("student.safetensors")), check=nothing_at("out")))
    add(Case("export: --run student.safetensors NaN", "export", [*export, "--run", "{case}/copy"], "failed",
             prepare=copy_of("R", nan_weights("student.safetensors")), check=nothing_at("out")))
    add(Case("export: --run student.safetensors deleted", "export", [*export, "--run", "{case}/copy"],
             prepare=copy_of("R", remove("student.safetensors")), check=nothing_at("out")))
    add(Case("export: --run student.json garbage", "export", [*export, "--run", "{case}/copy"],
             prepare=copy_of("R", overwrite("student.json", "]")), check=nothing_at("out")))
    add(Case("export: --run student.json a number", "export", [*export, "--run", "{case}/copy"],
             prepare=copy_of("R", overwrite("student.json", "7")), check=nothing_at("out")))
    add(Case("export: --run recipe.yaml deleted", "export", [*export, "--run", "{case}/copy"],
             "accepted", "the run's student.json holds what export needs", prepare=copy_of("R", remove("recipe.yaml"))))
    add(Case("export: --run student.json windows -1", "export", [*export, "--run", "{case}/copy"],
             prepare=copy_of("R", json_edit("student.json", lambda d: d.update(windows=-1))),
             check=nothing_at("out")))
    add(Case("export: --run teacher path gone (moved run)", "export", [*export, "--run", "{case}/copy"],
             prepare=copy_of("R", json_edit("student.json", _teacher_gone)), check=nothing_at("out")))
    add(Case("export: --out the run folder itself", "export", ["export", "--run", "{case}/copy", "--out",
                                                               "{case}/copy"], prepare=copy_of("R", lambda r: None)))
    add(Case("export: --out a file", "export", ["export", "--run", "{R}", "--out", "{case}/f"],
             prepare=write("f", "x")))
    add(Case("export: --out of 300 characters", "export", ["export", "--run", "{R}", "--out", "{case}/" + "x" * 300]))
    add(Case("export: --steps 2 on a run without step conditioning", "export", [*export, "--run", "{R}", "--steps",
                                                                                "2"],
             "accepted", "--steps equal to the run's windows names the one count it serves"))
    add(Case("export: --steps 1 on a 2-window run without step conditioning", "export",
             [*export, "--run", "{R}", "--steps", "1"]))
    add(Case("export: --lora-rank 4096 (more than the layers' width)", "export", [*export, "--run", "{R}", "--lora",
                                                                                  "--lora-rank", "4096"],
             "accepted", "documented: the rank is capped at each layer's full rank (exact)"))
    add(Case("export: --eval a missing folder", "export", [*export, "--run", "{R}", "--eval", "{case}/none"],
             check=nothing_at("out")))
    add(Case("export: --eval results.json garbage", "export", [*export, "--run", "{R}", "--eval", "{case}/ev"],
             prepare=write("ev/results.json", "{{"), check=nothing_at("out")))
    add(Case("export: --eval results.json without results", "export", [*export, "--run", "{R}", "--eval",
                                                                       "{case}/ev"],
             prepare=write("ev/results.json", '{"settings": {}}'), check=nothing_at("out")))
    add(Case("export: --teacher a file", "export", [*export, "--run", "{R}", "--teacher", "{case}/f"],
             prepare=write("f", "x"), check=nothing_at("out")))
    add(Case("export: --teacher the export (same architecture)", "export", [*export, "--run", "{R}", "--teacher",
                                                                            "{E}"],
             "accepted", "documented: --teacher names the base pipeline whose other components are copied"))
    add(Case("export: --push-to-hub offline", "export", [*export, "--run", "{R}", "--push-to-hub", "me/x"],
             "failed", env={"HF_HUB_OFFLINE": "1"}))

    # eval
    add(Case("eval: --steps 3 on a 2-window student", "eval", [*ev_h[:-4], "--student", "{E}", "--images", "{H}",
                                                               "--steps", "3"],
             "accepted", "documented: a step count the student does not serve is a skipped row with its reason"))
    add(Case("eval: --resolution 16 with the classifier", "eval", [*ev_h, "--resolution", "16"]))
    add(Case("eval: --images an empty folder", "eval", [*ev, "--student", "{E}", "--images", "{case}/e"],
             prepare=lambda d: (d / "e").mkdir()))
    add(Case("eval: --images metadata.jsonl garbage", "eval", [*ev, "--student", "{E}", "--images", "{case}/i"],
             prepare=write(f"i/{jsonl}", "{oops\n")))
    add(Case("eval: --images metadata without a label (classifier)", "eval", [*ev, "--student", "{E}", "--images",
                                                                              "{case}/i"], "accepted",
             "the classifier gives FD without accuracy, and says so",
             prepare=_folder([{"file_name": "0.png", "text": "a seven"}] * 4, one_png)))
    add(Case("eval: --images labels out of range", "eval", [*ev, "--student", "{E}", "--images", "{case}/i"],
             prepare=_folder([{"file_name": "0.png", "text": "a seven", "label": 12}] * 4, one_png)))
    add(Case("eval: --images labels as words", "eval", [*ev, "--student", "{E}", "--images", "{case}/i"],
             prepare=_folder([{"file_name": "0.png", "text": "a seven", "label": "seven"}] * 4, one_png)))
    add(Case("eval: --images captions are numbers", "eval", [*ev, "--student", "{E}", "--images", "{case}/i"],
             "accepted", "an evaluation caption is read as text (7 is the prompt '7')",
             prepare=_folder([{"file_name": "0.png", "text": 7, "label": 7}] * 4, one_png)))
    add(Case("eval: --images every image unreadable", "eval", [*ev, "--student", "{E}", "--images", "{case}/i"],
             prepare=_folder([{"file_name": "0.png", "text": "a seven", "label": 7}] * 4, b"not a png")))
    add(Case("eval: --images names a file outside the folder", "eval", [*ev, "--student", "{E}", "--images",
                                                                        "{case}/i"],
             prepare=_folder([{"file_name": "../../etc/passwd", "text": "a seven", "label": 7}] * 4, one_png)))
    add(Case("eval: --prompts and --images together", "eval", [*ev_h, "--prompts", "{case}/p.txt"],
             prepare=write("p.txt", "a\nb\n")))
    add(Case("eval: --prompts one prompt (FID needs 2)", "eval",
             ["eval", "--teacher", "{P}", "--student", "{E}", "--prompts", "{case}/p.txt", "--steps", "1",
              "--teacher-steps", "2", "--fid", "--out", "{case}/out"], prepare=write("p.txt", "a seven\n")))
    add(Case("eval: --coco-annotations garbage", "eval", [*ev, "--student", "{E}", "--coco-annotations",
                                                          "{case}/a.json", "--coco-images", "{case}"],
             prepare=write("a.json", "{")))
    add(Case("eval: --coco-annotations a list", "eval", [*ev, "--student", "{E}", "--coco-annotations",
                                                         "{case}/a.json", "--coco-images", "{case}"],
             prepare=write("a.json", "[]")))
    add(Case("eval: --coco-annotations without captions", "eval", [*ev, "--student", "{E}", "--coco-annotations",
                                                                   "{case}/a.json", "--coco-images", "{case}"],
             prepare=write("a.json", '{"images": [], "annotations": []}')))
    add(Case("eval: --student the run folder", "eval", [*ev, "--student", "{R}", "--images", "{H}"]))
    add(Case("eval: --student-lora with a full student", "eval", [*ev_h, "--student-lora", "{L}"], "accepted",
             "documented: a LoRA applies to any pipeline of its base's architecture"))
    add(Case("eval: --teacher a file", "eval", ["eval", "--teacher", "{case}/f", "--student", "{E}", "--images",
                                                "{H}", "--out", "{case}/out"], prepare=write("f", "x")))
    add(Case("eval: --inception garbage", "eval", [*ev_h[:ev_h.index("--no-fid")], *ev_h[ev_h.index("--no-fid") + 1:],
                                                   "--inception", "{case}/i.pt"], prepare=write("i.pt", "garbage")))
    add(Case("eval: --fid-cache a file", "eval", [*ev_h[:ev_h.index("--no-fid")], *ev_h[ev_h.index("--no-fid") + 1:],
                                                  "--fid-cache", "{case}/f"], prepare=write("f", "x")))
    add(Case("eval: --clip-model missing folder", "eval", [*ev_h, "--clip-model", "{case}/none"]))
    add(Case("eval: --out a file", "eval", [*ev_h[:-2], "--out", "{case}/f"], prepare=write("f", "x")))
    add(Case("eval: --grid-prompts 50 of 4 prompts", "eval", [*ev_h, "--grid-prompts", "50"],
             "accepted", "documented: at most --num prompts get grids"))
    add(Case("eval: --num more than the held-out set", "eval", [*ev_h[:ev_h.index("--num")], "--num", "100000",
                                                                *ev_h[ev_h.index("--num") + 2:]],
             "accepted", "all the rows are evaluated, with a line saying how many"))
    add(Case("eval: --device cuda without CUDA", "eval", [*ev_h, "--device", "cuda"]))
    add(Case("eval: --workers 64", "eval", [*ev_h, "--workers", "64"], "accepted", "loader workers, capped by nothing"))

    # train on the SD family: data and setup
    add(Case("train: setup.data an empty folder", "train sd", [*sd_train, "setup.data={case}/e"],
             prepare=lambda d: (d / "e").mkdir()))
    add(Case("train: setup.data metadata.jsonl garbage line", "train sd", [*sd_train, "setup.data={case}/i"],
             "accepted", "documented: a bad line is left out with a warning naming it",
             prepare=_then(_folder([{"file_name": "0.png", "text": "a seven"}] * 8, one_png),
                           lambda d: (d / "i" / jsonl).open("a").write("{oops\n"))))
    add(Case("train: setup.data metadata without file_name", "train sd", [*sd_train, "setup.data={case}/i"],
             prepare=_folder([{"text": "a seven"}] * 8, one_png)))
    add(Case("train: setup.data captions are null", "train sd", [*sd_train, "setup.data={case}/i"],
             prepare=_folder([{"file_name": "0.png", "text": None}] * 8, one_png)))
    add(Case("train: setup.data every image unreadable", "train sd", [*sd_train, "setup.data={case}/i"],
             prepare=_folder([{"file_name": "0.png", "text": "a seven"}] * 8, b"\x89PNG broken")))
    add(Case("train: setup.data a 1 x 1 RGBA image", "train sd", [*sd_train, "setup.data={case}/i"], "accepted",
             "documented: images are converted to RGB and resized to the resolution",
             prepare=_folder([{"file_name": "0.png", "text": "a seven"}] * 8, _png(1, "RGBA"))))
    add(Case("train: setup.data a 16-bit grey image", "train sd", [*sd_train, "setup.data={case}/i"], "accepted",
             "documented: images are converted to RGB and resized to the resolution",
             prepare=_folder([{"file_name": "0.png", "text": "a seven"}] * 8, _png(40, "I;16"))))
    add(Case("train: setup.data a decompression bomb", "train sd", [*sd_train, "setup.data={case}/i"],
             prepare=_folder([{"file_name": "0.png", "text": "a seven"}] * 8, _bomb())))
    add(Case("train: setup.data shards pattern matching nothing", "train sd",
             [*sd_train, "setup.data={case}/{00000..00003}.tar"]))
    add(Case("train: setup.data a garbage tar", "train sd", [*sd_train, "setup.data={case}/0.tar"],
             prepare=write("0.tar", b"\x00" * 10 + b"garbage" * 100)))
    add(Case("train: setup.teacher an empty folder", "train sd", [*sd_train, "setup.teacher={case}/e"],
             prepare=lambda d: (d / "e").mkdir()))
    add(Case("train: setup.teacher unet weights truncated", "train sd", [*sd_train, "setup.teacher={case}/copy"],
             prepare=copy_of("P", truncate("unet/diffusion_pytorch_model.safetensors"))))
    add(Case("train: setup.teacher unet weights NaN", "train sd", [*sd_train, "setup.teacher={case}/copy"],
             prepare=copy_of("P", nan_weights("unet/diffusion_pytorch_model.safetensors"))))
    add(Case("train: setup.teacher tokenizer deleted", "train sd", [*sd_train, "setup.teacher={case}/copy"],
             prepare=copy_of("P", remove("tokenizer"))))
    add(Case("train: setup.teacher scheduler v-prediction of an eps UNet", "train sd",
             [*sd_train, "setup.teacher={case}/copy"], "accepted",
             "documented: the scheduler config states the teacher's parametrization",
             prepare=copy_of("P", json_edit("scheduler/scheduler_config.json",
                                            lambda d: d.update(prediction_type="v_prediction")))))
    add(Case("train: setup.teacher scheduler prediction 'x0'", "train sd", [*sd_train, "setup.teacher={case}/copy"],
             prepare=copy_of("P", json_edit("scheduler/scheduler_config.json",
                                            lambda d: d.update(prediction_type="x0")))))
    add(Case("train: setup.teacher scheduler betas negative", "train sd", [*sd_train, "setup.teacher={case}/copy"],
             prepare=copy_of("P", json_edit("scheduler/scheduler_config.json",
                                            lambda d: d.update(beta_start=-0.1)))))
    add(Case("train: setup.resolution 33", "train sd", [*sd_train, "setup.resolution=33"]))
    add(Case("train: setup.resolution 0", "train sd", [*sd_train, "setup.resolution=0"]))
    add(Case("train: setup.resolution 'big'", "train sd", [*sd_train, "setup.resolution=big"]))
    add(Case("train: setup.lora_rank -1", "train sd", [*sd_train, "setup.lora_rank=-1"]))
    add(Case("train: setup.encoder_dtype fp8", "train sd", [*sd_train, "setup.encoder_dtype=fp8"]))
    add(Case("train: setup.cache_dir a file", "train sd", [*sd_train, "setup.cache_dir={case}/f"],
             prepare=write("f", "x")))
    add(Case("train: setup.center_crop 'maybe'", "train sd", [*sd_train, "setup.center_crop=maybe"]))
    add(Case("train: setup.name stable-diffusion-3 on an SD1.5 teacher", "train sd",
             [*sd_train, "setup.name=stable-diffusion-3"]))
    add(Case("train: setup.name pixart on an SD1.5 teacher", "train sd", [*sd_train, "setup.name=pixart"]))
    add(Case("train: setup.teacher a hub id offline", "train sd", [*sd_train, "setup.teacher=nobody/nothing"],
             env={"HF_HUB_OFFLINE": "1"}))
    add(Case("train: setup an empty mapping", "train sd", ["train", "--config", "{case}/c.yaml", "--out",
                                                           "{case}/run"], prepare=write("c.yaml", "setup: {}\n")))
    add(Case("train: setup a list", "train sd", ["train", "--config", "{case}/c.yaml", "--out", "{case}/run"],
             prepare=write("c.yaml", "setup: [stable-diffusion]\n")))
    add(Case("train: max_train_samples 0", "train sd", [*sd_train, "max_train_samples=0"]))
    add(Case("train: stages.*.batch_size 3 on 8 images", "train sd", [*sd_train, "defaults.batch_size=100000"]))
    add(Case("train: --resume-from a checkpoint of another run", "train sd",
             [*sd_train, "--resume-from", "{R}/checkpoints/step-00000001"]))
    add(Case("train: --config a folder", "train", ["train", "--config", "{case}", "--out", "{case}/run"]))
    add(Case("train: --config not UTF-8", "train", ["train", "--config", "{case}/c.yaml", "--out", "{case}/run"],
             prepare=write("c.yaml", b"name: \xff\xfe\n")))
    add(Case("train: --config with a BOM", "train", ["train", "--config", "{case}/c.yaml", "--out", "{case}/run",
                                                     "--print-config"], "accepted", "a UTF-8 byte-order mark is read",
             prepare=write("c.yaml", "\ufeffsetup: {name: moons}\nname: x\nstages: [{windows: 2}]\n")))
    add(Case("train: --config an empty file", "train", ["train", "--config", "{case}/c.yaml", "--out", "{case}/run"],
             prepare=write("c.yaml", "")))
    add(Case("train: --config 50 MB of one scalar", "train", ["train", "--config", "{case}/c.yaml", "--out",
                                                              "{case}/run"],
             prepare=write("c.yaml", "name: " + "x" * 50_000_000 + "\n")))
    add(Case("train: 10,000 stages", "train", ["train", "--config", "{case}/c.yaml", "--out", "{case}/run"],
             prepare=write("c.yaml", "setup: {name: moons}\nstages:\n" + "  - {windows: 1}\n" * 10000)))
    add(Case("train: override with a NUL byte", "train", ["train", "--config", "{BC}", "--out", "{case}/run",
                                                          "name=a\x01b"]))
    add(Case("train: override key with spaces", "train", ["train", "--config", "{BC}", "--out", "{case}/run",
                                                          "stages. 0 .lr=1"]))
    add(Case("train: override stages.-1.lr", "train", ["train", "--config", "{BC}", "--out", "{case}/run",
                                                       "stages.-1.lr=0.1"]))
    add(Case("train: override stages.99.lr", "train", ["train", "--config", "{BC}", "--out", "{case}/run",
                                                       "stages.99.lr=0.1"]))
    add(Case("train: override '=3'", "train", ["train", "--config", "{BC}", "--out", "{case}/run", "=3"]))
    add(Case("train: override 'seed'", "train", ["train", "--config", "{BC}", "--out", "{case}/run", "seed"]))
    add(Case("train: override seed=3=4", "train", ["train", "--config", "{BC}", "--out", "{case}/run", "seed=3=4"]))
    add(Case("train: override setup.name=moons twice, different", "train",
             ["train", "--config", "{BC}", "--out", "{case}/run", "seed=1", "seed=2"],
             "accepted", "documented: overrides apply in order, the last one wins"))
    add(Case("train: --out a file", "train", ["train", "--config", "{BC}", "--out", "{case}/f"],
             prepare=write("f", "x")))
    add(Case("train: --out of 300 characters", "train", ["train", "--config", "{BC}", "--out",
                                                         "{case}/" + "r" * 300]))
    add(Case("train: --out in /proc", "train", ["train", "--config", "{BC}", "--out", "/proc/run"]))
    add(Case("train: --resume on a folder of another tool", "train", ["train", "--config", "{BC}", "--out",
                                                                      "{case}/o", "--resume"],
             prepare=write("o/notes.txt", "mine")))
    add(Case("train: --resume, checkpoint meta.json a list", "train", ["train", "--config", "{BC}", "--out",
                                                                       "{case}/copy", "--resume"], "failed",
             prepare=copy_of("B", _all_meta("[]"))))
    add(Case("train: --resume, latest names a missing checkpoint", "train", ["train", "--config", "{BC}", "--out",
                                                                             "{case}/copy", "--resume"],
             "accepted", "documented: a missing or damaged newest checkpoint falls back to the previous",
             prepare=copy_of("B", overwrite("checkpoints/latest", "step-00000099"))))

    # teacher and demo
    add(Case("teacher: --cache-dir a file", "teacher", ["teacher", "--data", "moons", "--cache-dir", "{case}/f"],
             prepare=write("f", "x")))
    add(Case("teacher: --cache-dir in /proc", "teacher", ["teacher", "--data", "moons", "--cache-dir", "/proc/c"]))
    add(Case("teacher: --data mnist-t2i --batch-size 8", "teacher", ["teacher", "--data", "mnist-t2i",
                                                                     "--batch-size", "8"]))
    add(Case("teacher: --device cuda without CUDA", "teacher", ["teacher", "--data", "moons", "--device", "cuda",
                                                                "--cache-dir", "{case}/c"]))
    add(Case("teacher: cached config.json a list", "teacher", ["teacher", "--data", "moons", "--steps", "50",
                                                               "--cache-dir", "{case}/c"],
             prepare=_cached_teacher(lambda path: (path / "config.json").write_text("[]"))))
    add(Case("teacher: cached weights NaN", "teacher", ["teacher", "--data", "moons", "--steps", "50",
                                                        "--cache-dir", "{case}/c", "--eval", "--samples", "16"],
             prepare=_cached_teacher(lambda path: nan_weights(next(path.glob("*.safetensors")).name)(path))))
    add(Case("demo: --recipe a missing file", "demo", ["demo", "--data", "moons", "--recipe", "{case}/none.yaml",
                                                      "--out", "{case}/out"]))
    add(Case("demo: --recipe a preset name misspelt", "demo", ["demo", "--data", "moons", "--recipe", "proreflow-iii",
                                                              "--out", "{case}/out"]))
    add(Case("demo: --out a file", "demo", ["demo", "--data", "moons", "--out", "{case}/f"], prepare=write("f", "x")))
    add(Case("demo: --cache-dir a file", "demo", ["demo", "--data", "moons", "--cache-dir", "{case}/f", "--out",
                                                  "{case}/out"], prepare=write("f", "x")))

    # faults: a full disk (RLIMIT_FSIZE), signals, kill -9
    add(Case("fault: full disk during an SD train's checkpoint", "faults",
             [*sd_train, "setup.cache_dir={case}/cache", "checkpoint_every=1"], "failed", file_limit=200_000,
             check=no_temporaries))
    add(Case("fault: full disk during export", "faults", [*export, "--run", "{R}"], "failed", file_limit=100_000,
             check=nothing_at("out")))
    add(Case("fault: full disk while sampling", "faults", [*sample, "--model", "{E}", "--num-images", "4"], "failed",
             file_limit=100, check=no_temporaries))
    add(Case("fault: full disk while eval writes", "faults", ev_h, "failed", file_limit=1_000, check=no_temporaries))
    add(Case("fault: full disk while a teacher is cached", "faults", ["teacher", "--data", "moons", "--steps", "20",
                                                                      "--cache-dir", "{case}/c", "--quiet"],
             "failed", file_limit=1_000,
             check=lambda d: no_temporaries(d) or ("files left in the cache" if any(
                 p.is_file() for p in (d / "c").rglob("*")) else None)))
    add(Case("fault: full disk during the moons run's first checkpoint", "faults",
             ["train", "--config", "{BC}", "--out", "{case}/run", "--no-progress"], "failed", file_limit=2_000,
             check=no_temporaries))
    for seconds in (1.0, 3.0, 6.0):
        add(Case(f"fault: SIGTERM after {seconds:g} s of export", "faults", [*export, "--run", "{R}"], "stopped",
                 signal_after=(signal.SIGTERM, seconds), check=no_temporaries))
        add(Case(f"fault: SIGHUP after {seconds:g} s of sample", "faults", [*sample, "--model", "{E}"], "stopped",
                 signal_after=(signal.SIGHUP, seconds), check=no_temporaries))
        add(Case(f"fault: SIGTERM after {seconds:g} s of eval", "faults", ev_h, "stopped",
                 signal_after=(signal.SIGTERM, seconds), check=no_temporaries))
        add(Case(f"fault: SIGINT after {seconds:g} s of an SD train", "faults",
                 [*sd_train, "setup.cache_dir={case}/cache"], "stopped", signal_after=(signal.SIGINT, seconds),
                 check=no_temporaries))
    add(Case("fault: kill -9 during export, then export again", "faults", [*export, "--run", "{R}"], "accepted",
             "the second export replaces the killed one's leftovers", prepare=_killed_export,
             check=lambda d: no_temporaries(d) or (None if (d / "out" / "model_index.json").is_file()
                                                   else "no export")))
    add(Case("env: HF_HOME below a file", "env", [*sample, "--model", "{E}"], "accepted",
             "a local model needs no hub cache", env={"HF_HOME": "/etc/hostname/hf"}))
    add(Case("env: TMPDIR missing", "env", [*sample, "--model", "{E}"], "accepted",
             "no command needs the system temporary folder", env={"TMPDIR": "/nonexistent/tmp"}))
    add(Case("env: HOME unset, default cache", "env", ["teacher", "--data", "moons", "--quiet"], "accepted",
             "the cache falls back as the docs say", env={"HOME": ""}))
    add(Case("env: PROREFLOW_TRUST_SETUP_CODE=yes", "env", ["train", "--config", "{case}/c.yaml", "--out",
                                                            "{case}/run"],
             prepare=write("c.yaml", "setup: {name: 'os:getcwd'}\nstages: [{windows: 2}]\n"),
             env={"PROREFLOW_TRUST_SETUP_CODE": "yes"}))
    return c


def _teacher_gone(info: dict) -> None:
    info["teacher"] = "/nonexistent/teacher"
    if "info" in info and isinstance(info["info"], dict):
        info["info"]["teacher"] = "/nonexistent/teacher"


def _all_meta(text: str) -> Callable[[Path], None]:
    def edit(root: Path) -> None:
        for meta in root.glob("checkpoints/step-*/meta.json"):
            meta.write_text(text)
    return edit


def _then(*steps: Callable[[Path], object]) -> Callable[[Path], None]:
    """``prepare``: the steps in order."""
    def prepare(folder: Path) -> None:
        for step in steps:
            step(folder)
    return prepare


def _png(size: int = 28, mode: str = "L") -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new(mode, (size, size)).save(buffer, format="PNG")
    return buffer.getvalue()


def _bomb() -> bytes:
    """A PNG that claims 30,000 x 30,000 pixels (PIL's decompression-bomb limit), a few kB on disk."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("1", (30000, 30000)).save(buffer, format="PNG")
    return buffer.getvalue()


def _folder(rows: list[dict], image: bytes) -> Callable[[Path], None]:
    def prepare(folder: Path) -> None:
        root = folder / "i"
        root.mkdir()
        (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        for r in rows:
            if isinstance(r.get("file_name"), str) and ".." not in r["file_name"]:
                (root / r["file_name"]).write_bytes(image)
    return prepare


def _cached_teacher(edit: Callable[[Path], None]) -> Callable[[Path], None]:
    def prepare(folder: Path) -> None:
        subprocess.run([sys.executable, "-m", "proreflow.cli", "teacher", "--data", "moons", "--steps", "50",
                        "--cache-dir", str(folder / "c"), "--quiet"], check=True, capture_output=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
        edit(next((folder / "c").glob("teachers/moons-*")))
    return prepare


def _killed_export(folder: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "proreflow.cli", "export", "--run", FIXTURES["R"], "--out",
                             str(folder / "out")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list(folder.glob(".out.tmp-*")) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.kill()
    proc.wait()


# --- running ----------------------------------------------------------------------------------------------

FIXTURES: dict[str, str] = {}
PLACE = re.compile(r"\{(case|[A-Z]+)\}")
"""A fixture's place in a case's words: ``{case}``, ``{E}``, ... (not a shard pattern's ``{00000..00003}``)."""
BAR = re.compile(r"\d+%\||it/s\]|s/it\]|^Loading (pipeline components|weights)|^CLIP score not computed|"
                 r"^proreflow eval: warning: the student was distilled from")
"""Lines that are not a failure's: progress bars, and the notes an evaluation prints on every run of its kind
(no CLIP model given; a student of another teacher, which the fixtures are after the teacher changed)."""


def stderr_lines(text: str) -> list[str]:
    """stderr's lines without progress-bar fragments."""
    return [line for line in text.replace("\r", "\n").splitlines() if line.strip() and not BAR.search(line)]


def verdict(case: Case, code: int | None, err: str, folder: Path) -> str:
    lines = stderr_lines(err)
    if code is None:
        return "hang"
    if "Traceback (most recent call last)" in err:
        return "traceback"
    want = 128 + case.signal_after[0] if case.expect == "stopped" else CODES[case.expect]
    if case.expect == "stopped" and code == 0:
        want = 0  # it finished before the signal
    if case.expect == "stopped" and code == -case.signal_after[0] and not lines:
        return "ok (killed while Python imported torch: the signal's default action)"
    if code == 0 and want != 0:
        return "silently accepted"
    if code != want:
        return "wrong code"
    if code != 0 and len(lines) != 1:
        return "several lines"
    if case.check is not None and (complaint := case.check(folder)):
        return f"left files ({complaint})"
    return "ok"


def default_signals() -> None:
    """In a child process: the default dispositions of the stop signals (a ``nohup`` or ``&`` parent ignores
    some, and a child inherits that)."""
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_DFL)


def run_case(case: Case, work: Path, limit: float) -> dict:
    folder = work / "cases" / re.sub(r"[^A-Za-z0-9]+", "-", case.id)[:80]
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    if case.prepare is not None:
        case.prepare(folder)
    names = {"case": str(folder), **FIXTURES}
    words = [PLACE.sub(lambda m: names[m[1]], w) for w in case.argv]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **case.env}
    env = {k: v for k, v in env.items() if v != ""}

    def limits() -> None:
        default_signals()
        if case.file_limit is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (case.file_limit, case.file_limit))

    start = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "proreflow.cli", *words], cwd=folder, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=limits)
    try:
        if case.signal_after is not None:
            try:
                proc.wait(timeout=case.signal_after[1])
            except subprocess.TimeoutExpired:
                proc.send_signal(case.signal_after[0])
        _, err = proc.communicate(timeout=limit)
        code = proc.returncode
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
        code = None
    err = err.decode(errors="replace")
    lines = stderr_lines(err)
    return {"id": case.id, "group": case.group, "expect": case.expect, "meaning": case.meaning, "exit": code,
            "verdict": verdict(case, code, err, folder), "seconds": round(time.monotonic() - start, 1),
            "line": (lines[-1] if lines else "")[:300]}


def report(rows: list[dict], command: str, path: Path, extra: list[str] = ()) -> None:
    bad = [r for r in rows if not r["verdict"].startswith("ok")]
    counts: dict[str, int] = {}
    for r in rows:
        key = r["verdict"].split(" (")[0]
        counts[key] = counts.get(key, 0) + 1
    lines = [f"# Fault campaign ({datetime.date.today().isoformat()})", "",
             f"Command: `{command}`  ", f"Machine: {platform.platform()}, {os.cpu_count()} CPUs, Python "
             f"{platform.python_version()}", "",
             f"{len(rows)} cases; verdicts: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())), "",
             "| case | group | expected | exit | verdict | s | stderr's line / meaning |",
             "|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["verdict"].startswith("ok"), r["group"], r["id"])):
        text = r["meaning"] if r["expect"] == "accepted" and r["exit"] == 0 else r["line"]
        cells = [r["id"], r["group"], r["expect"], str(r["exit"]), r["verdict"], str(r["seconds"]), text]
        lines.append("| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join([*lines, *extra]) + "\n")
    print(f"{len(rows)} cases, {len(bad)} not ok; table: {path}")


SIGNAL_RUN = ("setup: {name: moons}\nname: moons-signals\nseed: 0\ncheckpoint_every: 7\nkeep_checkpoints: 2\n"
              "defaults: {steps: 150, batch_size: 64, solver_steps: 4}\n"
              "stages: [{windows: 4}, {windows: 2, teacher: previous}]\n")
"""The run :func:`signal_resumes` stops: two stages on the built-in moons teacher, a checkpoint every 7 steps."""


def signal_resumes(work: Path, count: int, seed: int = 0) -> list[dict]:
    """Stop the run of :data:`SIGNAL_RUN` with SIGTERM (or SIGHUP, every third) at ``count`` moments drawn
    uniformly over an uninterrupted run's duration (set-up included), then ``--resume`` it to the end; each row
    says whether the final student and each stage's EMA are bit-identical to the uninterrupted run's."""
    import random

    from safetensors.torch import load_file

    config = work / "signals.yaml"
    config.write_text(SIGNAL_RUN)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def train(out: Path, *extra: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "proreflow.cli", "train", "--config", str(config), "--out",
                                 str(out), "--no-progress", *extra], env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, preexec_fn=default_signals)

    straight = work / "signals" / "straight"
    shutil.rmtree(straight, ignore_errors=True)
    start = time.monotonic()
    assert train(straight).wait() == 0
    duration = time.monotonic() - start
    files = ["student.safetensors", *(str(p.relative_to(straight)) for p in straight.glob("stage-*/ema.safetensors"))]
    rng, rows = random.Random(seed), []
    for i in range(count):
        signum = signal.SIGHUP if i % 3 == 2 else signal.SIGTERM
        at = rng.uniform(0.0, duration)
        out = work / "signals" / f"run-{i}"
        shutil.rmtree(out, ignore_errors=True)
        proc = train(out)
        time.sleep(at)
        proc.send_signal(signum)
        err = proc.communicate(timeout=600)[1].decode()
        first = proc.returncode
        lines = stderr_lines(err)
        resumed = train(out, "--resume")
        resumed_err = resumed.communicate(timeout=600)[1].decode()
        same = all(_equal(load_file(str(out / f)), load_file(str(straight / f))) for f in files) \
            if resumed.returncode == 0 else False
        rows.append({"signal": signal.Signals(signum).name, "after_s": round(at, 2), "exit": first,
                     "lines": len(lines), "traceback": "Traceback" in err + resumed_err,
                     "line": (lines[-1] if lines else "")[:200], "resume_exit": resumed.returncode,
                     "bit_identical": same, "temporaries": no_temporaries(out)})
        print(f"[{i + 1}/{count}] {rows[-1]['signal']} after {at:.2f} s: exit {first}, resume exit "
              f"{resumed.returncode}, bit-identical {same}", flush=True)
    return rows


def _equal(a: dict, b: dict) -> bool:
    import torch

    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def signals_report(rows: list[dict]) -> list[str]:
    ok = sum(r["bit_identical"] and not r["traceback"] and r["lines"] <= 1 and not r["temporaries"]
             and r["exit"] in (0, 129, 143) for r in rows)
    lines = ["", f"## Stop signals at random moments, then `--resume` ({ok} of {len(rows)} bit-identical and clean)",
             "", f"The run: `{SIGNAL_RUN!r}`", "",
             "| signal | after s | exit | stderr lines | traceback | resume exit | bit-identical | temporaries |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['signal']} | {r['after_s']} | {r['exit']} | {r['lines']} | {r['traceback']} | "
                     f"{r['resume_exit']} | {r['bit_identical']} | {r['temporaries'] or 'none'} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--report", type=Path, default=ROOT / "docs" / "research" / "fault-campaign.md")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON")
    parser.add_argument("--only", default=None, help="a regular expression: run the cases whose id matches")
    parser.add_argument("--limit", type=float, default=180.0, help="seconds before a case counts as a hang")
    parser.add_argument("--signals", type=int, default=0, metavar="N",
                        help="also stop a run at N random moments with SIGTERM / SIGHUP and resume it")
    parser.add_argument("--signals-only", action="store_true", help="only the --signals part")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    if args.signals_only:
        rows = signal_resumes(args.work, args.signals)
        if args.json:
            args.json.write_text(json.dumps({"signals": rows}, indent=1))
        print("\n".join(signals_report(rows)))
        return
    FIXTURES.update(fixtures(args.work))
    todo = [c for c in option_cases() + cases() if args.only is None or re.search(args.only, c.id)]
    rows = []
    for i, case in enumerate(todo):
        rows.append(run_case(case, args.work, args.limit))
        r = rows[-1]
        print(f"[{i + 1}/{len(todo)}] {r['verdict']:>18}  exit {r['exit']}  {r['seconds']:6.1f}s  {case.id}: "
              f"{r['line'][:140]}", flush=True)
    signal_rows = signal_resumes(args.work, args.signals) if args.signals else []
    if args.json:
        args.json.write_text(json.dumps({"cases": rows, "signals": signal_rows}, indent=1))
    report(rows, "python " + " ".join([os.path.relpath(__file__, ROOT), *sys.argv[1:]]), args.report,
           signals_report(signal_rows) if signal_rows else [])


if __name__ == "__main__":
    main()
