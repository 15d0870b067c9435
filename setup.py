"""Build the optional C accelerator of the FASTA parser (prott5nv._fastscan).

Everything else is declared in pyproject.toml. Without a C compiler the install still succeeds
(`optional=True`) and prott5nv parses FASTA with its numpy path instead (about 2x slower).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension("prott5nv._fastscan", ["src/prott5nv/_fastscan.c"], optional=True, extra_compile_args=["-O3"])
    ]
)
