"""The optional C part: etwmon._speedups (the bpf source's ring walk and reader's wait, the EventRing's common
paths, the identity backlog's folds, parse's checks, tail's JSON lines). Everything else is in pyproject.toml;
when no compiler is found the build goes on without it, and the Python code it stands in for runs instead."""

from setuptools import Extension, setup

_SOURCES = ["etwmon/_speedups.c", "etwmon/_json_lines.c", "etwmon/_ring.c", "etwmon/_reader.c",
            "etwmon/_backlog.c"]
setup(ext_modules=[Extension("etwmon._speedups", _SOURCES, optional=True,
                             depends=["etwmon/_speedups.h"],
                             extra_compile_args=["-O2", "-std=c11", "-Wall"])])
