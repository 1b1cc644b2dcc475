"""The benchmark run: model resolution, one worker process per system, cold-start timing."""

from __future__ import annotations

import json
import os
import platform
import select
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..memory import load_average
from .shapes import SHAPES, quantized_params, write_random_model

RESULT_MARK = "MLXLLAMA-BENCH-RESULT "  # worker.py prints its JSON result after this

MODEL_ALIASES = {"default": None, "135m": "smollm2-135m", "1b": "llama-3.2-1b", "8b": "llama-3-8b"}
QA_DEV = Path(__file__).resolve().parents[2] / "examples" / "qa_dev.jsonl"
TTFT_PROMPT = "What is the capital of France?"


def device_kind() -> str:
    from .. import device

    return device.kind()


@dataclass
class BenchOptions:
    models: list[str] = field(default_factory=lambda: ["default"])  # default | llama-3.2-1b | llama-3-8b | a folder
    systems: list[str] | None = None  # None: ours, mlx-lm at its defaults, and (on CPU) mlx-lm at float32
    prefill_lengths: list[int] = field(default_factory=lambda: [128, 512, 2048])
    batch_sizes: list[int] = field(default_factory=lambda: [1, 4, 8])
    decode_tokens: int = 128
    decode_prompt: int = 64
    decode_cap_s: float = 30.0
    trials: int = 2
    budget_s: float = 300.0  # per system and model
    ttft: bool = True
    ttft_trials: int = 3
    ttft_timeout_s: float = 300.0
    lookup: int = 4  # prompt-lookup draft length for the QA measurement (0: skip it)
    qa_path: str | None = None
    qa_limit: int = 1000
    qa_max_tokens: int = 64
    llama_cpp: bool = True  # when a llama.cpp binding runs here (bench/llamacpp.py) and a GGUF is known
    gguf: str | None = None
    llama_cpp_threads: int | None = None  # None: one per CPU
    compiled: bool | None = None  # also measure our compiled decode step (None: on GPU only)
    work_dir: str | None = None  # where random-weight models are written (default: the user cache)
    progress: bool = True


@dataclass
class BenchResult:
    machine: dict
    options: dict
    models: list[dict]  # {name, path, params, systems: {label: worker result}, ttft: {...}, lookup: {...}}

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def machine_info() -> dict:
    import mlx.core as mx

    from .. import device

    info = {"date": time.strftime("%Y-%m-%d %H:%M"), "platform": platform.platform(), "python": platform.python_version(),
            "processor": _cpu_name(), "cpus": os.cpu_count(), "device": device_kind(), "mlx": mx.__version__,
            "blas": device.blas() or "mlx's own", "load_average": load_average()}
    try:
        import mlx_lm

        info["mlx_lm"] = mlx_lm.__version__
    except Exception:
        info["mlx_lm"] = None
    if info["device"] == "gpu":
        try:
            info["gpu"] = mx.device_info().get("device_name")
        except Exception:
            pass
    return info


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def default_systems(device: str) -> list[str]:
    """Labels: 'mlxllama', 'mlxllama dense' (CPU), 'mlxllama compiled', 'mlx-lm' (its defaults),
    'mlx-lm float32' (CPU)."""
    if device == "cpu":
        return ["mlxllama", "mlxllama dense", "mlx-lm", "mlx-lm float32"]
    return ["mlxllama", "mlxllama compiled", "mlx-lm"]


SYSTEMS = ("mlxllama", "mlxllama dense", "mlxllama compiled", "mlx-lm", "mlx-lm float32", "llama.cpp")


def system_spec(label: str) -> tuple[dict, dict]:
    """(worker spec fields, extra environment) for a system label."""
    env = {}
    if label == "mlxllama":
        return {"system": "mlxllama"}, env
    if label == "mlxllama dense":  # quantized layers as float32 copies (--dense)
        return {"system": "mlxllama", "dense": True}, env
    if label == "mlxllama compiled":
        return {"system": "mlxllama", "compiled": True}, env
    if label == "mlx-lm":  # as a user runs it: no BLAS preloaded by us, its own dtype
        return {"system": "mlx-lm"}, {"MLXLLAMA_NO_BLAS": "1"}
    if label == "mlx-lm float32":  # its best setting on CPU; the BLAS we load helps its float matmuls
        return {"system": "mlx-lm", "dtype": "float32"}, env
    if label == "llama.cpp":
        return {"system": "llama.cpp"}, {"MLXLLAMA_NO_BLAS": "1"}
    raise ValueError(f"unknown system {label!r}")


