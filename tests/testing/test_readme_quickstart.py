"""The README's first code block, as a user would run it: its ``server()`` in a process
playing domain 0, its ``client()`` in one playing domain 5 (the domains it names), on a
simulated hypervisor of the test's own."""

from __future__ import annotations

import sys
from pathlib import Path

from gntipc.testing import SimProcess, SimRuntime

README = Path(__file__).parents[2] / "README.md"


def test_the_quick_start_runs(gntipc_sim: SimRuntime, tmp_path: Path) -> None:
    code = README.read_text().split("```python\n", 1)[1].split("```", 1)[0]
    assert "async def server()" in code and "async def client()" in code
    (tmp_path / "quickstart.py").write_text(code)

    def run(role: str, domid: int) -> SimProcess:
        script = f"import anyio, quickstart; anyio.run(quickstart.{role})"
        return gntipc_sim.spawn(
            [sys.executable, "-c", f"import sys; sys.path.insert(0, {str(tmp_path)!r}); {script}"],
            domid=domid,
        )

    server = run("server", 0)
    client = run("client", 5)
    assert client.join(60) == 0
    assert server.join(60) == 0  # the server's loop ends at the client's close
    lines = server.stdout.splitlines()
    assert len(lines) == 1000, lines[-3:]
    assert lines[0] == "Reading(sensor=0, value=0.0)"
    assert lines[-1] == "Reading(sensor=999, value=499.5)"
