#!/usr/bin/env python3
"""Benchmark schedule_api.py, run as a subprocess, against local webhook receivers.

    python bench/bench.py --part fires   [--entries 1000] [--per-task 10] [--seconds 60]
                                         [--cron "* * * * * *"] [--slow-entries 0]
                                         [--slow-delay 2] [--fail-ratio 0] [--retry JSON]
    python bench/bench.py --part startup [--tasks 100000] [--distinct 0]
    python bench/bench.py --part http    [--clients 8] [--http-seconds 10]
    python bench/bench.py --part all     [--set SECTION.OPTION=VALUE ...] [--profile FILE]

fires    N entries (--per-task of them per task) with cron_time --cron (UTC; default every
         second) POSTing to a receiver in its own process: one thread, HTTP/1.1 keep-alive,
         each request stamped when its head is complete. The fires whose instant falls in a
         window (--warmup s after the puts until --tail s before the stop, of --seconds) are
         counted against the schedule itself (schedule_api.parse_schedule): due (entries x
         instants), delivered, missed, duplicates (by X-Schedule-Fire-Id), lateness (arrival
         - X-Schedule-Time; p50/p99/max), CPU of the service (% of a core, and microseconds
         per delivered fire) and of the receivers. @every is refused: the service counts it
         from each task's put, which the bench does not know.
         --slow-entries K points entries e0..e(K-1) (the first K, filling the first tasks as
         all entries do) at a second receiver that answers each request --slow-delay s after
         it arrived; healthy and slow entries are reported apart. --fail-ratio R makes the
         receivers answer 503 to that share of the tries, and --retry JSON gives the entries
         a retry policy; lateness then counts first tries.
         Target: none missed, none doubled, healthy p99 <= TARGETS["fires_p99_ms"].
startup  T one-entry tasks written straight into the SQLite store (one transaction), then the
         service starts: seconds until GET /health answers with all T; RSS after --settle s.
         The expressions are checked not to fire during the run: no webhook traffic.
http     --clients threads with a keep-alive connection each: POST /get, then POST /put, each
         for --http-seconds: requests/s, latency p50/p99, errors (non-200 or error != 0).

The service's config.ini has [server] log_level = WARNING, then every --set SECTION.OPTION=VALUE
(repeatable; e.g. --set webhook.max_connections=512). --profile FILE gives the service a
cProfile in EVERY thread (python -m cProfile sees only the main one), timed by per-thread CPU;
merged pstats go to FILE (FILE.<part> with --part all). It about doubles the service's CPU: use
a smaller scale. --keep keeps the temporary folder (config, logs, stores). The receiver runs
as `bench.py --_receiver [--fail-ratio R] [--delay S]`, printing its port; GET /dump answers
the JSON list of its records [arrival, X-Schedule-Time, X-Schedule-Fire-Id, attempt, status].
Prints a summary with pass/fail against the targets, then one JSON line. Stdlib only (plus
what schedule_api.py imports); 127.0.0.1 only; every loop bounded; subprocesses are stopped on
exit, on errors and on Ctrl-C.
"""

from __future__ import annotations

import argparse
import configparser
import heapq
import http.client
import itertools
import json
import math
import os
import random
import re
import resource
import select
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from datetime import UTC, datetime, timedelta

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROCS: list[subprocess.Popen] = []
DEAD_URL = "http://127.0.0.1:9/"
# Fire a few times a year at most; checked against the clock before use.
STARTUP_MIX = ["0 0 0 1 1 *", "@yearly", "0 30 4 29 2 *", "0 0 12 25 12 *",
               "0 15 3 1 1,7 *", "0 0 0 1 */6 *", "0 45 23 31 12 *", "0 0 6 2 Jan-Mar *"]
TARGETS = {"fires_p99_ms": 100.0, "startup_rss_mb": 150.0, "startup_s": 10.0, "get_rps": 2000.0}


# Processes and small helpers ################################################################

def _die_with_parent() -> None:
    try:  # Linux: the child gets SIGTERM when the bench dies, even by SIGKILL
        import ctypes
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def spawn(cmd: list[str], log_path: str, stdout=None) -> subprocess.Popen:
    with open(log_path, "ab") as log_file:  # own session: a terminal's Ctrl-C reaches only us
        proc = subprocess.Popen(cmd, stdout=stdout or log_file, stderr=log_file, cwd=REPO,
                                start_new_session=True, preexec_fn=_die_with_parent)
    PROCS.append(proc)
    return proc


def stop(proc: subprocess.Popen, timeout: float = 15.0) -> float:
    """SIGTERM, wait up to ``timeout``, then SIGKILL; return the seconds it took."""
    started = time.monotonic()
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    if proc in PROCS:
        PROCS.remove(proc)
    return time.monotonic() - started


