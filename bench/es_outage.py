#!/usr/bin/env python3
"""Check issue #4: an Elasticsearch outage loses no fire log and doubles none.

    python bench/es_outage.py [--outage 30] [--tasks 10] [--per-task 10] [--es-port 9288]
                              [--mode stop|kill|freeze] [--keep]

"Stopping the node for 30 s while 100 entries fire every second loses no log and doubles
none, as counted by /search after it comes back." This script:

1. starts its own Elasticsearch node with .ci/es-node (ES_NODE_HOME and ES_NODE_STATE in a
   temp dir, so it keeps its data across the outage and never touches a node started from
   the same checkout with the default state file), on --es-port;
2. starts a webhook receiver in this process (127.0.0.1, ThreadingHTTPServer) recording the
   X-Schedule-Identity, -Key, -Time and -Fire-Id headers of every request;
3. starts ``python schedule_api.py`` against the node (log level INFO, into service.log) and
   puts --tasks tasks of --per-task entries each, "* * * * * *" in UTC;
4. after --before s stops the node (.ci/es-node stop), waits --outage s, starts it again with
   the same home and port, and lets the entries fire --after s more; --mode kill SIGKILLs
   the node instead (a crash), --mode freeze SIGSTOPs it for --outage s then SIGCONTs it (a
   hung node: requests time out instead of being refused);
5. pauses every task (/running), waits (at most --ship-timeout s) until /health shows no
   spool file and no backlog, then reads every success and error log through /search and
   compares them with what the receiver saw, fire by fire: (identity, key, scheduled).

GET /health is polled twice a second throughout (spool files, backlog, store state).
Prints a summary, then one JSON line. Exit status: 0 when no received fire is missing from
the logs and none is logged twice, 1 otherwise (or when nothing fired), 2 when the run
itself failed. Stdlib only, plus schedule_api.fire_id to cross-check fire ids when the
module imports. Every loop is bounded in time; the node and the service are stopped on
exit, on errors and on Ctrl-C. The temp dir is removed unless --keep, or the check or the
run failed.
"""

from __future__ import annotations

import argparse
import collections
import http.client
import http.server
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime

import bench  # bench/bench.py, beside this script: its process helpers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ES_NODE = os.path.join(REPO, ".ci", "es-node")
SERVICE = os.path.join(REPO, "schedule_api.py")
INDEX = "es-outage"


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# Small helpers ##############################################################################

