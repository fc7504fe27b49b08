"""The optional C part: etwmon._speedups (the bpf source's ring walk). Everything else is in pyproject.toml; when
no compiler is found the build goes on without it and the source walks the ring in Python."""

from setuptools import Extension, setup

setup(ext_modules=[Extension("etwmon._speedups", ["etwmon/_speedups.c"], optional=True,
                             extra_compile_args=["-O2", "-std=c11", "-Wall"])])