def run_worker(spec: dict, env_extra: dict, timeout: float) -> dict:
    env = {**os.environ, **env_extra, "PYTHONUNBUFFERED": "1"}
    if spec.get("system") == "llama.cpp":  # by path: no MLX in llama.cpp's process (see worker.py)
        cmd = [sys.executable, str(Path(__file__).with_name("worker.py")), json.dumps(spec)]
    else:
        cmd = [sys.executable, "-m", "mlxllama.bench.worker", json.dumps(spec)]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return {"system": spec.get("system"), "error": f"timed out after {timeout:.0f} s"}
    for line in reversed(p.stdout.splitlines()):
        if line.startswith(RESULT_MARK):
            return json.loads(line[len(RESULT_MARK):])
    tail = (p.stderr or p.stdout).strip().splitlines()[-3:]
    return {"system": spec.get("system"), "error": f"worker exited with {p.returncode}: {' | '.join(tail)}"}


# --- cold time to first token ----------------------------------------------------------------

def ttft_commands(model_path: str) -> dict[str, list[str]]:
    py = sys.executable
    return {
        "mlxllama": [py, "-m", "mlxllama", "generate", "-m", model_path, "-p", TTFT_PROMPT, "-n", "1"],
        "mlx-lm": [py, "-m", "mlx_lm", "generate", "--model", model_path, "--prompt", TTFT_PROMPT, "--max-tokens", "1"],
    }


def time_to_first_token(cmd: list[str], after: bytes = b"", env_extra: dict | None = None, timeout: float = 600) -> float | None:
    """Seconds from spawning `cmd` to the first byte of generated text on its stdout (the first
    byte after the marker `after`, e.g. mlx-lm's '==========' line); None if it never came."""
    env = {**os.environ, **(env_extra or {}), "PYTHONUNBUFFERED": "1"}
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, env=env)
    seen, found = b"", None
    try:
        while True:
            left = timeout - (time.perf_counter() - t0)
            if left <= 0 or not select.select([p.stdout], [], [], left)[0]:
                break  # timed out
            chunk = os.read(p.stdout.fileno(), 4096)
            if not chunk:
                break
            seen += chunk
            i = seen.find(after) if after else 0
            if i >= 0 and len(seen) > i + len(after):  # a byte of generated text (or, with one
                found = time.perf_counter() - t0  # token, the newline that ends it)
                break
    finally:
        p.kill()
        p.wait()
    return found