def cpu_seconds(pid: int) -> float:
    """user + system CPU seconds of a process, from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_status(pid: int, name: str) -> int:
    """A number from /proc/<pid>/status (VmRSS and VmHWM in kB, Threads a count)."""
    with open(f"/proc/{pid}/status") as handle:
        return int(re.search(rf"^{name}:\s*(\d+)", handle.read(), re.MULTILINE).group(1))


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)] if ordered else float("nan")


def call(conn: http.client.HTTPConnection, method: str, path: str, obj=None) -> tuple[int, dict]:
    body = None if obj is None else json.dumps(obj)
    conn.request(method, path, body, {"Content-Type": "application/json"})
    reply = conn.getresponse()
    return reply.status, json.loads(reply.read() or b"{}")


def get_health(port: int, timeout: float = 10.0) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    status, reply = call(conn, "GET", "/health")
    conn.close()
    if status != 200 or reply.get("error") != 0:
        raise ValueError(f"/health answered {status} {reply}")
    return reply["data"]


def raise_nofile() -> None:
    """Soft RLIMIT_NOFILE up to the hard limit: thousands of keep-alive connections need a
    descriptor each, in the receiver and in the service (which inherits the bench's)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for limit in (hard, 1 << 20, 1 << 16):  # an unlimited hard limit is refused as a soft one
        if soft < limit:
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
                return
            except (ValueError, OSError):
                continue


def import_service():
    """schedule_api from this checkout (the bench computes schedules and writes stores with it)."""
    if REPO not in sys.path:
        sys.path.insert(0, REPO)
    import schedule_api
    return schedule_api


def config_setting(text: str) -> tuple[str, str, str]:
    """Parse --set SECTION.OPTION=VALUE."""
    name, equals, value = text.partition("=")
    section, dot, option = name.strip().partition(".")
    if not (equals and dot and section and option.strip()):
        raise argparse.ArgumentTypeError(f"expected SECTION.OPTION=VALUE, not {text!r}")
    return section, option.strip(), value.strip()


def write_config(opts, path: str) -> None:
    """[server] log_level = WARNING (the log then holds only the problems service_log()
    reports), then every --set, which may override it."""
    config = configparser.ConfigParser(interpolation=None)
    config.read_dict({"server": {"log_level": "WARNING"}})
    for section, option, value in opts.set or ():
        if not config.has_section(section):
            config.add_section(section)
        config.set(section, option, value)
    with open(path, "w") as handle:
        config.write(handle)


def start_service(opts, tmp: str, timeout: float = 120.0):
    """Start the service on tmp/data; return (process, port, seconds until /health answered)."""
    ini = os.path.join(tmp, "config.ini")
    write_config(opts, ini)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    args = ["--config", ini, "--data", os.path.join(tmp, "data"), "--host", "127.0.0.1",
            "--port", str(port)]
    cmd = ([sys.executable, os.path.abspath(__file__), "--_profiled", opts.profile, "--", *args]
           if opts.profile else [sys.executable, os.path.join(REPO, "schedule_api.py"), *args])
    started = time.monotonic()
    proc = spawn(cmd, os.path.join(tmp, "service.log"))
    while time.monotonic() - started < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"service exited with {proc.returncode}")
        try:  # /health answers at once; "ready" once the stored tasks are loaded
            if get_health(port, timeout=5).get("ready", True):
                return proc, port, time.monotonic() - started
        except (OSError, http.client.HTTPException, ValueError):
            time.sleep(0.05)
    raise RuntimeError(f"service did not answer /health within {timeout} s")


def service_log(tmp: str, lines: int = 30) -> tuple[int, str]:
    """Count the warnings and errors in the service log; return it from the first on."""
    path = os.path.join(tmp, "service.log")
    with open(path if os.path.exists(path) else os.devnull, errors="replace") as handle:
        text = handle.read().splitlines()
    bad = [i for i, line in enumerate(text)
           if any(word in line for word in (" WARNING ", " ERROR ", "Traceback"))]
    excerpt = text[bad[0]:bad[0] + lines] if bad else []
    return len(bad), "".join(f"  service log: {line}\n" for line in excerpt)


# The receiver and the profiled service (subprocesses running this script) ###################

HEAD_LIMIT = 64 << 10  # a longer request head is refused (431); a webhook's is ~500 bytes
BODY_LIMIT = 16 << 20  # a longer body is refused (400, like any body it cannot frame)


class Peer:
    """One connection to the receiver: bytes in and out, and where its current request is."""

    __slots__ = ("sock", "inbuf", "outbuf", "head_at", "continued", "busy", "closing",
                 "closed", "events")

    def __init__(self, sock: socket.socket):
        self.sock, self.inbuf, self.outbuf = sock, bytearray(), bytearray()
        self.head_at: float | None = None  # time.time() when the current head was complete
        self.continued = False  # "100 Continue" sent for the current request
        self.busy = False  # a delayed answer is pending: the next request waits for it
        self.closing = False  # close once outbuf is sent; read nothing more
        self.closed = False
        self.events = 0  # what the selector watches this socket for (0: not registered)


def parse_head(head: bytes) -> tuple[bytes, bytes, bytes, dict]:
    """(method, target, version, {lower-case name: value}) of a request head without CRLFCRLF."""
    lines = head.split(b"\r\n")
    method, _, rest = lines[0].partition(b" ")
    target, _, version = rest.partition(b" ")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    return method, target, version.strip(), headers


