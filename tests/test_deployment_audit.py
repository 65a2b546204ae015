"""Privacy audit on the real network path: every byte the hospitals send in a loopback deployment.

The hospitals' ``flower-client run`` connect to a recorder in front of the
real ``flower-server``: it terminates TLS with the federation's server
certificate (the test made the CA), records the plaintext each hospital
sends, and forwards it over TLS to the SuperLink.  The recorded requests
(Flower's fleet API over HTTP/1.1, or HTTP/2 DATA frames per stream) are
reassembled and searched (with every zlib stream in them inflated: statistics travel
compressed, ``common.records``) for anything
per patient: an id, a path of the site folder, or the exact float64 bytes
of any probability the sites hold in their own prediction files (what an
unprotected histogram's lone-cell sum carries).
Every site runs at its floor (``privacy.yaml``: min_cell_count 3).
"""

from __future__ import annotations

import asyncio
import csv
import re
import shutil
import ssl
import struct
import threading
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from common.gridstats import ClassHistogram, ScoreGrid
from common.processes import free_port
from common.records import MAX_INFLATED_BYTES, PACKED_ZLIB_PREFIX, arrays_record
from common.sitedata import iter_cases
from tests.loopback import Loopback, tiny_experiment

RUN_S = 1200.0
K = 3
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
ALPN = ["h2", "http/1.1"]  # what the relay accepts from hospitals: gRPC or Flower's REST fleet API


class Recorder:
    """A TLS-terminating TCP relay on 127.0.0.1 that keeps what clients send (one buffer per connection)."""

    def __init__(self, certs: Path, upstream_port: int) -> None:
        self.port = free_port()
        self.upstream = upstream_port
        self.sent: list[bytearray] = []
        self.server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.server_ctx.load_cert_chain(certs / "server.crt", certs / "server.key")
        self.server_ctx.set_alpn_protocols(ALPN)
        self.ca = certs / "ca.crt"
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, keep: bytearray | None
    ) -> None:
        try:
            while data := await reader.read(65536):
                if keep is not None:
                    keep += data
                writer.write(data)
                await writer.drain()
        except (ConnectionError, ssl.SSLError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    def _upstream_ctx(self, client: asyncio.StreamWriter) -> ssl.SSLContext:
        """TLS to the server offering exactly what the client negotiated here (ALPN), nothing else.

        nginx (HTTP/1.1 only) refuses a handshake whose ALPN offers only ``h2``;
        a relay that offered something the client did not would not be transparent.
        """
        ctx = ssl.create_default_context(cafile=str(self.ca))
        chosen = client.get_extra_info("ssl_object").selected_alpn_protocol()
        if chosen:
            ctx.set_alpn_protocols([chosen])
        return ctx

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        keep = bytearray()
        self.sent.append(keep)
        try:
            up_reader, up_writer = await asyncio.open_connection(
                "127.0.0.1", self.upstream, ssl=self._upstream_ctx(writer), server_hostname="127.0.0.1"
            )
        except (OSError, ssl.SSLError):
            writer.close()
            return
        await asyncio.gather(self._pipe(reader, up_writer, keep), self._pipe(up_reader, writer, None))

    def start(self) -> None:
        self.thread.start()

        async def serve() -> asyncio.base_events.Server:
            return await asyncio.start_server(self._handle, "127.0.0.1", self.port, ssl=self.server_ctx)

        self.server = asyncio.run_coroutine_threadsafe(serve(), self.loop).result(10)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.server.close)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def http2_payloads(stream: bytes) -> Iterator[bytes]:
    """The DATA of each HTTP/2 stream a client sent (gRPC messages, frame headers removed)."""
    pos = len(PREFACE)
    data: dict[int, bytearray] = {}
    while pos + 9 <= len(stream):
        length = int.from_bytes(stream[pos : pos + 3], "big")
        ftype, flags = stream[pos + 3], stream[pos + 4]
        sid = struct.unpack(">I", stream[pos + 5 : pos + 9])[0] & 0x7FFFFFFF
        body = stream[pos + 9 : pos + 9 + length]
        pos += 9 + length
        if ftype == 0:  # DATA
            if flags & 0x8:  # PADDED
                body = body[1 : len(body) - body[0]]
            data.setdefault(sid, bytearray()).extend(body)
    yield from (bytes(b) for b in data.values())


