"""Build the optional one-pass kernels (actstats/_native.c); metadata lives in setup.cfg.

The extension is optional: without a C compiler the build goes on and actstats
reduces tensors with PyTorch operations instead (slower, same results).
"""

import sys

from setuptools import Extension, setup

flags = [] if sys.platform == "win32" else ["-O3", "-fopenmp-simd", "-fno-math-errno", "-fno-trapping-math"]

# dlsym/dladdr (the kernels find PyTorch's OpenMP runtime at import) live in libdl before glibc 2.34
libraries = ["dl"] if sys.platform.startswith("linux") else []

setup(ext_modules=[Extension("actstats._native", ["actstats/_native.c"], extra_compile_args=flags,
                             libraries=libraries, optional=True)])