def chunked_end(buf: bytearray, pos: int) -> int | None:
    """Walk a chunked body starting at ``pos``: the index after its trailers, None while
    incomplete; ValueError when it is malformed or over BODY_LIMIT."""
    start = pos
    for _ in range(BODY_LIMIT):  # one chunk a turn, each of at least one byte but the last
        eol = buf.find(b"\r\n", pos)
        if eol < 0:
            if len(buf) - pos > 1024:
                raise ValueError("chunk size line too long")
            return None
        size = int(bytes(buf[pos:eol]).partition(b";")[0], 16)  # ValueError on garbage
        if size < 0 or eol - start + size > BODY_LIMIT:
            raise ValueError("bad chunk size")
        if size == 0:  # the last chunk: trailer fields (usually none), then an empty line
            if buf[eol + 2:eol + 4] == b"\r\n":
                return eol + 4
            end = buf.find(b"\r\n\r\n", eol + 2)
            return None if end < 0 else end + 4
        pos = eol + 2 + size + 2
        if len(buf) < pos:
            return None
        if buf[pos - 2:pos] != b"\r\n":
            raise ValueError("chunk not followed by CRLF")
    raise ValueError("too many chunks")


def body_end(buf: bytearray, start: int, headers: dict) -> int | None:
    """The index after the body that starts at ``start`` (Content-Length or chunked), None
    while incomplete; ValueError when it cannot be framed."""
    coding = headers.get(b"transfer-encoding")
    if coding is not None:
        if coding.lower() != b"chunked":  # gzip etc. are never sent by the service
            raise ValueError(f"unsupported transfer-encoding {coding!r}")
        return chunked_end(buf, start)
    length = headers.get(b"content-length", b"0")
    if not length.isdigit() or int(length) > BODY_LIMIT:
        raise ValueError(f"bad content-length {length!r}")
    end = start + int(length)
    return end if len(buf) >= end else None


def keeps_alive(version: bytes, headers: dict) -> bool:
    """HTTP/1.1 keeps the connection unless the client says close; HTTP/1.0 only on request."""
    tokens = {t.strip() for t in headers.get(b"connection", b"").lower().split(b",")}
    return b"close" not in tokens and (version == b"HTTP/1.1" or b"keep-alive" in tokens)


class Receiver:
    """One thread, non-blocking sockets, HTTP/1.1 keep-alive: stamp each request when its head
    is complete, record it, answer 200 (at once, or ``delay`` s after it arrived, from a heap
    of due answers that sets the select timeout) and keep the connection for the next one.
    With ``fail_ratio``, that share of the tries (chosen by a hash of fire id and attempt
    number, so the same on every run) is answered 503 instead. GET /dump answers the records
    at once, whatever the delay.
    A ThreadingHTTPServer here used ~36% of a core at 1,000 fires/s (one connection per fire,
    answered and closed: ~8%); its accepts wait for the GIL, and in one run each it added
    ~70 ms to p50 and ~150 ms to p99 lateness."""

    def __init__(self, fail_ratio: float, delay: float, limit: int):
        self.fail_ratio, self.delay, self.limit = fail_ratio, delay, limit
        self.sel = selectors.DefaultSelector()
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=4096)  # fire bursts
        self.listener.setblocking(False)
        self.sel.register(self.listener, selectors.EVENT_READ)
        self.records: list = []  # [arrival, X-Schedule-Time, fire id, attempt, status]
        self.due: list = []  # heap of (time.time() due, sequence, peer, status, keep-alive)
        self.sequence = itertools.count()  # ties in the heap never compare peers

    def run(self, lifetime: float) -> None:
        deadline = time.monotonic() + lifetime
        while time.monotonic() < deadline:
            wait = min(1.0, max(0.0, self.due[0][0] - time.time())) if self.due else 1.0
            for key, events in self.sel.select(wait):
                if key.fileobj is self.listener:
                    self.accept()
                    continue
                if events & selectors.EVENT_WRITE:
                    self.flush(key.data)
                if events & selectors.EVENT_READ and not key.data.closed:
                    self.read(key.data)
            self.release()

    def accept(self) -> None:
        for _ in range(256):  # then serve the others: a burst of connects is accepted in turns
            try:
                sock = self.listener.accept()[0]
            except OSError:  # BlockingIOError when none is left; EMFILE at the descriptor limit
                return
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # answers are small
            peer = Peer(sock)
            self.watch(peer)

    def read(self, peer: Peer) -> None:
        try:
            data = peer.sock.recv(262144)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:  # the client closed (an answer still due to it is dropped)
            self.close(peer)
            return
        peer.inbuf += data
        self.serve(peer)

    def serve(self, peer: Peer) -> None:
        """Handle every complete request in the buffer, in order (pipelined ones too), until
        one's answer is delayed or the connection is to close."""
        while not (peer.busy or peer.closing):
            head_end = peer.inbuf.find(b"\r\n\r\n")
            if head_end < 0:
                if len(peer.inbuf) > HEAD_LIMIT:
                    self.send(peer, b"431 Request Header Fields Too Large", keep=False)
                break
            if peer.head_at is None:
                peer.head_at = time.time()
            method, target, version, headers = parse_head(bytes(peer.inbuf[:head_end]))
            try:
                end = body_end(peer.inbuf, head_end + 4, headers)
            except ValueError:
                self.send(peer, b"400 Bad Request", keep=False)
                break
            if end is None:
                if not peer.continued and headers.get(b"expect", b"").lower() == b"100-continue":
                    peer.continued = True
                    peer.outbuf += b"HTTP/1.1 100 Continue\r\n\r\n"
                    self.flush(peer)
                break
            del peer.inbuf[:end]
            arrival, peer.head_at, peer.continued = peer.head_at, None, False
            self.answer(peer, arrival, method, target, keeps_alive(version, headers), headers)
        self.watch(peer)

    def answer(self, peer: Peer, arrival: float, method: bytes, target: bytes, keep: bool,
               headers: dict) -> None:
        if method == b"GET":
            if target.split(b"?")[0] != b"/dump":
                self.send(peer, b"404 Not Found", keep=keep)
                return
            body = json.dumps(self.records).encode()
            self.send(peer, b"200 OK", keep=keep, body=body, kind=b"application/json")
            return
        status = self.record(arrival, headers)
        if self.delay > 0:  # HTTP/1.1 answers in order: the connection waits for this one
            peer.busy = True
            heapq.heappush(self.due, (arrival + self.delay, next(self.sequence), peer, status,
                                      keep))
        else:
            self.send(peer, status, keep=keep)

    def record(self, arrival: float, headers: dict) -> bytes:
        """Keep a webhook's record; return the status to answer it with."""
        when, fid, attempt = (headers.get(name) for name in (
            b"x-schedule-time", b"x-schedule-fire-id", b"x-schedule-attempt"))
        when, fid, attempt = (v.decode("latin-1") if v is not None else None
                              for v in (when, fid, attempt))
        status = b"200 OK"
        if self.fail_ratio and zlib.crc32(f"{fid}/{attempt}".encode()) % 1000 < \
                self.fail_ratio * 1000:
            status = b"503 Service Unavailable"
        if len(self.records) < self.limit:
            self.records.append([arrival, when, fid, int(attempt or 1), status[:3].decode()])
        return status

    def release(self) -> None:
        """Send the delayed answers that are due, then read on behind each of them."""
        now = time.time()
        while self.due and self.due[0][0] <= now:
            _, _, peer, status, keep = heapq.heappop(self.due)
            if not peer.closed:
                peer.busy = False
                self.send(peer, status, keep=keep)
                self.serve(peer)

    def send(self, peer: Peer, status: bytes, keep: bool, body: bytes = b"",
             kind: bytes = b"") -> None:
        head = b"HTTP/1.1 %s\r\nContent-Length: %d\r\n" % (status, len(body))
        if kind:
            head += b"Content-Type: %s\r\n" % kind
        if not keep:
            head += b"Connection: close\r\n"
            peer.closing = True
        peer.outbuf += head + b"\r\n"
        peer.outbuf += body
        self.flush(peer)

    def flush(self, peer: Peer) -> None:
        """Write what the socket takes now; the rest waits for EVENT_WRITE."""
        while peer.outbuf and not peer.closed:
            try:
                sent = peer.sock.send(peer.outbuf)
            except BlockingIOError:
                break
            except OSError:
                self.close(peer)
                return
            del peer.outbuf[:sent]  # cheap at the front of a bytearray (a /dump is large)
        if peer.closing and not peer.outbuf:
            self.close(peer)
        elif not peer.closed:
            self.watch(peer)

    def watch(self, peer: Peer) -> None:
        """Select on reading unless an answer is pending or the end is near; on writing while
        outbuf holds bytes."""
        events = 0 if peer.busy or peer.closing else selectors.EVENT_READ
        events |= selectors.EVENT_WRITE if peer.outbuf else 0
        if events == peer.events or peer.closed:
            return
        if not peer.events:
            self.sel.register(peer.sock, events, peer)
        elif not events:
            self.sel.unregister(peer.sock)
        else:
            self.sel.modify(peer.sock, events, peer)
        peer.events = events

    def close(self, peer: Peer) -> None:
        if peer.events:
            self.sel.unregister(peer.sock)
        peer.sock.close()
        peer.closed = peer.closing = True
        peer.events = 0


