"""The C part of stream-fm (the feature encoder); everything else is declared in pyproject.toml."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension("stream_fm._encode", ["stream_fm/_encode.c"], extra_compile_args=["-O2", "-std=c11"]),
    ]
)
