#!/usr/bin/env python3
"""Benchmark schedule_api.py as a subprocess, against a local webhook receiver.

Usage (from the repository root; stdlib only, plus croniter which schedule_api needs)::

    python bench/bench.py --part fires   [--entries 1000] [--per-task 10] [--seconds 60]
    python bench/bench.py --part startup [--tasks 100000] [--distinct 0]
    python bench/bench.py --part http    [--clients 8] [--http-seconds 10]
    python bench/bench.py --part all     [--profile /tmp/svc.prof]

fires    N entries firing every second ("* * * * * *", UTC), delivered to a receiver running
         in its own process; fires scheduled inside a window (after --warmup s, ending --tail s
         before the stop) are counted: due, delivered, missed, duplicates (by fire id),
         lateness = receiver's accept time - X-Schedule-Time, and CPU of service and receiver.
startup  T one-entry tasks written straight into the SQLite store (one transaction), then the
         service is started: seconds until GET /health reports all T, RSS after --settle s.
         Cron expressions never fire during the run (checked), so no webhook traffic.
http     --clients threads with keep-alive connections: POST /get, then POST /put, each for
         --http-seconds: requests/s, latency p50/p99, errors (non-200 or error != 0).

--profile FILE runs the service under cProfile in ALL its threads (python -m cProfile sees only
the main thread) and writes merged pstats to FILE; use a smaller scale, it roughly doubles CPU.
Prints a summary with pass/fail against the targets, then one JSON line (the last line).
Only 127.0.0.1 is used; every loop is bounded; subprocesses are stopped on exit or Ctrl-C.
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import os
import random
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timedelta, timezone

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SERVICE = os.path.join(REPO, "schedule_api.py")
TICK = os.sysconf("SC_CLK_TCK")
PROCS: list[subprocess.Popen] = []
DEAD_URL = "http://127.0.0.1:9/"
# Fire at most a few times a year; checked against the clock before use.
STARTUP_MIX = ["0 0 0 1 1 *", "@yearly", "0 30 4 29 2 *", "0 0 12 25 12 *",
               "0 15 3 1 1,7 *", "0 0 0 1 */6 *", "0 45 23 31 12 *", "0 0 6 2 Jan-Mar *"]
TARGETS = {"fires_p99_ms": 50.0, "startup_rss_mb": 150.0, "startup_s": 10.0, "get_rps": 2000.0}


# Processes and small helpers ################################################################

def _die_with_parent() -> None:
    try:  # Linux: the child gets SIGTERM if the bench dies, even by SIGKILL
        import ctypes
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def spawn(cmd: list[str], log_path: str, stdout=None) -> subprocess.Popen:
    with open(log_path, "ab") as log_file:
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


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    """user + system CPU seconds of a process, from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def proc_status(pid: int, name: str) -> int:
    """A number field of /proc/<pid>/status (VmRSS and VmHWM are in kB, Threads a count)."""
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith(name + ":"):
                return int(line.split()[1])
    return -1


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


def call(conn: http.client.HTTPConnection, path: str, obj: dict) -> tuple[int, dict]:
    conn.request("POST", path, json.dumps(obj), {"Content-Type": "application/json"})
    reply = conn.getresponse()
    return reply.status, json.loads(reply.read() or b"{}")


def start_service(tmp: str, data: str, profile: str | None,
                  timeout: float = 120.0) -> tuple[subprocess.Popen, int, float]:
    """Start the service; return (process, port, seconds until GET /health answered)."""
    ini = os.path.join(tmp, "config.ini")
    with open(ini, "w") as handle:
        handle.write("[server]\nlog_level = WARNING\n")
    port = free_port()
    args = ["--config", ini, "--data", data, "--host", "127.0.0.1", "--port", str(port)]
    cmd = ([sys.executable, os.path.abspath(__file__), "--_profiled", profile, "--", *args]
           if profile else [sys.executable, SERVICE, *args])
    started = time.monotonic()
    proc = spawn(cmd, os.path.join(tmp, "service.log"))
    while time.monotonic() - started < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"service exited with {proc.returncode}; see {tmp}/service.log")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/health")
            reply = conn.getresponse()
            body = json.loads(reply.read())
            conn.close()
            if reply.status == 200 and body.get("error") == 0:
                return proc, port, time.monotonic() - started
        except (OSError, http.client.HTTPException, ValueError):
            time.sleep(0.05)
    raise RuntimeError(f"service did not answer /health within {timeout} s")