def receiver_main(argv: list[str]) -> None:
    """``bench.py --_receiver [--fail-ratio R] [--delay S]``: print the port, serve until
    stopped (at most --lifetime s)."""
    parser = argparse.ArgumentParser(prog="bench.py --_receiver")
    parser.add_argument("--fail-ratio", type=float, default=0.0)
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--limit", type=int, default=5_000_000, help="records kept at most")
    parser.add_argument("--lifetime", type=float, default=6 * 3600)
    args = parser.parse_args(argv)
    raise_nofile()
    receiver = Receiver(args.fail_ratio, args.delay, args.limit)
    print(receiver.listener.getsockname()[1], flush=True)
    receiver.run(args.lifetime)


def serve_profiled(out: str, args: list[str]) -> int:
    """Run schedule_api.main(args) with a per-thread-CPU cProfile in every thread."""
    import cProfile
    import pstats
    sys.path.insert(0, REPO)
    import schedule_api
    profiles = [cProfile.Profile(time.thread_time)]

    def hook(frame, event, arg):  # the first event of each new thread starts its profile
        profiles.append(cProfile.Profile(time.thread_time))
        profiles[-1].enable()

    threading.setprofile(hook)
    profiles[0].enable()
    try:
        return schedule_api.main(args)
    finally:
        profiles[0].disable()
        threading.setprofile(None)
        pstats.Stats(*profiles).dump_stats(out)


# Part 1: fires ##############################################################################

def start_receiver(tmp: str, name: str, fail_ratio: float, delay: float = 0.0):
    """Start a receiver subprocess; return (process, port)."""
    proc = spawn([sys.executable, os.path.abspath(__file__), "--_receiver", "--fail-ratio",
                  repr(fail_ratio), "--delay", repr(delay)],
                 os.path.join(tmp, f"{name}.log"), stdout=subprocess.PIPE)
    line = proc.stdout.readline() if select.select([proc.stdout], [], [], 10)[0] else b""
    if not line.strip().isdigit():
        raise RuntimeError(f"the {name} did not start (see {name}.log)")
    return proc, int(line)