def http1_payloads(stream: bytes) -> Iterator[bytes]:
    """Each HTTP/1.1 request a client sent: its request line and headers, then its body (chunks joined)."""
    pos = 0
    while pos < len(stream):
        end = stream.find(b"\r\n\r\n", pos)
        if end < 0:
            yield stream[pos:]
            return
        head = stream[pos:end]
        yield head
        headers = {
            k.strip().lower(): v.strip()
            for k, _, v in (line.partition(b":") for line in head.split(b"\r\n")[1:])
        }
        pos = end + 4
        if headers.get(b"transfer-encoding", b"").lower() == b"chunked":
            body = bytearray()
            while True:
                eol = stream.index(b"\r\n", pos)
                size = int(stream[pos:eol].split(b";")[0], 16)
                pos = eol + 2
                body += stream[pos : pos + size]
                pos += size + 2
                if size == 0:
                    break
            yield bytes(body)
        else:
            length = int(headers.get(b"content-length", b"0"))
            yield stream[pos : pos + length]
            pos += length


def payloads(stream: bytes) -> Iterator[bytes]:
    """Message bodies a client sent over one connection, HTTP/2 (gRPC) or HTTP/1.1 (Flower's REST fleet API)."""
    return http2_payloads(stream) if stream.startswith(PREFACE) else http1_payloads(stream)


ZLIB_HEADER = re.compile(rb"\x78[\x01\x5e\x9c\xda]")


def inflated(blob: bytes, cap: int = MAX_INFLATED_BYTES) -> Iterator[bytes]:
    """Every complete zlib stream inside ``blob``, inflated: statistics travel compressed (``common.records``).

    Each candidate header is tried where it stands (a memoryview, no copy); a model's bytes hold
    a few hundred chance headers, each of which fails within a few bytes.
    """
    view = memoryview(blob)
    for m in ZLIB_HEADER.finditer(blob):
        inflater = zlib.decompressobj()
        try:
            out = inflater.decompress(view[m.start() :], cap)
        except zlib.error:
            continue
        if inflater.eof and out:
            yield out


def leaks(payloads: list[bytes], ids: set[str], paths: list[str], probabilities: np.ndarray) -> list[str]:
    """What of a patient occurs in the payloads (or any zlib stream in them): ids, site paths, probability bytes."""
    found = []
    for i, raw in enumerate(payloads):
        for blob in (raw, *inflated(raw)):
            found += _leaks_in(i, blob, ids, paths, probabilities)
    return found


def _leaks_in(i: int, blob: bytes, ids: set[str], paths: list[str], probabilities: np.ndarray) -> list[str]:
    text = blob.decode("latin-1")
    found = [f"payload {i}: patient id {pid!r}" for pid in ids if pid in text]
    found += [f"payload {i}: path {p!r}" for p in paths if p in text]
    # float64: what histogram sums carry; a float32 pattern (4 bytes) would match model weights by chance
    found += [f"payload {i}: the bytes of probability {p!r}" for p in probabilities if struct.pack("<d", p) in blob]
    return found


def _site_probabilities(out: Path) -> np.ndarray:
    values: list[float] = []
    for f in out.glob("*/predictions/*.csv"):
        with f.open() as fh:
            values += [float(r["probability"]) for r in csv.DictReader(fh)]
    return np.unique(np.asarray(values))


