# The native core is compiled at install time by cffi (API mode); pyproject.toml cannot
# name cffi_modules, so this is what setup.py is for.
#
# The wheel is one limited-API build for every CPython >= 3.11 (tag cp311-abi3): cffi
# puts py_limited_api=True on the Extension (hence `_lib.abi3.so`) and its generated C
# defines Py_LIMITED_API (on a non-debug CPython), so the module uses only the stable ABI;
# bdist_wheel must be told so, else it tags the wheel cp311-cp311 and 3.12+ refuse it.
# 3.11 is the oldest Python we support (requires-python), hence the floor of the tag.
from setuptools import setup

setup(
    cffi_modules=["src/gntipc/_native/_build.py:ffibuilder"],
    options={"bdist_wheel": {"py_limited_api": "cp311"}},
)
