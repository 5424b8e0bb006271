"""A backend instance per test, over every available backend."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from gntipc.backends import Backend, get_backend


@pytest.fixture
def backend(backend_name: str) -> Iterator[Backend]:
    with get_backend(backend_name) as b:
        yield b