def measure_ttft(model_path: str, trials: int, timeout: float) -> dict:
    """Median over trials for each CLI; a CLI that times out gets None and "<label> timeout"."""
    out = {}
    for label, cmd in ttft_commands(model_path).items():
        after = b"==========\n" if label == "mlx-lm" else b""
        env = {"MLXLLAMA_NO_BLAS": "1"} if label == "mlx-lm" else {}
        times = []
        for _ in range(trials):
            t = time_to_first_token(cmd, after, env, timeout)
            if t is None:
                out[f"{label} timeout"] = timeout
                break
            times.append(t)
        out[label] = sorted(times)[len(times) // 2] if times else None
    return out


# --- the run ---------------------------------------------------------------------------------

def resolve_bench_model(name: str, work_dir: Path, log) -> tuple[str, str]:
    """(label, folder) for a model name: default, a shape name (random weights), or a folder."""
    from ..resolve import default_model_path

    name = MODEL_ALIASES.get(name, name) if name in MODEL_ALIASES else name
    if name is None or name == "default":
        return "SmolLM2-135M-Instruct (default, Q4_1)", str(default_model_path())
    if name in SHAPES:
        out = work_dir / f"random-{name}-4bit"
        if not (out / "config.json").is_file():
            log(f"writing random-weight {name} (4-bit) to {out} ...")
        write_random_model(name, out, tokenizer_dir=_default_model_if_present())
        return f"{name} shape (random 4-bit)", str(out)
    path = Path(name).expanduser()
    if not (path / "config.json").is_file():
        from ..errors import InputError

        raise InputError(f"unknown bench model {name!r}: use default, {', '.join(SHAPES)}, or a model folder")
    return path.name, str(path)


def _default_model_if_present() -> Path | None:
    """The default model's folder when it is already built (its tokenizer goes with random models)."""
    from ..paths import default_model_dir

    path = default_model_dir()
    return path if (path / "tokenizer.json").is_file() else None


def find_gguf(opts: BenchOptions) -> str | None:
    if opts.gguf:
        return opts.gguf
    from ..paths import DEFAULT_GGUF_NAME, cache_home, downloads_dir

    path = downloads_dir() / DEFAULT_GGUF_NAME
    if path.is_file():
        return str(path)
    try:
        from mlxllama.convert.default_model import fetch_default_gguf

        return str(fetch_default_gguf(cache_home()))
    except Exception:
        return None


def llama_cpp_backend(gguf: str | None) -> str | None:
    """The llama.cpp binding that loads and decodes the GGUF here, if any (probed in subprocesses)."""
    from .llamacpp import backend

    return backend(gguf) if gguf else None


def run_bench(opts: BenchOptions, log=None) -> BenchResult:
    from ..paths import cache_home

    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True) if opts.progress else None)
    device = device_kind()
    systems = list(opts.systems or default_systems(device))
    for label in systems:
        if label not in SYSTEMS:
            from ..errors import InputError

            raise InputError(f"unknown system {label!r} (choose from {', '.join(SYSTEMS)})")
    if opts.compiled is True and "mlxllama compiled" not in systems:
        systems.insert(1, "mlxllama compiled")
    if opts.compiled is False and "mlxllama compiled" in systems:
        systems.remove("mlxllama compiled")
    work_dir = Path(opts.work_dir).expanduser() if opts.work_dir else cache_home() / "bench-models"
    machine = machine_info()
    models = []
    for name in opts.models:
        label, path = resolve_bench_model(name, work_dir, log)
        entry = {"name": label, "path": path, "systems": {}, "ttft": None, "lookup": None}
        config = None
        try:
            config = json.loads((Path(path) / "config.json").read_text())
            entry["params"] = quantized_params(config)
        except Exception:
            entry["params"] = None
        base = dict(model=path, prefill_lengths=opts.prefill_lengths, batch_sizes=opts.batch_sizes,
                    decode_tokens=opts.decode_tokens, decode_prompt=opts.decode_prompt, decode_cap_s=opts.decode_cap_s,
                    trials=opts.trials, budget_s=opts.budget_s)
        is_default = name in ("default", None)
        is_random = MODEL_ALIASES.get(name, name) in SHAPES
        run_systems = list(systems)
        if opts.llama_cpp and is_default and "llama.cpp" not in run_systems and llama_cpp_backend(find_gguf(opts)):
            run_systems.append("llama.cpp")
        for sys_label in run_systems:
            fields, env = system_spec(sys_label)
            spec = {**base, **fields}
            if sys_label == "llama.cpp":
                gguf = find_gguf(opts)
                if gguf is None:
                    entry["systems"][sys_label] = {"error": "no GGUF file (pass --gguf)"}
                    continue
                spec["gguf"], spec["threads"] = gguf, opts.llama_cpp_threads
                spec["vocab"] = (config or {}).get("vocab_size")  # the same random prompts as ours
                spec["llama_cpp_backend"] = llama_cpp_backend(gguf)
                if spec["llama_cpp_backend"] is None:
                    entry["systems"][sys_label] = {"error": "no llama.cpp binding runs here (pip install xllamacpp)"}
                    continue
            log(f"[{label}] {sys_label} ...")
            res = run_worker(spec, env, timeout=opts.budget_s * 2 + 600)
            entry["systems"][sys_label] = res
            log(f"[{label}] {sys_label}: " + (res.get("error") or _summary(res)))
        if opts.ttft:
            log(f"[{label}] cold time to first token ...")
            entry["ttft"] = measure_ttft(path, opts.ttft_trials, opts.ttft_timeout_s)
        if opts.lookup and not is_random:  # random weights copy nothing
            qa = opts.qa_path or (str(QA_DEV) if QA_DEV.is_file() else None)
            if qa:
                log(f"[{label}] prompt lookup on {qa} ...")
                spec = dict(task="lookup", model=path, qa_path=qa, qa_limit=opts.qa_limit,
                            qa_max_tokens=opts.qa_max_tokens, lookup=opts.lookup)
                entry["lookup"] = run_worker(spec, {}, timeout=opts.budget_s * 4 + 600)
        models.append(entry)
    return BenchResult(machine=machine, options=asdict(opts), models=models)


def _summary(res: dict) -> str:
    pre = ", ".join(f"{k}: {v:.0f}" for k, v in res.get("prefill", {}).items() if v)
    dec = ", ".join(f"b{k}: {v:.1f}" for k, v in res.get("decode", {}).items() if v)
    return f"prefill tok/s {pre or '-'}; decode tok/s {dec or '-'}; {res.get('elapsed_s', 0):.0f} s"



__all__ = ["BenchOptions", "BenchResult", "run_bench", "format_table", "SHAPES"]