def port_in_use(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def call(port: int, method: str, path: str, obj=None, timeout: float = 30.0) -> dict:
    """One request to the service on a new connection; return the reply object."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        body = None if obj is None else json.dumps(obj)
        conn.request(method, path, body, {"Content-Type": "application/json"})
        reply = conn.getresponse()
        data = reply.read()
        if reply.status != 200:
            raise RuntimeError(f"{method} {path} answered HTTP {reply.status}: {data[:300]!r}")
        return json.loads(data)
    finally:
        conn.close()


def call_ok(port: int, path: str, obj: dict, retry_for: float = 0.0) -> dict:
    """POST until the envelope says error 0, for at most ``retry_for`` seconds."""
    deadline = time.monotonic() + retry_for
    while True:
        try:
            reply = call(port, "POST", path, obj)
            if reply.get("error") == 0:
                return reply
            problem = reply.get("msg")
        except (OSError, http.client.HTTPException, ValueError, RuntimeError) as exc:
            problem = str(exc)
        if time.monotonic() >= deadline:
            raise RuntimeError(f"POST {path} failed: {problem}")
        time.sleep(1)


# The webhook receiver #######################################################################

class Receiver(http.server.ThreadingHTTPServer):
    """Answer every request 200 at once; keep its X-Schedule-* headers and arrival time."""

    daemon_threads = True
    request_queue_size = 1024  # socketserver's 5 resets connections under a burst of fires

    def __init__(self):
        self.records: list[tuple] = []  # (arrival, identity, key, time, fire id, attempt)
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), ReceiverHandler)
        self.thread = threading.Thread(target=self.serve_forever, args=(0.2,), daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/hook"

    def snapshot(self) -> list[tuple]:
        with self.lock:
            return list(self.records)


class ReceiverHandler(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        arrival = time.time()
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        names = ("X-Schedule-Identity", "X-Schedule-Key", "X-Schedule-Time",
                 "X-Schedule-Fire-Id", "X-Schedule-Attempt")
        record = (arrival, *(self.headers.get(name) for name in names))
        with self.server.lock:
            self.server.records.append(record)
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format, *args):
        pass


# Processes ##################################################################################

class Node:
    """Our own Elasticsearch node: .ci/es-node with ES_NODE_HOME and ES_NODE_STATE set."""

    def __init__(self, tmp: str, port: int):
        self.port = port
        self.log = os.path.join(tmp, "es-node.log")  # the script's messages
        self.env = {**os.environ, "ES_NODE_HOME": os.path.join(tmp, "es-home"),
                    "ES_NODE_STATE": os.path.join(tmp, "es-node.state")}
        self.url = ""

    def _run(self, args: list[str], timeout: float) -> str:
        with open(self.log, "ab") as log:
            done = subprocess.run([ES_NODE, *args], env=self.env, stdout=subprocess.PIPE,
                                  stderr=log, timeout=timeout, cwd=REPO,
                                  start_new_session=True)  # Ctrl-C reaches only us
        if done.returncode != 0:
            raise RuntimeError(f".ci/es-node {' '.join(args)} exited with {done.returncode}; "
                               f"see {self.log}")
        return done.stdout.decode().strip()

    def start(self, timeout: float = 600.0) -> float:
        started = time.monotonic()
        lines = self._run(["start", str(self.port)], timeout).splitlines()
        self.url = lines[-1] if lines else ""
        if not self.url.startswith("http"):
            raise RuntimeError(f".ci/es-node start printed no URL; see {self.log}")
        return time.monotonic() - started

    def stop(self, timeout: float = 120.0) -> float:
        started = time.monotonic()
        self._run(["stop"], timeout)
        return time.monotonic() - started

    def started(self) -> bool:
        return os.path.exists(self.env["ES_NODE_STATE"])

    def pid(self) -> int:
        with open(self.env["ES_NODE_STATE"]) as handle:
            return int(handle.read().split()[0])

    def kill(self) -> float:
        """SIGKILL the node (a crash); start() later finds the state stale and starts anew."""
        started, pid = time.monotonic(), self.pid()
        os.kill(pid, signal.SIGKILL)
        for _ in range(100):  # at most 10 s until its ports are free
            if not port_in_use(self.port) and not _alive(pid):
                break
            time.sleep(0.1)
        return time.monotonic() - started

    def send(self, signum: int) -> None:
        if self.started():
            try:
                os.kill(self.pid(), signum)
            except ProcessLookupError:
                pass


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _die_with_parent() -> None:
    try:  # Linux: the service gets SIGTERM when we die, even by SIGKILL
        import ctypes
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def start_service(tmp: str, es_url: str, timeout: float = 60.0) -> tuple[subprocess.Popen, int]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SCHEDULE_API_")}
    env.update(SCHEDULE_API_ELASTICSEARCH_HOSTS=es_url,
               SCHEDULE_API_ELASTICSEARCH_DEFAULT_INDEX=INDEX, PYTHONUNBUFFERED="1",
               # One process that fires on through the outage; with replicas it would stop
               # at its lease's horizon and log what it missed (README, "Several replicas").
               SCHEDULE_API_ELASTICSEARCH_REPLICAS="false")
    cmd = [sys.executable, SERVICE, "--host", "127.0.0.1", "--port", str(port),
           "--data", os.path.join(tmp, "data"), "--log-level", "INFO"]
    with open(os.path.join(tmp, "service.log"), "ab") as log:  # cwd tmp: no ./config.ini
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                cwd=tmp, env=env, start_new_session=True,
                                preexec_fn=_die_with_parent)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the service exited with {proc.returncode}; see service.log")
        try:
            reply = call(port, "GET", "/health", timeout=5)
            if reply.get("error") == 0 and reply["data"].get("ready", True):
                return proc, port  # ("ready": the stored tasks are loaded)
        except (OSError, http.client.HTTPException, ValueError, RuntimeError):
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"the service did not answer /health within {timeout:g} s")


Sample = collections.namedtuple("Sample", "at phase data error seconds")  # one GET /health


class HealthWatch(threading.Thread):
    """Poll GET /health every ``every`` s; keep a Sample of each (data None if it failed)."""

    def __init__(self, port: int, every: float = 0.5, lifetime: float = 3600.0):
        super().__init__(name="health", daemon=True)
        self.port, self.every, self.lifetime = port, every, lifetime
        self.phase = "before"
        self.samples: list[Sample] = []
        self.done = threading.Event()

    def run(self) -> None:
        deadline = time.monotonic() + self.lifetime
        while not self.done.is_set() and time.monotonic() < deadline:
            at, phase, started = time.time(), self.phase, time.monotonic()
            try:
                data, error = call(self.port, "GET", "/health", timeout=15)["data"], None
            except Exception as exc:
                data, error = None, f"{type(exc).__name__}: {exc}"
            self.samples.append(Sample(at, phase, data, error, time.monotonic() - started))
            self.done.wait(self.every)

    def latest(self) -> dict | None:
        return self.samples[-1].data if self.samples else None


# Reading the logs back ######################################################################

def read_logs(port: int, identities: list[str], deadline: float) -> tuple[dict, list[str]]:
    """Every success and error log of these tasks through /search: {_id: _source}, problems.

    Pages of 100 with skip, per identity and type, so that skip + limit stays <= 10000."""
    found: dict[str, dict] = {}
    problems = []
    for identity in identities:
        for kind in ("success", "error"):
            skip, total, seen = 0, None, 0
            while total is None or skip < total:
                if time.monotonic() > deadline:
                    raise RuntimeError("reading the logs took too long")
                if skip + 100 > 10_000:
                    problems.append(f"{identity}/{kind}: {total} logs, only 10000 readable")
                    break
                reply = call_ok(port, "/search", {"identity": identity, "type": kind,
                                                  "limit": 100, "skip": skip}, retry_for=30)
                hits = reply["data"]["hits"]
                total = hits["total"]["value"]
                for hit in hits["hits"]:
                    if hit["_id"] in found:
                        problems.append(f"{identity}/{kind}: _id {hit['_id']} on two pages")
                    found[hit["_id"]] = hit["_source"]
                seen += len(hits["hits"])
                if not hits["hits"]:
                    break
                skip += len(hits["hits"])
            if total is not None and seen != total:
                problems.append(f"{identity}/{kind}: read {seen} of {total} logs")
    return found, problems


def rfc3339_seconds(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


# The run ####################################################################################

def run(opts, tmp: str, cleanup: list) -> dict:
    if port_in_use(opts.es_port):
        raise RuntimeError(f"port {opts.es_port} is in use; pick another with --es-port")
    receiver = Receiver()
    receiver.thread.start()
    cleanup.append(("receiver", receiver.shutdown))

    node = Node(tmp, opts.es_port)
    cleanup.append(("node", lambda: node.started() and node.stop()))
    say(f"starting Elasticsearch on port {opts.es_port} (home {node.env['ES_NODE_HOME']})")
    first_start = node.start()
    say(f"node up at {node.url} after {first_start:.1f} s")

    service, port = start_service(tmp, node.url)
    cleanup.append(("service", lambda: bench.stop(service, 20.0)))
    say(f"service on 127.0.0.1:{port} (pid {service.pid}), receiver at {receiver.url}")

    identities = [f"outage-{i:02d}" for i in range(opts.tasks)]
    entry = {"cron_time": "* * * * * *", "url": receiver.url}
    for identity in identities:
        call_ok(port, "/put", {"identity": identity, "time_zone": "UTC", "start": True,
                               "entries": {f"e{k:02d}": entry for k in range(opts.per_task)}})
    put_at = time.time()
    watch = HealthWatch(port)
    watch.start()
    cleanup.append(("health watch", watch.done.set))
    say(f"{opts.tasks * opts.per_task} entries firing every second; "
        f"{opts.before:g} s before the outage")
    time.sleep(opts.before)

    marks = {"put": put_at}
    watch.phase = "stopping"
    marks["stop_begin"] = time.time()
    if opts.mode == "freeze":  # the node hangs: requests time out instead of being refused
        cleanup.append(("frozen node", lambda: node.send(signal.SIGCONT)))
        node.send(signal.SIGSTOP)
        stop_s = 0.0
    else:
        stop_s = node.kill() if opts.mode == "kill" else node.stop()
    marks["stop_end"] = time.time()
    watch.phase = "outage"
    say(f"node {opts.mode} took {stop_s:.1f} s; outage of {opts.outage:g} s")
    time.sleep(opts.outage)
    watch.phase = "starting"
    marks["start_begin"] = time.time()
    if opts.mode == "freeze":
        node.send(signal.SIGCONT)
        restart_s = 0.0
    else:
        restart_s = node.start()
    marks["start_end"] = time.time()
    watch.phase = "after"
    say(f"node back after {restart_s:.1f} s; {opts.after:g} s more")
    time.sleep(opts.after)

    watch.phase = "pausing"
    marks["pause_begin"] = time.time()
    for identity in identities:
        call_ok(port, "/running", {"identity": identity, "running": False}, retry_for=30)
    marks["pause_end"] = time.time()
    watch.phase = "draining"
    say("tasks paused; waiting for the spool and the backlog to be shipped")
    deadline = time.monotonic() + opts.ship_timeout
    quiet_since = None  # the condition must hold for 2 s: a batch in flight is not counted
    while time.monotonic() < deadline:
        data = watch.latest() if watch.samples and watch.samples[-1].at > time.time() - 2 \
            else None
        ok = data is not None and data["log_spool_files"] == 0 and data["log_backlog"] == 0 \
            and data.get("fires_running", 0) == 0 and data.get("ok")
        if not ok:
            quiet_since = None
        elif quiet_since is None:
            quiet_since = time.monotonic()
        elif time.monotonic() - quiet_since >= 2.0:
            break
        time.sleep(0.5)
    drained = quiet_since is not None and time.monotonic() - quiet_since >= 2.0
    marks["drained"] = time.time()
    watch.phase = "reading"
    say("drained" if drained else f"NOT drained after {opts.ship_timeout:g} s")

    logs, read_problems = read_logs(port, identities, time.monotonic() + 300)
    watch.done.set()
    received = receiver.snapshot()
    say(f"read {len(logs)} logs; receiver got {len(received)} requests")
    return analyse(opts, tmp, received, logs, read_problems, watch, marks, drained,
                   {"first_start_s": first_start, "stop_s": stop_s, "restart_s": restart_s})


def analyse(opts, tmp, received, logs, read_problems, watch, marks, drained, node_s) -> dict:
    try:
        sys.path.insert(0, REPO)
        from schedule_api import fire_id
    except Exception:
        fire_id = None

    got: collections.Counter = collections.Counter()  # fire -> deliveries
    bad_fire_ids = 0
    during_outage = 0
    for arrival, identity, key, when, fid, _attempt in received:
        scheduled = rfc3339_seconds(when)
        got[(identity, key, scheduled)] += 1
        if fire_id and fid != fire_id(identity, key, scheduled):
            bad_fire_ids += 1
        during_outage += marks["stop_end"] <= arrival < marks["start_begin"]
    logged: collections.Counter = collections.Counter()
    kinds: collections.Counter = collections.Counter()
    by_fire: dict[tuple, list[dict]] = collections.defaultdict(list)
    for source in logs.values():
        fire = (source["identity"], source["key"], float(source["scheduled"]))
        logged[fire] += 1
        kinds[source["type"]] += 1
        by_fire[fire].append(source)

    missing = sorted(set(got) - set(logged))
    doubled = sorted(f for f, n in logged.items() if n > 1)
    unreceived = sorted(set(logged) - set(got))
    never_sent = [f for f in unreceived
                  if all(s["type"] == "error" and not s.get("attempts") for s in by_fire[f])]
    # Seconds in which an entry did not fire at all (neither received nor logged), between
    # its first and its last fire: the scheduler's business, not the log's, but worth seeing.
    per_entry: dict[tuple, set] = collections.defaultdict(set)
    for identity, key, scheduled in set(got) | set(logged):
        per_entry[(identity, key)].add(scheduled)
    gaps = sum(int(max(s) - min(s)) + 1 - len(s) for s in per_entry.values())

    samples = [s for s in watch.samples if s.data]
    outage = [s for s in watch.samples if s.phase in ("stopping", "outage", "starting")]
    spool_max = max((s.data["log_spool_files"] for s in samples), default=0)
    restart_at = marks["start_end"]
    emptied = next((s.at for s in samples
                    if s.at >= restart_at and s.data["log_spool_files"] == 0), None)
    with open(os.path.join(tmp, "service.log"), errors="replace") as handle:
        log_text = handle.read()
    levels = collections.Counter(re.findall(r"^\S+ \S+ (WARNING|ERROR|CRITICAL) ", log_text,
                                            re.MULTILINE))
    spooled = sum(map(int, re.findall(r"spooling (\d+) records", log_text)))
    shipped = sum(map(int, re.findall(r"shipped (\d+) spooled log records", log_text)))
    distinct = collections.Counter(
        re.sub(r"\d+(\.\d+)?", "N", line.split(": ", 1)[-1])[:160]
        for line in log_text.splitlines() if re.match(r"^\S+ \S+ (WARNING|ERROR) ", line))
    return {
        "entries": opts.tasks * opts.per_task, "mode": opts.mode, "outage_s": opts.outage,
        "store_down_s": round(marks["start_end"] - marks["stop_begin"], 1),
        "requests_received": len(received), "fires_received": len(got),
        "received_twice": sum(n > 1 for n in got.values()),
        "received_during_outage": during_outage,
        "fires_logged": len(logged), "log_records": len(logs), "log_types": dict(kinds),
        "missing": len(missing), "doubled": len(doubled),
        "doubled_extra_records": sum(logged[f] - 1 for f in doubled),
        "logged_not_received": len(unreceived),
        "logged_not_received_never_sent": len(never_sent),
        "gap_seconds_not_fired": gaps, "fire_id_mismatches": bad_fire_ids if fire_id else None,
        "spool_files_max": spool_max,
        "spool_files_max_during_outage": max((s.data["log_spool_files"] for s in outage
                                              if s.data), default=0),
        "backlog_max": max((s.data["log_backlog"] for s in samples), default=0),
        "store_not_ok_polls": sum(1 for s in samples if not s.data.get("ok")),
        "health_polls": len(watch.samples),
        "health_poll_errors": len(watch.samples) - len(samples),
        "health_max_s": round(max((s.seconds for s in watch.samples), default=0), 2),
        "health_max_s_during_outage": round(max((s.seconds for s in outage), default=0), 2),
        "spool_emptied_s_after_restart": round(emptied - restart_at, 1) if emptied else None,
        "drained": drained, "drain_wait_s": round(marks["drained"] - marks["pause_end"], 1),
        "node_first_start_s": round(node_s["first_start_s"], 1),
        "node_stop_s": round(node_s["stop_s"], 1), "node_restart_s": round(node_s["restart_s"], 1),
        "records_spooled": spooled, "records_shipped_from_spool": shipped,
        "service_warnings": levels.get("WARNING", 0), "service_errors": levels.get("ERROR", 0),
        "service_tracebacks": log_text.count("Traceback"),
        "service_problem_kinds": dict(distinct.most_common(8)),
        "read_problems": read_problems[:10],
        "examples": {"missing": [list(f) for f in missing[:5]],
                     "doubled": [[*f, logged[f]] for f in doubled[:5]],
                     "logged_not_received": [
                         [*f, [s.get("message") for s in by_fire[f]]] for f in unreceived[:5]]},
    }


REPORT = """\
Elasticsearch outage ({mode}): {entries} entries every second, {outage_s:g} s between the node's stop and start ({store_down_s} s from the stop's start to the node answering again)
  fires received {fires_received} ({requests_received} requests, {received_twice} fires \
received twice, {received_during_outage} during the outage)
  fires logged {fires_logged} ({log_records} success/error logs: {log_types})
  missing (received, not logged) {missing}    doubled (logged more than once) {doubled} \