def health(port: int) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", "/health")
    data = json.loads(conn.getresponse().read())["data"]
    conn.close()
    return data


def log_problems(tmp: str) -> list[str]:
    path = os.path.join(tmp, "service.log")
    if not os.path.exists(path):
        return []
    with open(path, errors="replace") as handle:
        return [line.rstrip() for line in handle if " WARNING " in line or " ERROR " in line
                or "Traceback" in line]


# The webhook receiver (its own process) #####################################################

def receiver_main(limit: int = 5_000_000, lifetime: float = 6 * 3600) -> None:
    """One thread, non-blocking sockets: stamp each connection at accept, answer 200, close.
    (A ThreadingHTTPServer took ~360 us of CPU per request and delayed accepts by seconds'
    worth of GIL waits at 1,000 fires/s, which then counted as the service's lateness.)"""
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
            state = pending[sock]
            try:
                data = sock.recv(65536)
            except OSError:
                data = b""
            state[1] += data
            head, done, _ = state[1].partition(b"\r\n\r\n")
            if data and not done and len(state[1]) < 65536:
                continue  # the webhooks carry no body: the headers are all we wait for
            sel.unregister(sock)
            del pending[sock]
            lines = head.decode("latin-1").split("\r\n")
            headers = {k.strip().lower(): v.strip() for k, _, v in
                       (line.partition(":") for line in lines[1:])}
            body = b""
            if lines[0].startswith("GET"):
                body = json.dumps(records).encode()
            elif done and len(records) < limit:
                records.append((state[0], headers.get("x-schedule-time"),
                                headers.get("x-schedule-fire-id")))
            sock.setblocking(True)
            try:
                sock.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
            except OSError:
                pass
            sock.close()


def serve_profiled(out: str, args: list[str]) -> int:
    """Run schedule_api.main(args) with a cProfile in every thread; merge them into ``out``."""
    import cProfile
    import pstats
    sys.path.insert(0, REPO)
    import schedule_api
    profiles = [cProfile.Profile(time.thread_time)]

    def hook(frame, event, arg):
        profile = cProfile.Profile(time.thread_time)
        profiles.append(profile)
        profile.enable()

    threading.setprofile(hook)
    profiles[0].enable()
    try:
        return schedule_api.main(args)
    finally:
        profiles[0].disable()
        threading.setprofile(None)
        stats = pstats.Stats(profiles[0])
        for profile in profiles[1:]:
            stats.add(profile)
        stats.dump_stats(out)


# Part 1: fires ##############################################################################

