"""Bulk file transfer between two VMs, with progress and an end-to-end checksum.

    python examples/bulk_transfer.py [--file FILE] [--size 64M] [--zero-copy]  # both VMs here
    python examples/bulk_transfer.py server --peer 5 [--output DIR]  # in domain 0: receives
    python examples/bulk_transfer.py client --peer 0 --file FILE     # in domain 5: sends

The sender streams FILE (by default a temporary file of --size random bytes) over one
vchan with 1 MiB rings: a small header (a msgspec Struct: name and size), the bytes, then
their SHA-256.  The receiver writes the file into DIR (by default a temporary directory,
removed at the end), hashing as it goes, and answers with its own SHA-256: both sides
know the file arrived intact.  The sender shows progress on stderr (a tqdm bar if tqdm is
installed, else a plain line).

With --zero-copy (give it to both sides) the bytes do not go through the ring: after the
header, both sides open a gntipc.bulk message queue; the sender reads the file straight
into buffers of a pool of pages it granted to the receiver and sends each as the
attachment of a typed Chunk message, and the receiver writes the file straight out of its
read-only mapping of them (the ring carries the small messages and their descriptors).
The SHA-256s are Digest messages of the same queue, without attachment.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Annotated, Any

import anyio
import msgspec

import gntipc
from gntipc.bulk import BulkQueue, open_bulk_queue

PATH = "data/gntipc-examples/bulk"
RING = 1 << 20  # sender -> receiver ring: large rings move bulk data fastest
# With --zero-copy the ring carries only descriptors: the default 64 KiB is plenty, and
# the grant budget (1024 pages per domain by default) goes to the sender's pool instead.
ZERO_COPY_RING = 65536
CHUNK = 1 << 20
MAX_HEADER = 4096


class Header(msgspec.Struct):
    name: Annotated[str, msgspec.Meta(min_length=1, max_length=255)]
    size: Annotated[int, msgspec.Meta(ge=0)]


# --zero-copy: the messages of the bulk queue.
class Chunk(msgspec.Struct, tag=True):
    """The file's bytes from ``offset``: the message's attachment."""

    offset: Annotated[int, msgspec.Meta(ge=0)]


class Digest(msgspec.Struct, tag=True):
    sha256: Annotated[bytes, msgspec.Meta(min_length=32, max_length=32)]


Transfer = Chunk | Digest


async def server(peer: int, args: argparse.Namespace) -> None:
    """Receive one file."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.output or tmp)
        ring = ZERO_COPY_RING if args.zero_copy else RING
        async with await gntipc.listen(peer, PATH, read_size=ring) as listener:
            print(f"bulk_transfer server: listening at {PATH} for domain {peer}", flush=True)
            async with await listener.accept() as stream:
                # The header comes from another VM: validate it before using it.
                size = int.from_bytes(await stream.receive_exactly(4), "little")
                if size > MAX_HEADER:
                    raise ValueError(f"header of {size} bytes (at most {MAX_HEADER})")
                header = msgspec.msgpack.decode(await stream.receive_exactly(size), type=Header)
                if os.path.basename(header.name) != header.name or header.name in (".", ".."):
                    raise ValueError(f"bad file name {header.name!r}")
                digest = hashlib.sha256()
                if args.zero_copy:
                    # No pool: this side only receives attachments.
                    async with await open_bulk_queue(stream, Transfer, buffers=0) as queue:
                        theirs = await receive_zero_copy(queue, out / header.name, header, digest)
                else:
                    async with await anyio.open_file(out / header.name, "wb") as f:
                        left = header.size
                        while left:
                            chunk = await stream.receive(min(left, CHUNK))
                            digest.update(chunk)
                            await f.write(chunk)
                            left -= len(chunk)
                    theirs = await stream.receive_exactly(32)
                    await stream.send(digest.digest())
        if theirs != digest.digest():
            raise ValueError(f"{header.name}: checksum mismatch")
        print(
            f"bulk_transfer server: received {out / header.name}, {header.size:,} bytes, "
            f"sha256 {digest.hexdigest()[:16]}... matches",
            flush=True,
        )


