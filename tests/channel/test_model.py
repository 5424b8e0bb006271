"""Both endpoints of one vchan driven by hypothesis against a model of two byte queues."""

from __future__ import annotations

from collections import deque

import hypothesis.strategies as st
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from gntipc.backends import Backend
from gntipc.channel import Vchan

from .test_channel import pair

SIZES = [1024, 2048, 4096, 16384]


def make_machine(backend: Backend) -> type[RuleBasedStateMachine]:
    class VchanMachine(RuleBasedStateMachine):
        srv: Vchan
        cli: Vchan

        @initialize(
            read=st.sampled_from(SIZES),
            write=st.sampled_from(SIZES),
            start=st.one_of(st.just(0), st.integers((1 << 32) - 40000, (1 << 32) - 1)),
        )
        def setup(self, read: int, write: int, start: int) -> None:
            self.srv, self.cli = pair(backend, read, write, start=start)
            self.model = {"c2s": deque[int](), "s2c": deque[int]()}

        def ends(self, direction: str) -> tuple[Vchan, Vchan]:
            return (self.cli, self.srv) if direction == "c2s" else (self.srv, self.cli)

        @rule(direction=st.sampled_from(["c2s", "s2c"]), data=st.binary(max_size=20000))
        def stream_write(self, direction: str, data: bytes) -> None:
            tx, _ = self.ends(direction)
            q = self.model[direction]
            room = tx.write_size - len(q)
            n = tx.write_nowait(data)
            assert n == min(len(data), room)
            q.extend(data[:n])

        @rule(direction=st.sampled_from(["c2s", "s2c"]), data=st.binary(max_size=20000))
        def packet_send(self, direction: str, data: bytes) -> None:
            tx, _ = self.ends(direction)
            q = self.model[direction]
            if len(data) > tx.write_size:
                return
            fits = len(data) <= tx.write_size - len(q)
            assert tx.send_nowait(data) == fits
            if fits:
                q.extend(data)

        @rule(direction=st.sampled_from(["c2s", "s2c"]), n=st.integers(1, 20000))
        def stream_read(self, direction: str, n: int) -> None:
            _, rx = self.ends(direction)
            q = self.model[direction]
            got = rx.read_nowait(n)
            if len(got) < min(n, len(q)):
                # One copy straight out of the ring stops at the ring's end; the next
                # read continues from the start of the ring.
                assert got
                got += rx.read_nowait(n - len(got))
            want = bytes(q.popleft() for _ in range(min(n, len(q))))
            assert got == want

        @precondition(lambda self: hasattr(self, "srv"))
        @rule(
            direction=st.sampled_from(["c2s", "s2c"]),
            n=st.integers(0, 20000),
            skip=st.integers(0, 100),
        )
        def peek(self, direction: str, n: int, skip: int) -> None:
            _, rx = self.ends(direction)
            q = list(self.model[direction])
            assert rx.peek_nowait(n, skip) == bytes(q[skip : skip + n])

        @rule(direction=st.sampled_from(["c2s", "s2c"]), n=st.integers(1, 20000))
        def packet_recv(self, direction: str, n: int) -> None:
            _, rx = self.ends(direction)
            q = self.model[direction]
            if n > rx.read_size:
                return
            got = rx.recv_nowait(n)
            if n <= len(q):
                assert got == bytes(q.popleft() for _ in range(n))
            else:
                assert got is None

        @invariant()
        def sizes_agree(self) -> None:
            if not hasattr(self, "srv"):
                return
            for direction in ("c2s", "s2c"):
                tx, rx = self.ends(direction)
                q = self.model[direction]
                assert rx.data_ready() == len(q)
                assert tx.buffer_space() == tx.write_size - len(q)

        def teardown(self) -> None:
            if hasattr(self, "srv"):
                self.cli.close()
                self.srv.close()

    return VchanMachine


def test_both_endpoints_against_a_model(backend: Backend) -> None:
    machine = make_machine(backend)
    machine.TestCase.settings = settings(max_examples=40, stateful_step_count=30, deadline=None)
    machine.TestCase().runTest()
