"""The pytest plugin as a user gets it: test files run by pytester under anyio's plugin
(asyncio, trio) and pytest-asyncio (strict and auto modes), the leak check at teardown,
isolation between tests, and a suite that requests no fixture left alone."""

from __future__ import annotations

import importlib.metadata
import os
import textwrap
from pathlib import Path

import pytest

import gntipc.testing._plugin

pytest_plugins = ["pytester"]

INI = """
[pytest]
asyncio_default_fixture_loop_scope = function
filterwarnings = error
addopts = -p no:cacheprovider
"""

# The user's service, in the user's test files below.
SERVICE = """
import os, sys, time
import anyio, pytest, gntipc

async def echo_server(peer, path):
    async with await gntipc.listen(peer, path) as listener:
        print("listening", flush=True)
        async with await listener.accept() as stream:
            while True:
                try:
                    await stream.send(await stream.receive())
                except anyio.EndOfStream:
                    return

async def client(peer, path):
    async with await gntipc.connect(peer, path, timeout=30) as stream:
        await stream.send(b"ping")
        print((await stream.receive()).decode(), flush=True)
        await stream.send_eof()
"""


def run(pytester: pytest.Pytester, test_file: str, *args: str) -> pytest.RunResult:
    pytester.makeini(INI)
    pytester.makepyfile(test_user=SERVICE + textwrap.dedent(test_file))
    return pytester.runpytest("-v", *args)


def test_registered_through_the_entry_point(pytestconfig: pytest.Config) -> None:
    points = importlib.metadata.entry_points(group="pytest11", name="gntipc")
    assert [p.value for p in points] == ["gntipc.testing._plugin"]
    assert pytestconfig.pluginmanager.get_plugin("gntipc") is gntipc.testing._plugin


def test_under_anyio(pytester: pytest.Pytester) -> None:
    result = run(
        pytester,
        """
        pytestmark = pytest.mark.anyio

        @pytest.fixture(params=["asyncio", "trio"])
        def anyio_backend(request):
            return request.param

        async def test_pair(gntipc_stream_pair):
            server, client = gntipc_stream_pair
            await client.send(b"hi")
            assert await server.receive() == b"hi"

        async def test_my_server_here_my_client_there(gntipc_sim, anyio_backend):
            path = gntipc_sim.new_path()
            async with await gntipc.listen(1, path) as listener:  # this process: domain 0
                peer = gntipc_sim.spawn(client, 0, path, domid=1, loop=anyio_backend)
                async with await listener.accept() as stream:
                    assert await stream.receive() == b"ping"
                    await stream.send(b"pong")
                    assert await peer.receive_line() == "pong"
                    assert await peer.wait() == 0

        async def test_two_processes(gntipc_server_client, anyio_backend):
            pair = gntipc_server_client(echo_server, client, loop=anyio_backend)
            assert await pair.client.wait() == 0
            assert await pair.client.receive_line() == "ping"
        """,
    )
    result.assert_outcomes(passed=6)


@pytest.mark.parametrize("mode", ["strict", "auto"])
def test_under_pytest_asyncio(pytester: pytest.Pytester, mode: str) -> None:
    marker = "@pytest.mark.asyncio" if mode == "strict" else ""  # auto: none needed
    result = run(
        pytester,
        f"""
        {marker}
        async def test_pair(gntipc_stream_pair):
            server, client = gntipc_stream_pair
            await server.send(b"hi")
            assert await client.receive() == b"hi"

        {marker}
        async def test_in_process_service(gntipc_sim):
            path = gntipc_sim.new_path()
            async with await gntipc.listen(0, path) as listener:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(client, 0, path)
                    async with await listener.accept() as stream:
                        assert await stream.receive() == b"ping"
                        await stream.send(b"pong")
        """,
        "-o",
        f"asyncio_mode={mode}",
    )
    result.assert_outcomes(passed=2)


def test_leftovers_fail_the_test_and_are_cleaned_up(pytester: pytest.Pytester) -> None:
    result = run(
        pytester,
        """
        from gntipc.backends.sim import SimBackend, assert_cleaned_up

        leaked = []

        def test_leaks(gntipc_sim):
            backend = SimBackend()  # never closed
            leaked.append((backend, backend.share(1, 1)))

        def test_next_one_is_clean(gntipc_sim):
            assert gntipc_sim.leftovers() == []
            assert_cleaned_up()  # the leaked backend is closed: nothing left in the process
        """,
    )
    result.assert_outcomes(passed=2, errors=1)
    result.stdout.fnmatch_lines(
        [
            "*ERROR at teardown of test_leaks*",
            "gntipc sim leftovers:",
            "open <SimBackend domain 0 in *>",
            "  open <SimPages *>",
        ]
    )


def test_each_test_has_its_own_runtime(pytester: pytest.Pytester) -> None:
    result = run(
        pytester,
        """
        seen = []

        def test_one(gntipc_sim):
            with gntipc.get_backend() as backend:
                backend.store.write("data/mark", b"1")
            seen.append(gntipc_sim.path)

        def test_two(gntipc_sim):
            assert gntipc_sim.path != seen[0]
            assert not os.path.exists(seen[0])  # removed at the end of test_one
            with gntipc.get_backend() as backend:
                with pytest.raises(gntipc.XenError):
                    backend.store.read("data/mark")
        """,
    )
    result.assert_outcomes(passed=2)


def test_opt_in_only(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OUTER_SIM_DIR", os.environ["GNTIPC_SIM_DIR"])
    result = run(
        pytester,
        """
        def test_no_fixture_unless_asked(request):
            assert not [n for n in request.fixturenames if "gntipc" in n]
            assert os.environ.get("GNTIPC_SIM_DIR") == os.environ.get("OUTER_SIM_DIR")

        def test_sync_test_gets_a_clear_error(gntipc_stream_pair):
            pass

        @pytest.mark.asyncio(loop_scope="module")
        async def test_module_loop_gets_a_clear_error(gntipc_stream_pair):
            pass
        """,
    )
    result.assert_outcomes(passed=1, errors=2)
    result.stdout.fnmatch_lines(
        [
            "*gntipc_stream_pair is an async fixture: mark the test with @pytest.mark.anyio*",
            "*gntipc_stream_pair runs in the test's event loop: it needs loop_scope='function'*",
        ]
    )


def test_can_be_disabled(pytester: pytest.Pytester) -> None:
    result = run(pytester, "def test_x(gntipc_sim):\n    pass\n", "-p", "no:gntipc")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*fixture 'gntipc_sim' not found*"])


def test_the_readme_example_runs(pytester: pytest.Pytester) -> None:
    # The code block of the README's "Testing your own service", as a user's test file.
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    section = readme.split("## Testing your own service", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    pytester.makeini(INI)
    pytester.makepyfile(test_readme=code)
    result = pytester.runpytest("-v")
    # two async tests on asyncio and trio, one sync test
    result.assert_outcomes(passed=5)
