"""The socket bridge: unmodified socket programs talk to a service in another VM.

    python examples/socket_bridge.py [--mux]

VM 0 runs a web server that knows nothing of vchans (Python's ``http.server``) and a
``gntipc proxy`` in server mode in front of it; VM 1 runs a ``gntipc proxy`` in client
mode, which listens on a local TCP port, and a plain HTTP client (``urllib``) that
fetches files from that port, several at once.  Each connection crosses between the VMs
on a vchan of its own, as with Xen's vchan-socket-proxy; with --mux they all share one.
On sim, each side is a set of processes playing its domain; by hand, on two VMs::

    domain 0:  python -m http.server --bind 127.0.0.1 8000
               gntipc proxy --mode server 5 data/gntipc-examples/web tcp:127.0.0.1:8000
    domain 5:  gntipc proxy 0 data/gntipc-examples/web tcp:127.0.0.1:8080
               curl http://127.0.0.1:8080/hello.txt
"""

from __future__ import annotations

import argparse
import hashlib
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO

import _launch  # the domains each side plays, as in every example (not part of this one)

PATH = "data/gntipc-examples/web"
TIMEOUT = 60  # for each step


class Program:
    """A process whose output (``watch``: stdout or stderr) is read line by line and
    passed on to our stderr, labelled."""

    def __init__(self, label: str, cmd: Sequence[str], env: dict[str, str], watch: str) -> None:
        pipe = subprocess.PIPE
        out, err = (pipe, None) if watch == "stdout" else (None, pipe)
        self.proc = subprocess.Popen(cmd, env=env, text=True, stdout=out, stderr=err)
        self.label = label
        self.lines: queue.Queue[str] = queue.Queue()
        reader = self.proc.stdout or self.proc.stderr
        threading.Thread(target=self._pump, args=(reader,), daemon=True).start()

    def _pump(self, pipe: IO[str]) -> None:
        for line in pipe:
            sys.stderr.write(f"[{self.label}] {line}")
            self.lines.put(line)

    def expect(self, marker: str) -> str:
        """The next line containing ``marker``."""
        deadline = time.monotonic() + TIMEOUT
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise SystemExit(f"socket_bridge: no {marker!r} from the {self.label}") from None
            if marker in line:
                return line

    def stop(self) -> None:
        """SIGTERM, then wait: a gntipc proxy exits 0."""
        self.proc.send_signal(signal.SIGTERM)
        if status := self.proc.wait(timeout=TIMEOUT):
            raise SystemExit(f"socket_bridge: the {self.label} exited with status {status}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mux", action="store_true", help="all connections on one vchan")
    args = parser.parse_args()
    backend, server_dom, client_dom = _launch.domains()
    gntipc = [sys.executable, "-m", "gntipc.cli", "proxy", "-v", *(["--mux"] if args.mux else [])]
    programs: list[Program] = []
    with tempfile.TemporaryDirectory() as site:
        files = {"hello.txt": b"hello from the other VM\n", "data.bin": os.urandom(4 << 20)}
        for name, content in files.items():
            Path(site, name).write_bytes(content)
        try:
            # VM 0: the web server (any port), and the proxy to it.
            http_server = [sys.executable, "-u", "-m", "http.server", "-b", "127.0.0.1", "-d", site]
            web = Program("vm 0 web server", [*http_server, "0"], os.environ.copy(), "stdout")
            programs.append(web)
            port = web.expect("Serving HTTP on").split(" port ")[1].split()[0]
            vm0 = _launch.vm_env(backend, server_dom)
            cmd = [*gntipc, "--mode", "server", str(client_dom), PATH, f"tcp:127.0.0.1:{port}"]
            exit_proxy = Program("vm 0 proxy", cmd, vm0, "stderr")
            programs.append(exit_proxy)

            # VM 1: the proxy listening on a local port of its choice, and the client.
            vm1 = _launch.vm_env(backend, client_dom)
            entry = Program("vm 1 proxy", [*gntipc, str(server_dom), PATH, "tcp:0"], vm1, "stderr")
            programs.append(entry)
            address = entry.expect("ready: ").split("ready: tcp:")[1].split(",")[0].strip()

            def fetch(name: str) -> bytes:
                url = f"http://{address}/{name}"
                with urllib.request.urlopen(url, timeout=TIMEOUT) as response:
                    return bytes(response.read())

            names = [*files, "hello.txt", "data.bin"]
            with ThreadPoolExecutor(len(names)) as pool:
                got = list(pool.map(fetch, names))
            for name, content in zip(names, got, strict=True):
                if hashlib.sha256(content).digest() != hashlib.sha256(files[name]).digest():
                    raise SystemExit(f"socket_bridge: {name} arrived damaged")

            entry.stop()
            exit_proxy.stop()
        finally:
            for program in programs:  # the web server, or everything after a failure
                if program.proc.poll() is None:
                    program.proc.kill()
                program.proc.wait()
    print(
        f"socket_bridge: ok: {len(names)} HTTP downloads at once through the vchan"
        f"{' (one for all, --mux)' if args.mux else 's'}, every byte checked"
    )


if __name__ == "__main__":
    main()
