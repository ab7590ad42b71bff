#!/usr/bin/env python3
"""Benchmark schedule_api.py, run as a subprocess, against a local webhook receiver.

    python bench/bench.py --part fires   [--entries 1000] [--per-task 10] [--seconds 60]
    python bench/bench.py --part startup [--tasks 100000] [--distinct 0]
    python bench/bench.py --part http    [--clients 8] [--http-seconds 10]
    python bench/bench.py --part all     [--workers N] [--profile /tmp/svc.prof]

fires    N entries firing every second ("* * * * * *", UTC) at a receiver in its own process.
         --fail-ratio R makes the receiver answer 503 to that share of the tries, and
         --retry JSON gives the entries a retry policy; lateness then counts first tries.
         Fires scheduled in a window (--warmup s after the puts until --tail s before the
         stop) count: due, delivered, missed, duplicates (by X-Schedule-Fire-Id), lateness
         (receiver's accept time - X-Schedule-Time), CPU of the service and of the receiver.
startup  T one-entry tasks written straight into the SQLite store (one transaction), then the
         service starts: seconds until GET /health answers with all T; RSS after --settle s.
         The expressions are checked not to fire during the run: no webhook traffic.
http     --clients threads with a keep-alive connection each: POST /get, then POST /put, each
         for --http-seconds: requests/s, latency p50/p99, errors (non-200 or error != 0).

--profile FILE gives the service a cProfile in EVERY thread (python -m cProfile sees only the
main one), timed by per-thread CPU; merged pstats go to FILE (FILE.<part> with --part all). It
about doubles the service's CPU: use a smaller scale. Prints a summary with pass/fail against
the targets, then one JSON line. Stdlib only (plus what schedule_api.py imports); 127.0.0.1
only; every loop bounded; subprocesses are stopped on exit, on errors and on Ctrl-C.
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import os
import random
import re
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
TARGETS = {"fires_p99_ms": 50.0, "startup_rss_mb": 150.0, "startup_s": 10.0, "get_rps": 2000.0}


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


def start_service(opts, tmp: str, timeout: float = 120.0):
    """Start the service on tmp/data; return (process, port, seconds until /health answered)."""
    ini = os.path.join(tmp, "config.ini")
    with open(ini, "w") as handle:
        handle.write("[server]\nlog_level = WARNING\n")
        handle.write(f"[webhook]\nworkers = {opts.workers}\n" if opts.workers else "")
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

def receiver_main(fail_ratio: float = 0.0, limit: int = 5_000_000,
                  lifetime: float = 6 * 3600) -> None:
    """One thread, non-blocking sockets: stamp a connection at accept, answer 200, close.
    With ``fail_ratio``, that share of the tries (chosen by a hash of fire id and attempt
    number, so the same on every run) is answered 503 instead.
    A ThreadingHTTPServer here used ~36% of a core at 1,000 fires/s (this: ~8%); its accepts
    wait for the GIL, and in one run each it added ~70 ms to p50 and ~150 ms to p99 lateness."""
    sel = selectors.DefaultSelector()
    listener = socket.create_server(("127.0.0.1", 0), backlog=1024)
    listener.setblocking(False)
    sel.register(listener, selectors.EVENT_READ)
    print(listener.getsockname()[1], flush=True)
    records: list = []
    pending: dict = {}  # socket -> [accept time, bytes so far]
    deadline = time.monotonic() + lifetime
    while time.monotonic() < deadline:
        for key, _ in sel.select(1.0):
            sock = key.fileobj
            if sock is listener:
                for _ in range(256):
                    try:
                        conn = listener.accept()[0]
                    except BlockingIOError:
                        break
                    conn.setblocking(False)
                    pending[conn] = [time.time(), b""]
                    sel.register(conn, selectors.EVENT_READ)
                continue
            try:
                data = sock.recv(65536)
            except OSError:
                data = b""
            pending[sock][1] += data
            arrival, raw = pending[sock]
            head, done, _ = raw.partition(b"\r\n\r\n")
            if data and not done and len(raw) < 65536:
                continue  # our webhooks have no body: the headers are all we wait for
            sel.unregister(sock)
            del pending[sock]
            body = json.dumps(records).encode() if head.startswith(b"GET") else b""
            status = b"200 OK"
            if done and not body and len(records) < limit:
                found = [re.search(rb"(?im)^%s:\s*(\S+)" % name, head)
                         for name in (b"x-schedule-time", b"x-schedule-fire-id",
                                      b"x-schedule-attempt")]
                when, fid, attempt = (m and m.group(1).decode() for m in found)
                if fail_ratio and zlib.crc32(f"{fid}/{attempt}".encode()) % 1000 < \
                        fail_ratio * 1000:
                    status = b"503 Service Unavailable"
                records.append([arrival, when, fid, int(attempt or 1), status[:3].decode()])
            sock.setblocking(True)
            try:
                sock.sendall(b"HTTP/1.0 %s\r\nContent-Length: %d\r\n\r\n" % (status, len(body))
                             + body)
            except OSError:
                pass
            sock.close()


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

def part_fires(opts, tmp: str) -> dict:
    recv = spawn([sys.executable, os.path.abspath(__file__), "--_receiver",
                  str(opts.fail_ratio)],
                 os.path.join(tmp, "receiver.log"), stdout=subprocess.PIPE)
    if not select.select([recv.stdout], [], [], 10)[0]:
        raise RuntimeError("the receiver did not start")
    recv_port = int(recv.stdout.readline())
    svc, port, _ = start_service(opts, tmp)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    put_started = time.monotonic()
    for first in range(0, opts.entries, opts.per_task):
        entry = {"cron_time": "* * * * * *", "url": f"http://127.0.0.1:{recv_port}/hook"}
        if opts.retry:
            entry["retry"] = json.loads(opts.retry)
        keys = range(first, min(first + opts.per_task, opts.entries))
        status, reply = call(conn, "POST", "/put", {
            "identity": f"fires-{first // opts.per_task}", "time_zone": "UTC", "start": True,
            "entries": {f"e{k}": entry for k in keys}})
        if status != 200 or reply.get("error") != 0:
            raise RuntimeError(f"/put failed: {status} {reply}")
    conn.close()
    put_seconds, t0 = time.monotonic() - put_started, time.time()
    win_start = math.ceil(t0 + opts.warmup)
    win_end = max(win_start + 1, int(t0 + opts.seconds - opts.tail))
    cpu = []  # (service, receiver, monotonic) at the window's start and end, and at the stop
    for until in (win_start, win_end, t0 + opts.seconds):
        time.sleep(max(0.0, until - time.time()))
        cpu.append((cpu_seconds(svc.pid), cpu_seconds(recv.pid), time.monotonic()))
    backlog = get_health(port)["log_backlog"]
    conn = http.client.HTTPConnection("127.0.0.1", recv_port, timeout=60)
    records = call(conn, "GET", "/dump")[1]
    stop(svc)
    stop(recv)
    parsed: dict[str, float] = {}
    late_by_id: dict[str, float] = {}  # fire id -> lateness (ms) of its first try
    tries_seen: set = set()  # (fire id, attempt)
    duplicates = outside = retries = failed = 0
    latest_try = 0.0  # seconds from a fire's instant to its last try's arrival
    for arrival, sched_text, fid, attempt, status in records:
        if sched_text not in parsed:
            parsed[sched_text] = datetime.fromisoformat(sched_text).timestamp()
        if not win_start <= parsed[sched_text] < win_end:
            outside += 1
            continue
        failed += status != "200"
        latest_try = max(latest_try, arrival - parsed[sched_text])
        if (fid, attempt) in tries_seen:
            duplicates += 1
        elif attempt > 1:
            retries += 1
        else:
            late_by_id[fid] = (arrival - parsed[sched_text]) * 1000
        tries_seen.add((fid, attempt))
    late, due = list(late_by_id.values()), opts.entries * (win_end - win_start)
    wall = cpu[1][2] - cpu[0][2]
    result = {"entries": opts.entries, "per_task": opts.per_task, "window_s": win_end - win_start,
              "put_s": round(put_seconds, 2), "due": due, "delivered": len(late),
              "missed": due - len(late), "duplicates": duplicates, "received": len(records),
              "outside_window": outside, "late_p50_ms": round(pct(late, 50), 1),
              "late_p99_ms": round(pct(late, 99), 1), "late_max_ms": round(max(late or [-1]), 1),
              "late_over_1s": sum(v > 1000 for v in late),
              "service_cpu_pct": round(100 * (cpu[1][0] - cpu[0][0]) / wall, 1),
              "receiver_cpu_pct": round(100 * (cpu[1][1] - cpu[0][1]) / wall, 1),
              "log_backlog_at_end": backlog, "fail_ratio": opts.fail_ratio,
              "answered_503": failed, "retries": retries,
              "latest_try_s": round(latest_try, 2)}
    limit = TARGETS["fires_p99_ms"]
    return {**result, "target": f"1,000 fires/s: none missed, p99 <= {limit:g} ms",
            "pass": result["missed"] == 0 and result["late_p99_ms"] <= limit,
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
    sys.path.insert(0, REPO)
    import schedule_api
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

REPORT = {
    "fires": "fires: {entries} entries every second; {window_s} s window; puts took {put_s} s\n"
             "  due {due}  delivered {delivered}  missed {missed}  duplicates {duplicates}  "
             "(received {received}, {outside_window} outside the window)\n"
             "  lateness ms: p50 {late_p50_ms}  p99 {late_p99_ms}  max {late_max_ms}  "
             "(over 1 s: {late_over_1s})\n  CPU % of one core: service {service_cpu_pct}  "
             "receiver {receiver_cpu_pct}; log backlog at the end {log_backlog_at_end}\n"
             "  tries answered 503 {answered_503} (fail ratio {fail_ratio}), retries {retries}; "
             "latest try {latest_try_s} s after its fire's instant",
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
        receiver_main(float(sys.argv[2]))
        return 0
    if sys.argv[1:2] == ["--_profiled"]:
        return serve_profiled(sys.argv[2], sys.argv[4:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--part", choices=("fires", "startup", "http", "all"), default="all")
    add("--entries", type=int, default=1000, help="fires: entries (default 1000)")
    add("--per-task", type=int, default=10, help="fires: entries per task (default 10)")
    add("--fail-ratio", type=float, default=0.0, help="fires: share of tries the receiver "
        "answers 503 (default 0)")
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
    add("--workers", type=int, help="the service's [webhook] workers (default: its own, 32)")
    add("--profile", help="write the service's all-thread cProfile (pstats) here")
    add("--keep", action="store_true", help="keep the temporary folder (logs, stores)")
    opts = parser.parse_args()
    if min(opts.entries, opts.per_task, opts.clients) < 1 or opts.tasks < 0 or \
            not 0 <= opts.distinct <= 1_000_000 or opts.seconds < opts.warmup + opts.tail + 1:
        parser.error("need entries, per-task, clients >= 1; distinct <= 1e6; "
                     "seconds > warmup + tail")
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
        print(REPORT[part].format(**result))
        print(f"  target ({result['target']}): {'PASS' if result['pass'] else 'FAIL'}"
              f"{'' if result['full_scale'] else ' (below the target scale)'}")
    print(json.dumps({"targets": TARGETS, **results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
