# cffi_modules cannot be declared in pyproject.toml; this shim is all setup.py does.
from setuptools import setup

setup(cffi_modules=["build.py:ffibuilder"])