def part_fires(opts, tmp: str) -> dict:
    recv = spawn([sys.executable, os.path.abspath(__file__), "--_receiver"],
                 os.path.join(tmp, "receiver.log"), stdout=subprocess.PIPE)
    recv_port = int(recv.stdout.readline())
    svc, port, _ = start_service(tmp, os.path.join(tmp, "fires-data"), opts.profile)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    hook = f"http://127.0.0.1:{recv_port}/hook"
    put_started = time.monotonic()
    for first in range(0, opts.entries, opts.per_task):
        keys = range(first, min(first + opts.per_task, opts.entries))
        status, reply = call(conn, "/put", {
            "identity": f"fires-{first // opts.per_task}", "time_zone": "UTC", "start": True,
            "entries": {f"e{k}": {"cron_time": "* * * * * *", "url": hook} for k in keys}})
        if status != 200 or reply.get("error") != 0:
            raise RuntimeError(f"/put failed: {status} {reply}")
    conn.close()
    put_seconds = time.monotonic() - put_started
    t0 = time.time()
    win_start = math.ceil(t0 + opts.warmup)
    win_len = max(1, int(t0 + opts.seconds - opts.tail) - win_start)
    win_end = win_start + win_len

    def sleep_until(t: float) -> None:
        time.sleep(max(0.0, t - time.time()))

    sleep_until(win_start)
    cpu0 = cpu_seconds(svc.pid), cpu_seconds(recv.pid), time.monotonic()
    sleep_until(win_end)
    cpu1 = cpu_seconds(svc.pid), cpu_seconds(recv.pid), time.monotonic()
    sleep_until(t0 + opts.seconds)
    end_health = health(port)
    rconn = http.client.HTTPConnection("127.0.0.1", recv_port, timeout=60)
    rconn.request("GET", "/dump")
    records = json.loads(rconn.getresponse().read())
    rconn.close()
    stop(svc)
    stop(recv)

    parsed: dict[str, float] = {}
    first_arrival: dict[str, float] = {}
    duplicates = outside = 0
    for (arrival, sched_text, fid) in records:
        if sched_text not in parsed:
            parsed[sched_text] = datetime.fromisoformat(sched_text).timestamp()
        scheduled = parsed[sched_text]
        if not win_start <= scheduled < win_end:
            outside += 1
        elif fid in first_arrival:
            duplicates += 1
        else:
            first_arrival[fid] = arrival - scheduled
    late_ms = [v * 1000 for v in first_arrival.values()]
    wall = cpu1[2] - cpu0[2]
    due = opts.entries * win_len
    return {"entries": opts.entries, "per_task": opts.per_task, "window_s": win_len,
            "put_s": round(put_seconds, 2), "due": due, "delivered": len(first_arrival),
            "missed": due - len(first_arrival), "duplicates": duplicates,
            "received_total": len(records), "outside_window": outside,
            "late_p50_ms": round(pct(late_ms, 50), 1), "late_p99_ms": round(pct(late_ms, 99), 1),
            "late_max_ms": round(max(late_ms, default=float("nan")), 1),
            "late_over_1s": sum(1 for v in late_ms if v > 1000),
            "service_cpu_pct": round(100 * (cpu1[0] - cpu0[0]) / wall, 1),
            "receiver_cpu_pct": round(100 * (cpu1[1] - cpu0[1]) / wall, 1),
            "log_backlog_at_end": end_health.get("log_backlog"),
            "service_log_problems": len(log_problems(tmp))}


# Part 2: startup ############################################################################

def startup_expressions(opts) -> list[str]:
    sys.path.insert(0, REPO)
    import schedule_api
    now = time.time()
    horizon = now + opts.start_timeout + opts.settle + 600
    if not opts.distinct:  # the fixed mix, minus any that would fire during the run
        utc = schedule_api.load_zone("UTC")
        return [e for e in STARTUP_MIX
                if schedule_api.parse_schedule(e, utc).next_after(now) > horizon]
    # K distinct yearly expressions on dates other than today and tomorrow (UTC).
    today = datetime.now(timezone.utc)
    skip = {(d.month, d.day) for d in (today, today + timedelta(days=1))}
    rng = random.Random(1)
    found: set[str] = set()
    while len(found) < opts.distinct:
        month, day = rng.randint(1, 12), rng.randint(1, 28)
        if (month, day) not in skip:
            found.add(f"{rng.randint(0, 59)} {rng.randint(0, 59)} {rng.randint(0, 23)} "
                      f"{day} {month} *")
    return sorted(found)