(+{doubled_extra_records} records)
  logged but not received {logged_not_received} (of which never sent, paused before their \
try: {logged_not_received_never_sent}); seconds an entry did not fire: {gap_seconds_not_fired}
  spool files: max {spool_files_max} (during the outage {spool_files_max_during_outage}); \
backlog max {backlog_max}; records spooled {records_spooled}, shipped {records_shipped_from_spool}
  spool empty {spool_emptied_s_after_restart} s after the node was back; drained {drained} \
({drain_wait_s} s after the pause)
  node: first start {node_first_start_s} s, {mode} {node_stop_s} s, restart {node_restart_s} s
  /health: {health_polls} polls, {health_poll_errors} failed, {store_not_ok_polls} with \
the store down; slowest answer {health_max_s} s (during the outage {health_max_s_during_outage} s)
  service log: {service_warnings} warnings, {service_errors} errors, {service_tracebacks} \
tracebacks"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--es-port", type=int, default=9288, help="port of our node (default 9288)")
    add("--tasks", type=int, default=10, help="tasks (default 10)")
    add("--per-task", type=int, default=10, help="entries per task (default 10)")
    add("--before", type=float, default=10, help="seconds of firing before the outage")
    add("--outage", type=float, default=30, help="seconds the node stays down (default 30)")
    add("--mode", choices=("stop", "kill", "freeze"), default="stop",
        help="how the node goes away: stop (.ci/es-node stop, the default; the issue's "
             "test), kill (SIGKILL, a crash), freeze (SIGSTOP then SIGCONT: a hung node, "
             "requests time out)")
    add("--after", type=float, default=10, help="seconds of firing after the node is back")
    add("--ship-timeout", type=float, default=180,
        help="give up waiting for the spool to be shipped after (s, default 180)")
    add("--keep", action="store_true", help="keep the temp dir (logs, node home)")
    opts = parser.parse_args()
    if min(opts.tasks, opts.per_task) < 1 or opts.tasks * opts.per_task > 100_000 or \
            min(opts.before, opts.outage, opts.after) < 0 or not 0 < opts.ship_timeout <= 3600:
        parser.error("need tasks, per-task >= 1 (at most 100000 entries), times >= 0, "
                     "0 < ship-timeout <= 3600")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that `finally` runs
    signal.signal(signal.SIGINT, signal.default_int_handler)
    tmp = tempfile.mkdtemp(prefix="es-outage-")
    cleanup: list = []
    result, status = None, 2
    try:
        result = run(opts, tmp, cleanup)
        status = 0 if result["missing"] == 0 and result["doubled"] == 0 and \
            result["fires_received"] > 0 else 1
    except KeyboardInterrupt:
        say("interrupted")
        status = 130
    except Exception as exc:
        say(f"run failed: {type(exc).__name__}: {exc}")
    finally:
        for name, action in reversed(cleanup):  # service, then node, then receiver
            for _ in range(2):  # a second Ctrl-C during the clean-up does not skip it
                try:
                    action()
                    break
                except KeyboardInterrupt:
                    say(f"interrupted while stopping the {name}; trying once more")
                except Exception as exc:
                    say(f"stopping the {name} failed: {exc}")
                    break
        if opts.keep or status in (1, 2):  # kept to look into a failure
            say(f"kept {tmp} (service.log, es-node.log, es-home/node.log)")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    if result:
        print(REPORT.format(**result))
        for name in ("service_problem_kinds", "read_problems"):
            for item in result[name] if isinstance(result[name], list) else \
                    [f"{n} x {text}" for text, n in result[name].items()]:
                print(f"  {name.replace('_', ' ')}: {item}")
        print("  PASS: none missing, none doubled" if status == 0 else
              "  FAIL" + (": nothing fired" if not result["fires_received"] else
                          ": logs missing or doubled"))
        print(json.dumps(result))
    return status


if __name__ == "__main__":
    sys.exit(main())