def fire_instants(cron: str, win_start: float, win_end: float) -> list[float]:
    """The instants in [win_start, win_end) at which a UTC entry with this cron_time fires,
    from the service's own parser (a sparse schedule has few; "* * * * * *" one a second)."""
    schedule_api = import_service()
    if cron.strip().startswith("@every"):
        raise ValueError("@every is counted from each task's put: not supported here")
    schedule = schedule_api.parse_schedule(cron, schedule_api.load_zone("UTC"))
    instants, t = [], schedule.next_after(win_start - 0.001)
    for _ in range(int(win_end - win_start) + 2):  # cron fires at most once a second
        if t >= win_end:
            break
        if t >= win_start:  # (next_after(win_start - 0.001) may be just before it)
            instants.append(t)
        t = schedule.next_after(t)
    return instants


def put_entries(opts, urls: list[str], port: int) -> float:
    """Put the entries, --per-task to a task, over one keep-alive connection (10,000 entries
    are 100 requests); return the seconds it took."""
    retry = json.loads(opts.retry) if opts.retry else None
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    started = time.monotonic()
    for first in range(0, opts.entries, opts.per_task):
        entries = {}
        for k in range(first, min(first + opts.per_task, opts.entries)):
            entries[f"e{k}"] = {"cron_time": opts.cron, "url": urls[k]}
            if retry:
                entries[f"e{k}"]["retry"] = retry
        status, reply = call(conn, "POST", "/put", {
            "identity": f"fires-{first // opts.per_task}", "time_zone": "UTC", "start": True,
            "entries": entries})
        if status != 200 or reply.get("error") != 0:
            raise RuntimeError(f"/put failed: {status} {reply}")
    conn.close()
    return time.monotonic() - started


def tally(records: list, entries: int, instants: list[float], win_start: float,
          win_end: float) -> dict:
    """Count one receiver's records for ``entries`` entries: the fires of the window's
    ``instants`` are due; a first try is a delivery; lateness is arrival - instant."""
    expected = {round(t, 3) for t in instants}
    parsed: dict[str, float] = {}
    late_by_id: dict[str, float] = {}  # fire id -> lateness (ms) of its first try
    tries_seen: set = set()  # (fire id, attempt)
    duplicates = outside = off_schedule = stray = retries = failed = 0
    latest_try = 0.0  # seconds from a fire's instant to its last try's arrival
    for arrival, sched_text, fid, attempt, status in records:
        if sched_text is None:  # not a webhook of the service (no X-Schedule-Time)
            stray += 1
            continue
        if sched_text not in parsed:
            parsed[sched_text] = datetime.fromisoformat(sched_text).timestamp()
        instant = parsed[sched_text]
        if not win_start <= instant < win_end:
            outside += 1
            continue
        if round(instant, 3) not in expected:  # the service fired when the cron says not to
            off_schedule += 1
            continue
        failed += status != "200"
        latest_try = max(latest_try, arrival - instant)
        if (fid, attempt) in tries_seen:
            duplicates += 1
        elif attempt > 1:
            retries += 1
        else:
            late_by_id[fid] = (arrival - instant) * 1000
        tries_seen.add((fid, attempt))
    late, due = list(late_by_id.values()), entries * len(instants)
    return {"entries": entries, "due": due, "delivered": len(late), "missed": due - len(late),
            "duplicates": duplicates, "received": len(records), "outside_window": outside,
            "off_schedule": off_schedule, "stray": stray,
            "late_p50_ms": round(pct(late, 50), 1), "late_p99_ms": round(pct(late, 99), 1),
            "late_max_ms": round(max(late or [-1]), 1),
            "late_over_1s": sum(v > 1000 for v in late), "answered_503": failed,
            "retries": retries, "latest_try_s": round(latest_try, 2)}


def dump(port: int) -> list:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    status, records = call(conn, "GET", "/dump")
    conn.close()
    if status != 200:
        raise RuntimeError(f"the receiver's /dump answered {status}")
    return records