def part_startup(opts, tmp: str) -> dict:
    sys.path.insert(0, REPO)
    import schedule_api
    expressions = startup_expressions(opts)
    data = os.path.join(tmp, "startup-data")
    store = schedule_api.SQLiteStore(data)
    write_started = time.monotonic()
    now = time.time()
    rows = []
    for i in range(opts.tasks):
        entry = schedule_api.Entry(expressions[i % len(expressions)], DEAD_URL, anchor=now)
        doc = schedule_api.Task(f"task-{i:06d}", "UTC", True, {"e": entry}).document()
        rows.append((doc["identity"], json.dumps({k: v for k, v in doc.items() if k != "last"})))
    # What save_task does per task, in one transaction (per task it costs an fsync each).
    store._writing(lambda db: db.executemany(
        "INSERT OR REPLACE INTO tasks (identity, doc) VALUES (?, ?)", rows))
    store.close()
    write_seconds = time.monotonic() - write_started
    svc, port, ready = start_service(tmp, data, opts.profile, opts.start_timeout)
    tasks_seen = health(port)["tasks"]
    cpu_ready = cpu_seconds(svc.pid)
    time.sleep(opts.settle)
    rss, hwm = proc_status(svc.pid, "VmRSS") / 1024, proc_status(svc.pid, "VmHWM") / 1024
    threads = proc_status(svc.pid, "Threads")
    stop_seconds = stop(svc)
    return {"tasks": opts.tasks, "tasks_loaded": tasks_seen, "distinct_expressions":
            len(expressions), "store_write_s": round(write_seconds, 2),
            "start_s": round(ready, 2), "start_cpu_s": round(cpu_ready, 2),
            "rss_mb": round(rss, 1), "peak_rss_mb": round(hwm, 1), "threads": threads,
            "stop_s": round(stop_seconds, 2), "service_log_problems": len(log_problems(tmp))}


# Part 3: http ###############################################################################

def hammer(port: int, clients: int, seconds: float, make_request) -> dict:
    """Run ``clients`` threads sending make_request(client, n) -> (path, obj) for ``seconds``."""
    results = [([], 0) for _ in range(clients)]
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
                status, reply = call(conn, path, obj)
                if status != 200 or reply.get("error") != 0:
                    errors += 1
            except (OSError, http.client.HTTPException, ValueError):
                errors += 1
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
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
    svc, port, _ = start_service(tmp, os.path.join(tmp, "http-data"), opts.profile)

    def task(identity: str) -> dict:
        return {"identity": identity, "time_zone": "UTC", "start": False,
                "entries": {"e": {"cron_time": "0 0 0 1 1 *", "url": DEAD_URL}}}

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    for i in range(100):
        call(conn, "/put", task(f"get-{i}"))
    conn.close()
    result = {"clients": opts.clients, "seconds": opts.http_seconds}
    for name, make in (("get", lambda c, n: ("/get", {"identity": f"get-{(c * 13 + n) % 100}"})),
                       ("put", lambda c, n: ("/put", task(f"put-{c}-{n % 20}")))):
        cpu0, wall0 = cpu_seconds(svc.pid), time.monotonic()
        result[name] = hammer(port, opts.clients, opts.http_seconds, make)
        result[name]["service_cpu_pct"] = round(
            100 * (cpu_seconds(svc.pid) - cpu0) / (time.monotonic() - wall0), 1)
    stop(svc)
    result["service_log_problems"] = len(log_problems(tmp))
    return result


# Main #######################################################################################

