"""The pytest plugin (entry point ``gntipc`` of group ``pytest11``): fixtures only.

Every fixture is opt-in by name; the plugin has no autouse fixture and no hook, so a test
suite that requests none of them runs exactly as without it.  Disable it with
``-p no:gntipc``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest

from ..streams import VchanStream
from ._runtime import ServerClient, SimRuntime

__all__ = [
    "gntipc_server_client",
    "gntipc_sim",
    "gntipc_stream_pair",
]

StreamPair = tuple[VchanStream, VchanStream]


@pytest.fixture
def gntipc_sim(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> Iterator[SimRuntime]:
    """A simulated hypervisor of the test's own (:class:`gntipc.testing.SimRuntime`).

    During the test, this process plays domain 0 of it (another one with
    ``@pytest.mark.parametrize("gntipc_sim", [domid], indirect=True)``):
    ``GNTIPC_BACKEND=sim``, ``GNTIPC_SIM_DIR`` (a fresh directory) and
    ``GNTIPC_SIM_DOMID`` are set, so code that calls ``gntipc.listen`` /
    ``gntipc.connect`` without a backend uses it.  At teardown the processes it started
    are killed, the backends it opened closed, and the test fails if anything else was
    left behind (:meth:`~SimRuntime.assert_cleaned_up`).
    """
    runtime = SimRuntime(getattr(request, "param", 0))
    for name, value in runtime.env_vars().items():
        monkeypatch.setenv(name, value)
    yield runtime
    try:
        runtime.close(check=True)
    except AssertionError as exc:
        pytest.fail(str(exc), pytrace=False)


def _stream_pair_fixture() -> Callable[[SimRuntime], AsyncIterator[StreamPair]]:
    # A new function each time: pytest-asyncio's decorator marks the function itself.
    async def stream_pair(gntipc_sim: SimRuntime) -> AsyncIterator[StreamPair]:
        async with gntipc_sim.stream_pair() as pair:
            yield pair

    return stream_pair


def _asyncio_fixture(func: Callable[..., Any], name: str) -> object:
    """``func`` as a pytest-asyncio fixture (None without pytest-asyncio)."""
    try:
        import pytest_asyncio
    except ImportError:
        return None
    return pytest_asyncio.fixture(func, name=name, loop_scope="function")


# The anyio plugin runs a plain async fixture when the test uses anyio_backend; pytest-asyncio
# runs one marked by its own decorator.  The public fixture picks the one for the test.
_gntipc_stream_pair_anyio = pytest.fixture(_stream_pair_fixture(), name="_gntipc_stream_pair_anyio")
_gntipc_stream_pair_asyncio = _asyncio_fixture(
    _stream_pair_fixture(), "_gntipc_stream_pair_asyncio"
)


def _async_fixture(request: pytest.FixtureRequest, name: str) -> Any:
    """The value of the async fixture ``_<name>_anyio`` or ``_<name>_asyncio``, whichever
    the test's async plugin runs in its event loop."""
    if "anyio_backend" in request.fixturenames:
        return request.getfixturevalue(f"_{name}_anyio")
    marker = request.node.get_closest_marker("asyncio")
    if marker is not None and request.config.pluginmanager.has_plugin("asyncio"):
        scope = marker.kwargs.get("loop_scope") or request.config.getini(
            "asyncio_default_test_loop_scope"
        )
        if scope not in (None, "function"):
            pytest.fail(
                f"{name} runs in the test's event loop: it needs loop_scope='function' "
                f"(this test's loop scope is {scope!r})",
                pytrace=False,
            )
        return request.getfixturevalue(f"_{name}_asyncio")
    pytest.fail(
        f"{name} is an async fixture: mark the test with @pytest.mark.anyio (anyio's "
        "pytest plugin, asyncio or trio) or @pytest.mark.asyncio (pytest-asyncio)",
        pytrace=False,
    )


@pytest.fixture
def gntipc_stream_pair(request: pytest.FixtureRequest, gntipc_sim: SimRuntime) -> StreamPair:
    """``(server, client)``: two connected :class:`gntipc.VchanStream` in this process,
    the server in domain 0 and the client in domain 1 of :func:`gntipc_sim`, with 64 KiB
    rings; closed after the test.  An async fixture for tests marked
    ``@pytest.mark.anyio`` (asyncio or trio) or ``@pytest.mark.asyncio``.  For other
    domains or ring sizes, use ``async with gntipc_sim.stream_pair(...)``."""
    pair: StreamPair = _async_fixture(request, "gntipc_stream_pair")
    return pair


@pytest.fixture
def gntipc_server_client(gntipc_sim: SimRuntime) -> Callable[..., ServerClient]:
    """``gntipc_server_client(server, client)`` starts ``server(1, path)`` in a process
    playing domain 0 and ``client(0, path)`` in one playing domain 1 of
    :func:`gntipc_sim`, and returns the two processes
    (:meth:`SimRuntime.server_client`; keyword arguments ``server_domid``,
    ``client_domid``, ``loop``)."""
    return gntipc_sim.server_client
