"""Build script for the pyarraypool C++20 extension (pyarraypool._core).

Project metadata lives in pyproject.toml; this file only declares the extension.

Environment variables:
  PYARRAYPOOL_CFLAGS  extra flags (space separated) added to both the compile and
                      the link command, e.g. "-fsanitize=address,undefined".
  PYARRAYPOOL_DEBUG=1 keep assert() active and build for debugging
                      (adds -UNDEBUG -O1 -g after the default flags).

Changing either variable forces a rebuild on the next `build_ext` (see _flags_stamp).
"""

import os
import shlex
from glob import glob
from pathlib import Path

import numpy
from setuptools import Extension, setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


def _rel(pattern: str) -> list[str]:
    """Sorted glob relative to the project root (setuptools wants relative paths)."""
    return sorted(os.path.relpath(p, ROOT) for p in glob(str(ROOT / pattern)))


sources = _rel("csrc/core/*.cpp") + _rel("csrc/binding/*.cpp")
headers = _rel("csrc/core/*.hpp") + _rel("csrc/binding/*.hpp")

extra_compile_args = [
    "-std=c++20",
    "-O2",
    "-fvisibility=hidden",
    "-Wall",
    "-Wextra",
    "-Wno-missing-field-initializers",
]
extra_link_args: list[str] = []

if os.environ.get("PYARRAYPOOL_DEBUG") == "1":
    extra_compile_args += ["-UNDEBUG", "-O1", "-g"]

user_flags = shlex.split(os.environ.get("PYARRAYPOOL_CFLAGS", ""))
extra_compile_args += user_flags
extra_link_args += user_flags


def _flags_stamp() -> str:
    """Write build/ext_flags.txt when the flags change, so build_ext sees a newer dependency.

    setuptools only rebuilds when a source or a `depends` file is newer than the .so,
    so without this, switching PYARRAYPOOL_CFLAGS/PYARRAYPOOL_DEBUG would not rebuild.
    """
    stamp = ROOT / "build" / "ext_flags.txt"
    content = "\n".join(["compile: " + shlex.join(extra_compile_args),
                         "link: " + shlex.join(extra_link_args), ""])
    try:
        if not stamp.exists() or stamp.read_text() != content:
            stamp.parent.mkdir(parents=True, exist_ok=True)
            stamp.write_text(content)
    except OSError:
        return ""  # read-only tree (e.g. some sdist builds): just skip the stamp
    return os.path.relpath(stamp, ROOT)


flags_stamp = _flags_stamp()

core_ext = Extension(
    "pyarraypool._core",
    sources=sources,
    depends=headers + ([flags_stamp] if flags_stamp else []),
    include_dirs=["csrc", numpy.get_include()],
    define_macros=[
        ("NPY_NO_DEPRECATED_API", "NPY_1_23_API_VERSION"),
        ("NPY_TARGET_VERSION", "NPY_1_23_API_VERSION"),
    ],
    extra_compile_args=extra_compile_args,
    extra_link_args=extra_link_args,
    language="c++",
)

# Auto mode for unchanged programs (docs/auto.md): site-packages gets the .pth
# file that `site` runs at every interpreter start, and the top-level module it
# imports when PYARRAYPOOL_AUTO is set.
AUTO_PTH = "pyarraypool_auto.pth"


class build_py_with_pth(build_py):
    """build_py that also puts the auto-mode .pth file at the root of the build.

    A .pth file works only at the top of site-packages, where no package
    data can go: it is copied beside the top-level modules instead.
    """

    def run(self) -> None:
        super().run()
        self.copy_file(str(ROOT / AUTO_PTH), os.path.join(self.build_lib, AUTO_PTH))

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        return super().get_outputs(include_bytecode) + [os.path.join(self.build_lib, AUTO_PTH)]


setup(
    packages=["pyarraypool"],
    py_modules=["_pyarraypool_autostart"],
    cmdclass={"build_py": build_py_with_pth},
    package_data={"pyarraypool": ["py.typed", "*.pyi"]},
    ext_modules=[core_ext],
    zip_safe=False,
)