def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def summary(results: dict) -> list[str]:
    lines, t = [], TARGETS
    if "fires" in results:
        f = results["fires"]
        ok = f["missed"] == 0 and f["late_p99_ms"] <= t["fires_p99_ms"]
        lines += [f"fires: {f['entries']} entries every second, window {f['window_s']} s "
                  f"(puts took {f['put_s']} s)",
                  f"  due {f['due']}  delivered {f['delivered']}  missed {f['missed']}  "
                  f"duplicates {f['duplicates']}  (received {f['received_total']}, "
                  f"{f['outside_window']} outside the window)",
                  f"  lateness ms: p50 {f['late_p50_ms']}  p99 {f['late_p99_ms']}  max "
                  f"{f['late_max_ms']}  (>1 s: {f['late_over_1s']})",
                  f"  CPU % of one core: service {f['service_cpu_pct']}  receiver "
                  f"{f['receiver_cpu_pct']}; log backlog at end {f['log_backlog_at_end']}",
                  f"  target (1,000 fires/s: none missed, p99 <= {t['fires_p99_ms']:.0f} ms): "
                  f"{verdict(ok)}" + ("" if f["entries"] >= 1000 else " (below target scale)")]
    if "startup" in results:
        s = results["startup"]
        ok = s["rss_mb"] <= t["startup_rss_mb"] and s["start_s"] <= t["startup_s"]
        lines += [f"startup: {s['tasks']} tasks ({s['distinct_expressions']} distinct cron "
                  f"expressions), store written in {s['store_write_s']} s",
                  f"  /health answered after {s['start_s']} s with {s['tasks_loaded']} tasks "
                  f"(CPU {s['start_cpu_s']} s); RSS {s['rss_mb']} MB (peak {s['peak_rss_mb']}),"
                  f" {s['threads']} threads; SIGTERM stop took {s['stop_s']} s",
                  f"  target (100,000 tasks: <= {t['startup_rss_mb']:.0f} MB, <= "
                  f"{t['startup_s']:.0f} s): {verdict(ok)}"
                  + ("" if s["tasks"] >= 100_000 else " (below target scale)")]
    if "http" in results:
        h = results["http"]
        lines.append(f"http: {h['clients']} keep-alive clients, {h['seconds']} s per endpoint")
        for name in ("get", "put"):
            r = h[name]
            lines.append(f"  /{name}: {r['rps']} req/s  p50 {r['p50_ms']} ms  p99 {r['p99_ms']} "
                         f"ms  errors {r['errors']}  (service CPU {r['service_cpu_pct']}%, "
                         f"client CPU {r['client_cpu_pct']}%)")
        lines.append(f"  target (/get >= {t['get_rps']:.0f} req/s): "
                     f"{verdict(h['get']['rps'] >= t['get_rps'] and h['get']['errors'] == 0)}")
    return lines


def main() -> int:
    if sys.argv[1:2] == ["--_receiver"]:
        receiver_main()
        return 0
    if sys.argv[1:2] == ["--_profiled"]:
        return serve_profiled(sys.argv[2], sys.argv[4:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=("fires", "startup", "http", "all"), default="all")
    parser.add_argument("--entries", type=int, default=1000, help="fires: entries")
    parser.add_argument("--per-task", type=int, default=10, help="fires: entries per task")
    parser.add_argument("--seconds", type=float, default=60, help="fires: run time after puts")
    parser.add_argument("--warmup", type=float, default=5, help="fires: skipped at the start")
    parser.add_argument("--tail", type=float, default=5, help="fires: skipped at the end")
    parser.add_argument("--tasks", type=int, default=100_000, help="startup: stored tasks")
    parser.add_argument("--distinct", type=int, default=0,
                        help="startup: K distinct yearly expressions (0: a fixed mix of 8)")
    parser.add_argument("--settle", type=float, default=5, help="startup: wait before RSS")
    parser.add_argument("--start-timeout", type=float, default=300)
    parser.add_argument("--clients", type=int, default=8, help="http: client threads")
    parser.add_argument("--http-seconds", type=float, default=10, help="http: per endpoint")
    parser.add_argument("--profile", help="write the service's all-thread cProfile here")
    opts = parser.parse_args()
    if opts.entries < 1 or opts.per_task < 1 or opts.seconds < opts.warmup + opts.tail + 1:
        parser.error("need entries >= 1, per-task >= 1, seconds > warmup + tail")
    if opts.profile:
        opts.profile = os.path.abspath(opts.profile)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    parts = ("fires", "startup", "http") if opts.part == "all" else (opts.part,)
    runners = {"fires": part_fires, "startup": part_startup, "http": part_http}
    results: dict = {}
    tmp = tempfile.mkdtemp(prefix="schedule-bench-")
    profile = opts.profile
    try:
        for part in parts:
            if profile and len(parts) > 1:
                opts.profile = f"{profile}.{part}"
            print(f"running {part} ...", file=sys.stderr, flush=True)
            part_tmp = os.path.join(tmp, part)
            os.makedirs(part_tmp)
            results[part] = runners[part](opts, part_tmp)
            for line in log_problems(part_tmp)[:5]:
                print(f"  service log: {line}", file=sys.stderr)
    finally:
        for proc in list(PROCS):
            stop(proc, 5)
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)
    print("\n".join(summary(results)))
    print(json.dumps({"targets": TARGETS, **results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