async def client(peer: int, args: argparse.Namespace) -> None:
    """Send one file (a temporary one of random bytes without --file)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(args.file) if args.file else Path(tmp, "random.bin")
        if not args.file:
            await anyio.Path(path).write_bytes(os.urandom(args.size))
        size = path.stat().st_size
        async with await gntipc.connect(peer, PATH, timeout=30) as stream:
            header = msgspec.msgpack.encode(Header(path.name, size))
            await stream.send(len(header).to_bytes(4, "little") + header)
            digest = hashlib.sha256()
            t0 = time.perf_counter()
            if args.zero_copy:
                # 4 buffers of 512 KiB: 512 pages, half the default grant budget.
                async with await open_bulk_queue(
                    stream, Transfer, buffers=4, buffer_size=CHUNK // 2
                ) as queue:
                    theirs = await send_zero_copy(queue, path, size, digest)
            else:
                with Progress(size, f"sending {path.name}") as progress:
                    async with await anyio.open_file(path, "rb") as f:
                        for _ in range(0, size, CHUNK):
                            chunk = await f.read(CHUNK)
                            if not chunk:
                                raise ValueError(f"{path} shrank while it was sent")
                            digest.update(chunk)
                            await stream.send(chunk)
                            progress.update(len(chunk))
                await stream.send(digest.digest())
                theirs = await stream.receive_exactly(32)  # once all arrived and was hashed
            elapsed = time.perf_counter() - t0
    if theirs != digest.digest():
        raise ValueError("checksum mismatch: the receiver got other bytes")
    print(
        f"bulk_transfer client: sent {size:,} bytes in {elapsed:.2f} s "
        f"({size / elapsed / 1e6:.0f} MB/s), {'zero-copy, ' if args.zero_copy else ''}"
        "checksum confirmed by the receiver",
        flush=True,
    )


async def send_zero_copy(queue: BulkQueue[Transfer], path: Path, size: int, digest: Any) -> bytes:
    """Read the file straight into loaned buffers of our pool and send each as the
    attachment of a Chunk message; then send our SHA-256 and return the receiver's."""
    with Progress(size, f"sending {path.name}") as progress, open(path, "rb", buffering=0) as f:
        offset = 0
        while offset < size:
            async with queue.loan(min(size - offset, queue.channel.buffer_size)) as buf:
                n = await anyio.to_thread.run_sync(f.readinto, buf)  # no copy in between
                if not n:
                    raise ValueError(f"{path} shrank while it was sent")
                digest.update(buf[:n])
                # the message goes through the ring; the bytes stay in our pages
                await queue.put(Chunk(offset), attachment=buf[:n])
            offset += n
            progress.update(n)
    await queue.put(Digest(digest.digest()))
    message, attachment = await queue.get()
    if not isinstance(message, Digest) or attachment is not None:
        raise ValueError(f"the receiver answered {message!r}, not its digest")
    return message.sha256


async def receive_zero_copy(
    queue: BulkQueue[Transfer], out: Path, header: Header, digest: Any
) -> bytes:
    """Write the file straight out of the sender's pages; return the sender's SHA-256
    (its last message) and answer with ours."""
    async with await anyio.open_file(out, "wb") as f:
        written = 0
        while True:
            message, attachment = await queue.get()
            if isinstance(message, Digest):
                if attachment is not None:
                    attachment.release()
                break
            if attachment is None or message.offset != written:
                raise ValueError(f"a chunk at {message.offset} without bytes, or out of order")
            with attachment as view:
                if len(view) > header.size - written:
                    raise ValueError(
                        f"the sender sent more than the {header.size:,} bytes announced"
                    )
                # The view is the sender's memory, which it could rewrite while we read:
                # this digest guards against accidents, not against a hostile sender
                # (copy first for that, e.g. hash what was written by reading it back).
                digest.update(view)
                await f.write(view)  # from the mapped pages straight into the file
                written += len(view)
    if written != header.size:
        raise ValueError(f"{written:,} bytes of the {header.size:,} announced")
    await queue.put(Digest(digest.digest()))
    return message.sha256


class Progress:
    """Progress on stderr: a tqdm bar if tqdm is installed, else a plain line."""

    def __init__(self, total: int, what: str) -> None:
        self.total, self.what, self.done = total, what, 0
        self.shown = self.t0 = time.monotonic()
        try:
            from tqdm import tqdm
        except ImportError:
            self.bar = None
        else:
            self.bar = tqdm(total=total, desc=what, unit="B", unit_scale=True, file=sys.stderr)

    def update(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif time.monotonic() - self.shown > 0.2 or self.done == self.total:
            self.shown = time.monotonic()
            done, total = self.done / 2**20, self.total / 2**20
            line = f"{self.what}: {done:.1f} of {total:.1f} MiB ({100 * done / total:.0f} %)"
            line += f", {self.done / max(self.shown - self.t0, 1e-9) / 1e6:.0f} MB/s"
            if sys.stderr.isatty():  # one line, rewritten in place
                end = "\n" if self.done == self.total else ""
                print("\r" + line, end=end, file=sys.stderr, flush=True)
            else:
                print(line, file=sys.stderr, flush=True)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.bar is not None:
            self.bar.close()


def size_arg(text: str) -> int:
    """A size in bytes, with an optional K, M or G suffix (binary)."""
    units = {"K": 2**10, "M": 2**20, "G": 2**30}
    number, unit = (text[:-1], units[text[-1].upper()]) if text[-1:].upper() in units else (text, 1)
    try:
        return int(number) * unit
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}") from None


# -- The command line ---------------------------------------------------------------------
# With a role, this file is all a VM needs.  Without one, examples/_launch.py (not part of
# the example) plays both VMs on this machine, running this file once per role.


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "role",
        nargs="?",
        choices=["server", "client"],
        help="the side to run in this VM (default: both, on this machine)",
    )
    parser.add_argument("--peer", type=int, help="with a role: the other VM's domain id")
    parser.add_argument("--file", help="sender: the file to send (default: random bytes)")
    parser.add_argument("--size", type=size_arg, default="64M", help="without --file")
    parser.add_argument("--output", help="receiver: where to write (default: a temporary dir)")
    parser.add_argument(
        "--zero-copy",
        action="store_true",
        help="both sides: move the bytes through a pool of granted pages (gntipc.bulk), "
        "not through the ring",
    )
    args = parser.parse_args()
    if args.role is None:
        import _launch

        _launch.play("bulk_transfer", sys.argv[1:])
    elif args.peer is None:
        parser.error("a role needs --peer")
    else:
        try:
            anyio.run(server if args.role == "server" else client, args.peer, args)
        except Exception as exc:  # one line, not a traceback
            while isinstance(exc, ExceptionGroup) and len(exc.exceptions) == 1:
                exc = exc.exceptions[0]
            raise SystemExit(f"bulk_transfer {args.role}: {type(exc).__name__}: {exc}") from None


if __name__ == "__main__":
    main()
