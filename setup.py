"""The one native part of quantkit: quantkit/calibrators/_native.c, a plain shared library
loaded with ctypes (no Python ABI; quantkit/calibrators/native.py). Optional: where no C
compiler is found the install goes on and quantkit uses its NumPy code."""

import sys

from setuptools import Extension, setup

flags = [] if sys.platform == "win32" else ["-O3", "-fno-strict-aliasing"]
setup(ext_modules=[Extension("quantkit.calibrators._native", ["quantkit/calibrators/_native.c"],
                             extra_compile_args=flags, optional=True)])
