"""Builds gradmon's two optional fast paths:

- gradmon.stats._cpu_kernel (plain C, no torch headers): the CPU statistics kernel.
  Without it gradmon uses its torch backend.
- gradmon.agent._scan (C++ against the installed torch's headers): the per-parameter pass
  of a collection. Like any torch extension it needs torch at build time, so it is built
  only where torch imports during the build: `make setup` installs with
  `--no-build-isolation` after installing torch. Without it gradmon runs the same pass in
  Python (~1-2 us more per parameter and collection).

A missing compiler, or torch, leaves a working install that prints what it left out.
Under CI=1 a failed build fails the install, with the compiler's reason.
"""

import os
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

WITHOUT = {
    "gradmon.stats._cpu_kernel": "the torch backend will be used",
    "gradmon.agent._scan": "the same pass in Python will be used",
}


class OptionalBuildExt(build_ext):
    def build_extension(self, ext: Extension) -> None:
        try:
            super().build_extension(ext)
        except Exception as exc:
            if os.environ.get("CI"):
                raise
            print(f"gradmon: {ext.name} not built ({exc}); {WITHOUT[ext.name]}", file=sys.stderr)


def scan_extension() -> Extension | None:
    """The C++ pass, compiled like torch.utils.cpp_extension.CppExtension does (include
    and library paths, ABI flag), or None where torch does not import."""
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as exc:
        if os.environ.get("CI"):
            raise SystemExit(
                f"gradmon: CI=1 and torch does not import at build time ({exc})"
            ) from exc
        print(
            f"gradmon: gradmon.agent._scan not built (torch is not importable at build "
            f"time: install torch first, then gradmon with --no-build-isolation); "
            f"{WITHOUT['gradmon.agent._scan']}",
            file=sys.stderr,
        )
        return None
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    lib_dirs = cpp_extension.library_paths()
    return Extension(
        "gradmon.agent._scan",
        sources=["gradmon/agent/_scan.cpp"],
        include_dirs=cpp_extension.include_paths(),
        library_dirs=lib_dirs,
        runtime_library_dirs=lib_dirs,
        libraries=["c10", "torch", "torch_cpu", "torch_python"],
        language="c++",
        define_macros=[
            ("GRADMON_TORCH_VERSION", f'"{torch.__version__}"'),
            ("_GLIBCXX_USE_CXX11_ABI", str(abi)),
        ],
        extra_compile_args=["-O2", "-std=c++17", "-Wno-c++20-extensions"],
    )


extensions = [
    Extension(
        "gradmon.stats._cpu_kernel",
        sources=["gradmon/stats/_cpu_kernel.c"],
        extra_compile_args=["-O3", "-std=c11", "-fno-math-errno", "-ffp-contract=fast"],
        extra_link_args=["-lpthread", "-lm"],
    )
]
scan = scan_extension()
if scan is not None:
    extensions.append(scan)

setup(ext_modules=extensions, cmdclass={"build_ext": OptionalBuildExt})