def part_fires(opts, tmp: str) -> dict:
    recv, recv_port = start_receiver(tmp, "receiver", opts.fail_ratio)
    slow, slow_port = (start_receiver(tmp, "slow-receiver", opts.fail_ratio, opts.slow_delay)
                       if opts.slow_entries else (None, None))
    urls = [f"http://127.0.0.1:{slow_port}/slow" if k < opts.slow_entries else
            f"http://127.0.0.1:{recv_port}/hook" for k in range(opts.entries)]
    svc, port, _ = start_service(opts, tmp)
    put_seconds, t0 = put_entries(opts, urls, port), time.time()
    # Exactly seconds - warmup - tail long (not rounded to whole seconds): any 180 s window
    # holds three minute marks, and every-second fires are counted by instant either way.
    win_start, win_end = t0 + opts.warmup, t0 + opts.seconds - opts.tail
    instants = fire_instants(opts.cron, win_start, win_end)
    if not instants:
        print(f"warning: {opts.cron!r} does not fire in the {win_end - win_start:.1f} s window",
              file=sys.stderr, flush=True)
    receivers = [p for p in (recv, slow) if p]
    cpu = []  # (service, receivers..., monotonic) at the window's start and end, and the stop
    for until in (win_start, win_end, t0 + opts.seconds):
        time.sleep(max(0.0, until - time.time()))
        cpu.append((cpu_seconds(svc.pid), *(cpu_seconds(p.pid) for p in receivers),
                    time.monotonic()))
    backlog = get_health(port)["log_backlog"]
    records = dump(recv_port)
    slow_records = dump(slow_port) if slow else []
    stop(svc)
    for proc in receivers:
        stop(proc)
    healthy = tally(records, opts.entries - opts.slow_entries, instants, win_start, win_end)
    slowed = tally(slow_records, opts.slow_entries, instants, win_start, win_end)
    wall, groups = cpu[1][-1] - cpu[0][-1], (healthy, slowed)
    used = [cpu[1][i] - cpu[0][i] for i in range(len(receivers) + 1)]
    delivered = healthy["delivered"] + slowed["delivered"]
    result = {"entries": opts.entries, "per_task": opts.per_task, "cron": opts.cron,
              "instants": len(instants), "window_s": round(win_end - win_start, 1),
              "put_s": round(put_seconds, 2),
              **{k: sum(g[k] for g in groups) for k in ("due", "delivered", "missed",
                                                       "duplicates", "answered_503",
                                                       "retries")},
              "healthy": healthy, "slow": slowed if opts.slow_entries else None,
              "slow_delay_s": opts.slow_delay if opts.slow_entries else None,
              "service_cpu_pct": round(100 * used[0] / wall, 1),
              "service_cpu_us_per_fire": round(1e6 * used[0] / delivered) if delivered else None,
              "receiver_cpu_pct": round(100 * used[1] / wall, 1),
              "slow_receiver_cpu_pct": round(100 * used[2] / wall, 1) if slow else None,
              "log_backlog_at_end": backlog, "fail_ratio": opts.fail_ratio,
              "latest_try_s": max(g["latest_try_s"] for g in groups),
              "settings": [f"{s}.{o}={v}" for s, o, v in opts.set or ()]}
    limit = TARGETS["fires_p99_ms"]
    return {**result, "target": f"none missed, none doubled, healthy p99 <= {limit:g} ms",
            "pass": bool(instants) and result["missed"] == 0 and result["duplicates"] == 0
            and healthy["late_p99_ms"] <= limit,
            "full_scale": opts.entries >= 1000}


# Part 2: startup ############################################################################

def startup_expressions(opts, schedule_api) -> list[str]:
    now = time.time()
    if not opts.distinct:  # the fixed mix, minus any that would fire during the run
        utc, horizon = schedule_api.load_zone("UTC"), now + opts.start_timeout + opts.settle + 600
        return [e for e in STARTUP_MIX
                if schedule_api.parse_schedule(e, utc).next_after(now) > horizon]
    # K distinct yearly expressions, on dates other than today and tomorrow (UTC).
    skip = {(d.month, d.day) for d in (datetime.now(UTC) + timedelta(days=n)
                                       for n in (0, 1))}
    rng, found = random.Random(1), set()
    for _ in range(20 * opts.distinct):
        if len(found) == opts.distinct:
            break
        month, day = rng.randint(1, 12), rng.randint(1, 28)
        if (month, day) not in skip:
            found.add(f"{rng.randint(0, 59)} {rng.randint(0, 59)} {rng.randint(0, 23)} "
                      f"{day} {month} *")
    return sorted(found)


def part_startup(opts, tmp: str) -> dict:
    schedule_api = import_service()
    expressions = startup_expressions(opts, schedule_api)
    store = schedule_api.SQLiteStore(os.path.join(tmp, "data"))
    write_started, now, rows = time.monotonic(), time.time(), []
    for i in range(opts.tasks):
        entry = schedule_api.Entry(expressions[i % len(expressions)], DEAD_URL, anchor=now)
        doc = schedule_api.Task(f"task-{i:06d}", "UTC", True, {"e": entry}).document()
        rows.append((doc["identity"], json.dumps({k: v for k, v in doc.items() if k != "last"})))
    # Exactly what save_task() writes, in one transaction instead of one (and an fsync) each.
    store._writing(lambda db: db.executemany(
        "INSERT OR REPLACE INTO tasks (identity, doc) VALUES (?, ?)", rows))
    store.close()
    write_seconds = time.monotonic() - write_started
    svc, port, ready = start_service(opts, tmp, opts.start_timeout)
    loaded, cpu_ready = get_health(port)["tasks"], cpu_seconds(svc.pid)
    time.sleep(opts.settle)
    health_ms = []  # GET /health once loaded (a load balancer's probe), new connection each
    for _ in range(20):
        started = time.perf_counter()
        get_health(port)
        health_ms.append((time.perf_counter() - started) * 1000)
    rss, peak = proc_status(svc.pid, "VmRSS") / 1024, proc_status(svc.pid, "VmHWM") / 1024
    result = {"tasks": opts.tasks, "tasks_loaded": loaded, "distinct": len(expressions),
              "store_write_s": round(write_seconds, 2), "start_s": round(ready, 2),
              "start_cpu_s": round(cpu_ready, 2), "rss_mb": round(rss, 1),
              "peak_rss_mb": round(peak, 1), "threads": proc_status(svc.pid, "Threads"),
              "health_p50_ms": round(pct(health_ms, 50), 2),
              "health_max_ms": round(max(health_ms), 2), "stop_s": round(stop(svc), 2)}
    return {**result, "target": f"100,000 tasks: <= {TARGETS['startup_rss_mb']:g} MB RSS, <= "
                                f"{TARGETS['startup_s']:g} s to answer /health",
            "pass": loaded == opts.tasks and rss <= TARGETS["startup_rss_mb"]
            and ready <= TARGETS["startup_s"], "full_scale": opts.tasks >= 100_000}