def test_the_leak_search_finds_an_unprotected_histogram_in_a_byte_stream() -> None:
    """The search itself: a k = 0 histogram's lone-cell sum is a patient's probability, byte for byte."""
    probs = np.array([0.123456789, 0.87654321])
    h = ClassHistogram.from_scores([0, 1], probs, ScoreGrid(1000))
    blob = b"\x00\x05junk" + h.to_arrays()["neg_sum"].tobytes() + b"P0042 tail"
    assert leaks([blob], {"P0042"}, [], probs) == [
        "payload 0: patient id 'P0042'",
        f"payload 0: the bytes of probability {probs[0]!r}",
    ]
    # frame headers between DATA frames are removed before the search
    frames = PREFACE + b"".join(
        len(part).to_bytes(3, "big") + b"\x00\x00" + (1).to_bytes(4, "big") + part
        for part in (blob[:7], blob[7:13], blob[13:])
    )
    assert list(payloads(frames)) == [blob]
    chunked = b"POST /v1/fleet/push HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n7\r\n" + blob[:7]
    chunked += b"\r\n" + f"{len(blob) - 7:x}".encode() + b"\r\n" + blob[7:] + b"\r\n0\r\n\r\n"
    plain = b"POST /v1/fleet/pull HTTP/1.1\r\nContent-Length: 4\r\n\r\nabcd"
    assert list(payloads(chunked + plain))[1::2] == [blob, b"abcd"]


def test_the_leak_search_finds_a_histogram_that_travels_compressed() -> None:
    """Statistics on the wire are zlib streams inside the record's array (``common.records``): inflated, then searched."""
    probs = np.array([0.123456789, 0.87654321])
    h = ClassHistogram.from_scores([0, 1], probs, ScoreGrid(10_000))
    rec = arrays_record(h.to_arrays())
    wire = rec[PACKED_ZLIB_PREFIX + "<f8"].data  # the sums, as the record serialises them
    assert struct.pack("<d", probs[0]) not in wire  # not visible without inflating
    noise = np.random.default_rng(0).integers(0, 256, 200_000, dtype=np.uint8).tobytes()  # a model's chance headers
    blob = noise + b"\x08\x01" + wire + noise
    assert f"payload 0: the bytes of probability {probs[0]!r}" in leaks([blob], set(), [], probs)
    assert leaks([noise], set(), [], probs) == []


@pytest.mark.deployment
@pytest.mark.slow
@pytest.mark.timeout(RUN_S + 300)
def test_a_deployment_run_at_the_site_floor_sends_nothing_per_patient(
    loopback: Loopback, tiny_cohort: Path
) -> None:
    lb = loopback
    sites = ["centre1", "centre2", "centre3"]
    lb.keygen(*sites)
    data = lb.root / "data"
    for site in sites:  # each hospital's own folder, with its own floor
        shutil.copytree(tiny_cohort / site, data / site)
        (data / site / "privacy.yaml").write_text(f"min_cell_count: {K}\n")
    cfg = tiny_experiment(sites, rounds=1, round_timeout_s=240.0)
    cfg["evaluation"]["min_cell_count"] = K
    run_dir = lb.root / "run"
    lb.server(lb.write_config(cfg), run_dir, "--run-timeout", str(RUN_S), discovery_s=120)
    recorder = Recorder(lb.certs, lb.port)
    recorder.start()
    try:
        lb.port = recorder.port  # the hospitals reach the server through the recorder
        for site in sites:
            lb.client(site, data / site)
        summary = lb.finished(run_dir, RUN_S + 60)
    finally:
        recorder.stop()
    assert set(summary["sites"]) == set(sites) and not summary["unavailable_sites"]
    assert summary["models"]["densenet3d"]["internal"]["pooled"]["n"] > 0

    streams = [bytes(b) for b in recorder.sent if b]
    assert streams and all(s.startswith((PREFACE, b"POST ", b"GET ")) for s in streams)  # plaintext recorded
    bodies = [p for s in streams for p in payloads(s)]
    assert sum(map(len, bodies)) > 100_000  # the model updates crossed the recorder
    ids = {c.patient_id for s in sites for c in iter_cases(data / s)}
    paths = [str(data), str(tiny_cohort), str(lb.root / "sites"), ".nii"]
    probabilities = np.unique(np.concatenate([_site_probabilities(lb.site_out(s)) for s in sites]))
    assert probabilities.size > 30  # the sites' own per-patient outputs exist to compare with
    assert leaks(bodies, ids, paths, probabilities) == []
