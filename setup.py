# The cffi shim is built by setuptools through cffi_modules, which pyproject.toml cannot express.
from setuptools import setup

setup(cffi_modules=["native/build_ffi.py:ffibuilder"])