# Part 3: http ###############################################################################

def hammer(port: int, clients: int, seconds: float, make_request) -> dict:
    """``clients`` threads send make_request(client, n) -> (path, obj) for ``seconds``."""
    results: list = [([], 0)] * clients
    deadline = time.monotonic() + seconds

    def run(client: int) -> None:
        latencies, errors = [], 0
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        for n in range(2_000_000):
            if time.monotonic() >= deadline:
                break
            path, obj = make_request(client, n)
            started = time.perf_counter()
            try:
                status, reply = call(conn, "POST", path, obj)
                errors += status != 200 or reply.get("error") != 0
            except (OSError, http.client.HTTPException, ValueError):
                errors += 1
                conn.close()  # http.client reconnects on the next request
            latencies.append((time.perf_counter() - started) * 1000)
        conn.close()
        results[client] = (latencies, errors)

    wall0, cpu0 = time.monotonic(), time.process_time()
    threads = [threading.Thread(target=run, args=(c,), daemon=True) for c in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(seconds + 30)
    wall, cpu = time.monotonic() - wall0, time.process_time() - cpu0
    latencies = [v for lat, _ in results for v in lat]
    return {"requests": len(latencies), "rps": round(len(latencies) / wall, 1),
            "p50_ms": round(pct(latencies, 50), 2), "p99_ms": round(pct(latencies, 99), 2),
            "errors": sum(err for _, err in results), "client_cpu_pct": round(100 * cpu / wall, 1)}


def part_http(opts, tmp: str) -> dict:
    svc, port, _ = start_service(opts, tmp)

    def task(identity: str) -> dict:  # paused: never fires
        return {"identity": identity, "time_zone": "UTC", "start": False,
                "entries": {"e": {"cron_time": "0 0 0 1 1 *", "url": DEAD_URL}}}

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    for i in range(100):
        if call(conn, "POST", "/put", task(f"get-{i}"))[1].get("error") != 0:
            raise RuntimeError("/put of the tasks to get failed")
    conn.close()
    result: dict = {"clients": opts.clients, "seconds": opts.http_seconds}
    for name, make in (("get", lambda c, n: ("/get", {"identity": f"get-{(c * 13 + n) % 100}"})),
                       ("put", lambda c, n: ("/put", task(f"put-{c}-{n % 20}")))):
        cpu0, wall0 = cpu_seconds(svc.pid), time.monotonic()
        result[name] = hammer(port, opts.clients, opts.http_seconds, make)
        result[name]["service_cpu_pct"] = round(
            100 * (cpu_seconds(svc.pid) - cpu0) / (time.monotonic() - wall0), 1)
    stop(svc)
    get = result["get"]
    return {**result, "target": f"/get >= {TARGETS['get_rps']:g} req/s, no errors",
            "pass": get["rps"] >= TARGETS["get_rps"] and get["errors"] == 0, "full_scale": True}


# Main #######################################################################################

def report_fires(r: dict) -> str:
    lines = [f"fires: {r['entries']} entries \"{r['cron']}\" ({r['per_task']} a task); "
             f"{r['instants']} instants in the {r['window_s']} s window; puts took {r['put_s']} s",
             f"  due {r['due']}  delivered {r['delivered']}  missed {r['missed']}  "
             f"duplicates {r['duplicates']}"]
    for name, group, how in (("healthy", r["healthy"], ""),
                             ("slow", r["slow"], f", answered after {r['slow_delay_s']} s")):
        if group:
            lines.append(
                f"  {name} ({group['entries']} entries{how}): "
                f"due {group['due']}  delivered {group['delivered']}  missed {group['missed']}  "
                f"duplicates {group['duplicates']}\n    lateness ms: p50 {group['late_p50_ms']}  "
                f"p99 {group['late_p99_ms']}  max {group['late_max_ms']}  (over 1 s: "
                f"{group['late_over_1s']}); received {group['received']}, "
                f"{group['outside_window']} outside the window, {group['off_schedule']} off "
                f"schedule, {group['stray']} not webhooks")
    slow_cpu = r["slow_receiver_cpu_pct"]
    lines += [f"  CPU % of one core: service {r['service_cpu_pct']} "
              f"({r['service_cpu_us_per_fire']} us per fire)  receiver {r['receiver_cpu_pct']}"
              f"{'' if slow_cpu is None else f'  slow receiver {slow_cpu}'}; log backlog at "
              f"the end {r['log_backlog_at_end']}",
              f"  tries answered 503 {r['answered_503']} (fail ratio {r['fail_ratio']}), "
              f"retries {r['retries']}; latest try {r['latest_try_s']} s after its fire's "
              f"instant"]
    if r["settings"]:
        lines.append(f"  service settings: {' '.join(r['settings'])}")
    return "\n".join(lines)


REPORT = {  # a format string over the part's result, or a function of it
    "fires": report_fires,
    "startup": "startup: {tasks} tasks, {distinct} distinct cron expressions; store written "
               "in {store_write_s} s\n  /health answered after {start_s} s with {tasks_loaded} "
               "tasks (CPU {start_cpu_s} s); RSS {rss_mb} MB (peak {peak_rss_mb} MB), "
               "{threads} threads\n  GET /health then: p50 {health_p50_ms} ms, max "
               "{health_max_ms} ms; stop took {stop_s} s",
    "http": "http: {clients} keep-alive clients, {seconds} s per endpoint\n" + "\n".join(
        f"  /{n}: {{{n}[rps]}} req/s  p50 {{{n}[p50_ms]}} ms  p99 {{{n}[p99_ms]}} ms  errors "
        f"{{{n}[errors]}}  (CPU %: service {{{n}[service_cpu_pct]}}, client "
        f"{{{n}[client_cpu_pct]}})" for n in ("get", "put")),
}


def main() -> int:
    if sys.argv[1:2] == ["--_receiver"]:
        receiver_main(sys.argv[2:])
        return 0
    if sys.argv[1:2] == ["--_profiled"]:
        return serve_profiled(sys.argv[2], sys.argv[4:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--part", choices=("fires", "startup", "http", "all"), default="all")
    add("--entries", type=int, default=1000, help="fires: entries (default 1000)")
    add("--per-task", type=int, default=10, help="fires: entries per task (default 10)")
    add("--cron", default="* * * * * *", help='fires: the entries\' cron_time, in UTC '
        '(default "* * * * * *")')
    add("--fail-ratio", type=float, default=0.0, help="fires: share of tries the receivers "
        "answer 503 (default 0)")
    add("--slow-entries", type=int, default=0, help="fires: entries sent to a receiver that "
        "answers late (default 0)")
    add("--slow-delay", type=float, default=2.0, help="fires: seconds that receiver waits "
        "before each answer (default 2)")
    add("--retry", help='fires: the entries\' retry, JSON, e.g. \'{"attempts": 3}\'')
    add("--seconds", type=float, default=60, help="fires: run time after the puts (default 60)")
    add("--warmup", type=float, default=5, help="fires: seconds not counted at the start")
    add("--tail", type=float, default=5, help="fires: seconds not counted at the end")
    add("--tasks", type=int, default=100_000, help="startup: stored tasks (default 100000)")
    add("--distinct", type=int, default=0, help="startup: K distinct yearly expressions "
        "instead of the fixed mix of 8 (default 0)")
    add("--settle", type=float, default=5, help="startup: seconds before reading RSS")
    add("--start-timeout", type=float, default=300, help="startup: give up after (s)")
    add("--clients", type=int, default=8, help="http: client threads (default 8)")
    add("--http-seconds", type=float, default=10, help="http: seconds per endpoint")
    add("--set", action="append", type=config_setting, metavar="SECTION.OPTION=VALUE",
        help="write this option into the service's config.ini (repeatable), e.g. "
        "--set webhook.max_connections=512")
    add("--profile", help="write the service's all-thread cProfile (pstats) here")
    add("--keep", action="store_true", help="keep the temporary folder (logs, stores)")
    opts = parser.parse_args()
    if min(opts.entries, opts.per_task, opts.clients) < 1 or opts.tasks < 0 or \
            not 0 <= opts.distinct <= 1_000_000 or opts.seconds < opts.warmup + opts.tail + 1 \
            or not 0 <= opts.slow_entries < opts.entries or opts.slow_delay < 0 \
            or not 0 <= opts.fail_ratio <= 1:
        parser.error("need entries, per-task, clients >= 1; distinct <= 1e6; seconds > warmup "
                     "+ tail; 0 <= slow-entries < entries; slow-delay >= 0; fail-ratio 0..1")
    if opts.part in ("fires", "all"):
        try:  # a wrong --cron fails before anything starts
            fire_instants(opts.cron, time.time(), time.time() + 1)
        except ValueError as exc:
            parser.error(f"--cron {opts.cron!r}: {exc}")
    raise_nofile()
    profile = opts.profile and os.path.abspath(opts.profile)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that `finally` runs
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with SIGINT ignored
    parts = ("fires", "startup", "http") if opts.part == "all" else (opts.part,)
    results: dict = {}
    tmp = tempfile.mkdtemp(prefix="schedule-bench-")
    try:
        for part in parts:
            print(f"running {part} ...", file=sys.stderr, flush=True)
            part_tmp = os.path.join(tmp, part)
            os.makedirs(part_tmp)
            opts.profile = profile and (f"{profile}.{part}" if len(parts) > 1 else profile)
            try:
                results[part] = globals()[f"part_{part}"](opts, part_tmp)
            finally:  # the service's first warning or error, also when the part failed
                problems, excerpt = service_log(part_tmp)
                print(excerpt, end="", file=sys.stderr)
            results[part]["service_log_problems"] = problems
    finally:
        for proc in PROCS:
            stop(proc, 5)
        if opts.keep:
            print(f"kept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    for part, result in results.items():
        report = REPORT[part]
        print(report(result) if callable(report) else report.format(**result))
        print(f"  target ({result['target']}): {'PASS' if result['pass'] else 'FAIL'}"
              f"{'' if result['full_scale'] else ' (below the target scale)'}")
    print(json.dumps({"targets": TARGETS, **results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
