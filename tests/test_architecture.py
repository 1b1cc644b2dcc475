"""The import contracts in pyproject.toml (import-linter): dependencies point one way, no circles,
the converter reached from the runtime only through its one seam, click only under cli/."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_import_contracts_hold():
    r = subprocess.run([sys.executable, "-c", "from importlinter.cli import lint_imports_command; lint_imports_command()"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]


def imports_of(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against the file's package
                pkg = path.relative_to(ROOT).with_suffix("").parts[:-node.level]
                if pkg and pkg[0] == "convert":
                    pkg = ("mlxllama", "convert", *pkg[1:])
                base = ".".join(pkg) + (("." + base) if base else "")
            names.add(base)
    return names


def test_click_only_under_cli():
    for path in (ROOT / "mlxllama").rglob("*.py"):
        if "cli" in path.relative_to(ROOT / "mlxllama").parts:
            continue
        assert not any(n == "click" or n.startswith("click.") for n in imports_of(path)), path


SEAMS = {  # runtime modules allowed to reach into the converter, and why
    "mlxllama/resolve.py": "builds the default model on first use",
    "mlxllama/__init__.py": "mlxllama.convert() as a lazy attribute",
    "mlxllama/lora/fuse.py": "writes the fused model with the converter's shard writer",
    "mlxllama/bench/run.py": "fetches the default GGUF for llama.cpp",
}


def test_the_runtime_reaches_the_converter_only_through_its_seams():
    for path in (ROOT / "mlxllama").rglob("*.py"):
        rel = str(path.relative_to(ROOT))
        if rel.startswith("mlxllama/cli/") or rel in SEAMS:
            continue
        bad = [n for n in imports_of(path) if n == "mlxllama.convert" or n.startswith("mlxllama.convert.")]
        assert not bad, f"{rel} imports {bad}"


def test_convert_is_not_a_top_level_package():
    r = subprocess.run([sys.executable, "-c", "import convert"], cwd="/", capture_output=True, text=True)
    assert r.returncode != 0
