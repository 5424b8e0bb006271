# The native core is compiled at install time by cffi (API mode); pyproject.toml cannot
# name cffi_modules, so this is the one thing setup.py is for.
from setuptools import setup

setup(cffi_modules=["src/gntipc/_native/_build.py:ffibuilder"])
