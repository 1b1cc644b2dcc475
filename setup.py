"""Package layout that pyproject.toml cannot express alone (the converter lives in the top-level
convert/ folder and installs as mlxllama.convert), and the optional native CPU kernel
(mlxllama/kernels, an MLX extension built with CMake on Linux). When the kernel cannot be built
(no compiler, no CMake) the install still succeeds and the runtime uses MLX's own operation."""

import os
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

HERE = Path(__file__).resolve().parent


class OptionalCMakeBuild(build_ext):
    """Builds mlxllama.kernels._qmm with CMake; a failure is reported and skipped, never fatal."""

    def build_extension(self, ext):
        if os.environ.get("MLXLLAMA_NO_KERNEL_BUILD"):
            print("mlxllama: MLXLLAMA_NO_KERNEL_BUILD set, native CPU kernel not built")
            return
        try:
            self._cmake(ext)
        except Exception as e:  # noqa: BLE001  (any failure: fall back, the package works without it)
            print(f"mlxllama: native CPU kernel not built ({e}); MLX's own quantized matmul will be used",
                  file=sys.stderr)

    def _cmake(self, ext):
        import mlx  # the build requirement (same version range as the runtime's)

        out = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        out.mkdir(parents=True, exist_ok=True)
        build = Path(self.build_temp).resolve() / "kernels"
        build.mkdir(parents=True, exist_ok=True)
        mlx_lib = Path(mlx.__path__[0]) / "lib"
        args = [
            "cmake", "-S", str(HERE / "mlxllama" / "kernels"), "-B", str(build),
            f"-DPython_EXECUTABLE={sys.executable}", f"-DOUTPUT_DIR={out}", "-DCMAKE_BUILD_TYPE=Release",
        ]
        if self.editable_mode or self.inplace:  # the module stays in the source tree: point at this MLX
            args.append(f"-DMLX_LIB_DIR={mlx_lib}")
        try:
            subprocess.check_call(["ninja", "--version"], stdout=subprocess.DEVNULL)
            args += ["-G", "Ninja"]
        except (OSError, subprocess.CalledProcessError):
            pass
        subprocess.check_call(args)
        subprocess.check_call(["cmake", "--build", str(build), "--parallel"])


ext_modules = []
if sys.platform.startswith("linux"):  # macOS runs Metal; MLX's CPU ops are the slow path elsewhere only
    ext_modules.append(Extension("mlxllama.kernels._qmm", sources=[], optional=True))  # optional: no file, no error

setup(
    packages=find_packages(include=["mlxllama", "mlxllama.*"]) + ["mlxllama.convert"],
    package_dir={"mlxllama.convert": "convert"},
    ext_modules=ext_modules,
    cmdclass={"build_ext": OptionalCMakeBuild},
)
