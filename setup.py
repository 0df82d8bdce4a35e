"""Builds the optional C fast path for CPU statistics (plain C, no torch headers).

If the compiler is missing the build still succeeds: gradmon then uses its torch backend.
Under CI=1 a failed build fails the install, with the compiler's reason.
"""

import os

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class OptionalBuildExt(build_ext):
    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:
            if os.environ.get("CI"):
                raise
            print(f"gradmon: C fast path not built ({exc}); the torch backend will be used")

    def build_extension(self, ext: Extension) -> None:
        try:
            super().build_extension(ext)
        except Exception as exc:
            if os.environ.get("CI"):
                raise
            print(f"gradmon: C fast path not built ({exc}); the torch backend will be used")


setup(
    ext_modules=[
        Extension(
            "gradmon.stats._cpu_kernel",
            sources=["gradmon/stats/_cpu_kernel.c"],
            extra_compile_args=["-O3", "-std=c11", "-fno-math-errno", "-ffp-contract=fast"],
            extra_link_args=["-lpthread", "-lm"],
        )
    ],
    cmdclass={"build_ext": OptionalBuildExt},
)
