"""Builds torch_ellm._C with CMake (CMakeLists.txt) and installs the Python package.

The integrations/ folder installs as torch_ellm.integrations.
"""
import os
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        import pybind11

        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / ext.name
        build_dir.mkdir(parents=True, exist_ok=True)
        config = [
            f"-S{ROOT}",
            f"-B{build_dir}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            "-DCMAKE_BUILD_TYPE=Release",
        ]
        subprocess.run(["cmake", *config], check=True)
        jobs = str(os.cpu_count() or 2)
        subprocess.run(["cmake", "--build", str(build_dir), "-j", jobs], check=True)


setup(
    packages=["torch_ellm", "torch_ellm.integrations", "torch_ellm.integrations.engine"],
    package_dir={"torch_ellm": "torch_ellm", "torch_ellm.integrations": "integrations"},
    ext_modules=[CMakeExtension("torch_ellm._C")],
    cmdclass={"build_ext": CMakeBuild},
)
