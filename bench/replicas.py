#!/usr/bin/env python3
"""Benchmark replicas: three schedule_api.py processes on one Elasticsearch node, a kill -9,
a new replica and a 20 s cut from the cluster, counted fire by fire at the receiver.

    python bench/replicas.py [--entries 10000] [--per-task 10] [--cron "*/10 * * * * *"]
                             [--duration 180] [--kill-at 40] [--start-at 80] [--cut-at 110]
                             [--cut 20] [--phase 5] [--window 6] [--es-port 9290] [--keep]

The issue's benchmark: "3 replicas, 1 node, 10,000 entries every 10 s (1,000 fires/s in
all), 3 minutes, receiver counting by fire id; during the run: kill -9 of one replica,
start of a new one, a 20 s cut of another from the cluster." This script:

1. starts its own Elasticsearch node with .ci/es-node (ES_NODE_HOME and ES_NODE_STATE in a
   temp dir, on --es-port: it never touches another node), and bench.py's keep-alive
   receiver in a subprocess (one thread; each request stamped when its head is complete,
   kept as [arrival, X-Schedule-Time, X-Schedule-Fire-Id, attempt, status]);
2. starts replicas A and B connected to the node directly, and C through a TCP proxy in
   this script (127.0.0.1) that can be cut: all its connections closed, no accepts, until
   it is restored; each replica has its own --data folder, port and service.log (INFO);
3. waits until the three share the 64 partitions (GET /health of each), puts --entries
   entries (--per-task to a task, --cron in UTC, start true) through A and waits until
   every replica has loaded them;
4. t = 0 is --phase s after an instant of --cron (5 s: the events fall between the bursts
   of "*/10"); at --kill-at SIGKILLs B (its partitions read from its /health just before),
   at --start-at starts a new replica D (direct), at --cut-at cuts C for --cut s, and at
   --duration stops counting; after each event /health is polled until the partitions are
   all held again;
5. pauses every task (/running), waits until every live replica has shipped its logs,
   reads the "missed" logs through /search, and the receiver's records.

Reported, for the instants of --cron in [t = 0, --duration): due fires (instants x entries);
delivered; doubled (fire ids received more than once; target 0; also counted over every
instant received, before t = 0 and after the run too); never delivered, split by whether the
fire lies in a takeover window (a partition of B from the kill to --window s after it; a
partition of C from the cut to --window s after the restore) and whether a "missed" log
covers it (first <= instant <= last; target: none outside a window, none unlogged; and how
many fires have more than one "missed" log, or one though delivered); the "missed" logs of
instants before t = 0 (the puts go through A: a task of a partition another replica fires
reaches it by the task sync, up to about TASK_SYNC later; what fell due in between fires
late there, so there should be none); delivered more than 1 s late (count, max); time from the kill (and
from the cut) to the partitions held again and to the first delivery of an instant of a
taken-over partition (target <= 5 s); lateness p50/p99/max in steady state (instants outside
[event, its end + --window]); CPU seconds and % of a core of each replica, of the node and
of the receiver over the time each ran; the warnings and errors of each replica's log, by
kind, with when they came (s after t = 0).
Note that "first delivery" includes the wait for the next instant (with --phase 5 and
"*/10", 5 s after each event) and that instant's lateness within its burst.

Prints a summary, then one JSON line. Exit status: 0 when nothing was doubled, no fire was
lost without explanation (outside a takeover window, or inside one without a "missed" log),
no "missed" log names a fire that was delivered, and something was delivered; 1 otherwise; 2
when the run itself failed. Stdlib only (plus what schedule_api.py imports), reusing
bench/bench.py and bench/es_outage.py; every loop is bounded in time; the node, the
replicas, the receiver and the proxy are stopped on exit, on errors and on Ctrl-C. The temp
dir is removed unless --keep or the run failed.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import types
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime

import es_outage  # bench/es_outage.py: the Elasticsearch node, API calls
from es_outage import call, call_ok, say

import bench  # bench/bench.py: receiver, process helpers, schedule instants, CPU

INDEX = "replicas"  # logs; tasks in replicas-tasks, leases and heartbeats beside them


# A TCP proxy that can be cut ################################################################

class Proxy:
    """127.0.0.1:port -> 127.0.0.1:target, a thread per direction of each connection.
    cut() closes the listener and every connection (the client sees resets, then refused
    connects); restore() listens on the same port again."""

    def __init__(self, target: int, lifetime: float):
        self.target, self.deadline = target, time.monotonic() + lifetime
        self.lock = threading.Lock()
        self.conns: set[socket.socket] = set()
        self.listener: socket.socket | None = None
        self.port = 0
        self.cuts = 0
        self.restore()

    def restore(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(256)
        listener.settimeout(0.5)
        self.port, self.listener = listener.getsockname()[1], listener
        threading.Thread(target=self._accept, args=(listener,), name="proxy", daemon=True).start()

    def _accept(self, listener: socket.socket) -> None:
        while time.monotonic() < self.deadline and listener is self.listener:
            try:
                client = listener.accept()[0]
            except TimeoutError:
                continue
            except OSError:  # closed by cut()
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target), timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            client.settimeout(None)
            with self.lock:
                if listener is not self.listener:  # cut meanwhile
                    client.close()
                    upstream.close()
                    return
                self.conns.update((client, upstream))
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while time.monotonic() < self.deadline:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            self._close(src)
            self._close(dst)

    def _close(self, sock: socket.socket) -> None:
        with self.lock:
            self.conns.discard(sock)
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        sock.close()

    def cut(self) -> int:
        """Stop accepting and close every connection; return how many were open."""
        with self.lock:
            listener, self.listener = self.listener, None
            conns = list(self.conns)
        if listener is not None:
            listener.close()
        for sock in conns:
            self._close(sock)
        self.cuts += 1
        return len(conns) // 2

    def close(self) -> None:
        self.cut()
        self.deadline = 0.0


# Replicas ###################################################################################

class Replica:
    """One schedule_api.py process in its own folder (config.ini, data, service.log), started
    by bench.start_service with [elasticsearch] hosts and default_index and log level INFO.
    (es_outage.start_service turns replicas off: it checks one process through an outage.)"""

    def __init__(self, name: str, tmp: str, es_url: str):
        self.name, self.dir, self.es_url = name, os.path.join(tmp, name), es_url
        os.makedirs(self.dir)
        settings = types.SimpleNamespace(profile=None, set=[
            ("server", "log_level", "INFO"), ("elasticsearch", "hosts", es_url),
            ("elasticsearch", "default_index", INDEX)])
        self.proc, self.port, self.ready_s = bench.start_service(settings, self.dir, 60.0)
        self.cpu0, self.cpu1, self.t0, self.t1 = None, None, None, None
        self.cpu_mark()
        self.killed_at: float | None = None

    def cpu_mark(self, end: bool = False) -> None:
        """CPU seconds and wall time at the start (or end) of its counted span."""
        try:
            used = bench.cpu_seconds(self.proc.pid)
        except OSError:
            return
        if end:
            self.cpu1, self.t1 = used, time.time()
        else:
            self.cpu0, self.t0 = used, time.time()

    def health(self, timeout: float = 5.0) -> dict | None:
        try:
            reply = call(self.port, "GET", "/health", timeout=timeout)
            return reply["data"] if reply.get("error") == 0 else None
        except Exception:
            return None

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        self.cpu_mark(end=True)
        self.killed_at = time.time()
        self.proc.kill()
        self.proc.wait(10)

    def stop(self) -> None:
        if self.alive():
            bench.stop(self.proc, 30.0)

    def log_summary(self, t0: float) -> dict:
        """Warnings and errors of its log: counts, and each kind (numbers as N) with how
        often and when first and last (seconds after t = 0; the log's clock is local)."""
        path = os.path.join(self.dir, "service.log")
        with open(path if os.path.exists(path) else os.devnull, errors="replace") as handle:
            text = handle.read()
        kinds: dict[str, list] = {}
        for line in text.splitlines():
            found = re.match(r"^(\S+ \S+) (WARNING|ERROR|CRITICAL) ", line)
            if not found:
                continue
            kind = re.sub(r"\d+(\.\d+)?", "N",
                          re.sub(r"\[[\d, ]+\]", "[..]", line.split(": ", 1)[-1]))[:120]
            at = round(datetime.strptime(found[1], "%Y-%m-%d %H:%M:%S,%f").timestamp() - t0, 1)
            seen = kinds.setdefault(kind, [0, at, at])
            seen[0], seen[2] = seen[0] + 1, at
        return {"warnings": len(re.findall(r"^\S+ \S+ WARNING ", text, re.MULTILINE)),
                "errors": len(re.findall(r"^\S+ \S+ (?:ERROR|CRITICAL) ", text, re.MULTILINE)),
                "tracebacks": text.count("Traceback"),
                "kinds": dict(sorted(kinds.items(), key=lambda kv: kv[1][1])[:8])}


def holdings(replicas: list[Replica]) -> dict[str, dict]:
    """{name: /health data} of the live replicas (None where it did not answer)."""
    return {r.name: r.health() for r in replicas if r.alive()}


def wait_held(replicas: list[Replica], parts: set[int], timeout: float, count: int = 0,
              ) -> float | None:
    """Poll until ``parts`` are all held by the live replicas (and, with ``count``, each of
    them sees ``count`` replicas and the 64 partitions are held once); seconds, or None."""
    started = time.time()
    while time.time() - started < timeout:
        seen = holdings(replicas)
        held = [p for data in seen.values() if data for p in data.get("partitions", ())]
        ok = parts <= set(held) and all(seen.values())
        if count:
            ok = ok and len(held) == len(set(held)) == bench.import_service().PARTITIONS \
                and all(len(d.get("replicas", ())) == count for d in seen.values())
        if ok:
            return time.time() - started
        time.sleep(0.2)
    return None


def wait_flushed(replicas: list[Replica], timeout: float) -> bool:
    """Until every live replica shows no log backlog, spool or fire running, 2 s running."""
    deadline, quiet_since = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        seen = holdings(replicas)
        ok = all(d and d["log_backlog"] == 0 and d["log_spool_files"] == 0
                 and d.get("fires_running", 0) == 0 for d in seen.values())
        if not ok:
            quiet_since = None
        elif quiet_since is None:
            quiet_since = time.monotonic()
        elif time.monotonic() - quiet_since >= 2.0:
            return True
        time.sleep(0.5)
    return False


# Reading back ###############################################################################

def read_missed(port: int, lo: int, hi: int, deadline: float, out: dict) -> None:
    """Every "missed" log with time in [lo, hi] into ``out`` ({_id: _source}); a span with
    more than /search can page (skip + limit <= 10,000) is split in halves."""
    if time.monotonic() > deadline:
        raise RuntimeError("reading the missed logs took too long")
    query = {"type": "missed", "time": {"gte": lo, "lte": hi}, "limit": 100}
    hits = call_ok(port, "/search", {**query, "skip": 0}, retry_for=30)["data"]["hits"]
    total = hits["total"]["value"]
    if (total > 10_000 or hits["total"].get("relation", "eq") != "eq") and hi > lo:
        read_missed(port, lo, (lo + hi) // 2, deadline, out)
        read_missed(port, (lo + hi) // 2 + 1, hi, deadline, out)
        return
    skip = 0
    while hits["hits"] and skip + 100 <= 10_000 and time.monotonic() < deadline:
        for hit in hits["hits"]:
            out[hit["_id"]] = hit["_source"]
        skip += len(hits["hits"])
        if skip >= total:
            break
        hits = call_ok(port, "/search", {**query, "skip": skip}, retry_for=30)["data"]["hits"]


def entry_keys(entries: int, per_task: int) -> list[tuple[str, str]]:
    """(identity, key) of each entry, as bench.put_entries names them."""
    return [(f"fires-{k // per_task}", f"e{k}") for k in range(entries)]


# The run ####################################################################################

def run(opts, tmp: str, cleanup: list) -> dict:
    schedule_api = bench.import_service()
    if es_outage.port_in_use(opts.es_port):
        raise RuntimeError(f"port {opts.es_port} is in use; pick another with --es-port")
    bench.raise_nofile()
    recv, recv_port = bench.start_receiver(tmp, "receiver", 0.0)
    cleanup.append(("receiver", lambda: bench.stop(recv)))
    node = es_outage.Node(tmp, opts.es_port)
    cleanup.append(("node", lambda: node.started() and node.stop()))
    say(f"starting Elasticsearch on port {opts.es_port}")
    node_start_s = node.start()
    say(f"node up at {node.url} after {node_start_s:.1f} s (pid {node.pid()})")
    proxy = Proxy(opts.es_port, lifetime=opts.duration + 3600)
    cleanup.append(("proxy", proxy.close))

    replicas: list[Replica] = []
    cleanup.append(("replicas", lambda: [r.stop() for r in replicas]))
    for name in "ABC":
        url = f"http://127.0.0.1:{proxy.port}" if name == "C" else node.url
        replicas.append(Replica(name, tmp, url))
        say(f"replica {name} on 127.0.0.1:{replicas[-1].port} (pid {replicas[-1].proc.pid})"
            f"{' through the proxy' if name == 'C' else ''}")
    a, b, c = replicas
    warm = wait_held(replicas, set(), opts.settle_timeout, count=3)
    if warm is None:
        raise RuntimeError(f"the 3 replicas did not share the partitions within "
                           f"{opts.settle_timeout:g} s: {holdings(replicas)}")
    say(f"the 3 replicas share the partitions after {warm:.1f} s more")

    opts.retry = None  # what bench.put_entries reads besides entries, per_task, cron
    url = f"http://127.0.0.1:{recv_port}/hook"
    put_s = bench.put_entries(opts, [url] * opts.entries, a.port)
    tasks = -(-opts.entries // opts.per_task)
    deadline = time.monotonic() + opts.settle_timeout
    while time.monotonic() < deadline:
        if all((d or {}).get("tasks") == tasks for d in holdings(replicas).values()):
            break
        time.sleep(0.5)
    else:
        raise RuntimeError(f"the replicas did not all load the {tasks} tasks")
    synced_s = time.monotonic() - deadline + opts.settle_timeout
    say(f"put {opts.entries} entries in {put_s:.1f} s; all replicas have them "
        f"{synced_s:.1f} s later")

    first = bench.fire_instants(opts.cron, time.time() + 1, time.time() + 3600)[0]
    t0 = first + opts.phase
    marks = {"t0": t0}
    instants = bench.fire_instants(opts.cron, t0, t0 + opts.duration)
    say(f"t = 0 at {datetime.fromtimestamp(t0, UTC).strftime('%H:%M:%S')} UTC; "
        f"{len(instants)} instants to count")
    time.sleep(max(0.0, t0 - time.time()))
    for r in replicas:
        r.cpu_mark()
    node_cpu0, recv_cpu0 = bench.cpu_seconds(node.pid()), bench.cpu_seconds(recv.pid)
    snapshots = {"start": {k: v and v["partitions"] for k, v in holdings(replicas).items()}}
    events: dict = {}

    def at(offset: float) -> None:
        time.sleep(max(0.0, t0 + offset - time.time()))

    # kill -9 of B
    at(opts.kill_at)
    b_health = b.health() or {}
    b_parts = set(b_health.get("partitions", ()))
    b.kill()
    marks["kill"] = b.killed_at
    say(f"killed B (SIGKILL; it held {len(b_parts)} partitions)")
    taken = wait_held([a, c], b_parts, 30)
    events["kill"] = {"partitions": sorted(b_parts), "held_again_s": taken and round(taken, 2)}
    snapshots["after_kill"] = {k: v and v["partitions"] for k, v in holdings(replicas).items()}
    say(f"B's partitions held again {taken and round(taken, 1)} s after the kill")

    # a new replica D
    at(opts.start_at)
    marks["start"] = time.time()
    d = Replica("D", tmp, node.url)
    replicas.append(d)
    marks["started"] = time.time()
    say(f"replica D on 127.0.0.1:{d.port} (pid {d.proc.pid}), answering after {d.ready_s:.1f} s")
    shared = wait_held([a, c, d], set(), 30, count=3)
    marks["shared"] = time.time()
    events["start"] = {"ready_s": round(d.ready_s, 2),
                       "shared_s": shared and round(marks["shared"] - marks["start"], 2)}
    snapshots["after_start"] = {k: v and v["partitions"] for k, v in holdings(replicas).items()}
    say(f"the partitions are shared by 3 again {events['start']['shared_s']} s after D's start")

    # cut C from the cluster
    at(opts.cut_at)
    c_parts = set((c.health() or {}).get("partitions", ()))
    marks["cut"] = time.time()
    closed = proxy.cut()
    say(f"cut C from the cluster ({closed} connections closed; it held {len(c_parts)} partitions)")
    taken = wait_held([a, d], c_parts, min(30, opts.cut))
    events["cut"] = {"partitions": sorted(c_parts), "connections_closed": closed,
                     "held_by_others_s": taken and round(taken, 2)}
    c_during = c.health() or {}
    events["cut"]["c_during_cut"] = {"partitions": len(c_during.get("partitions", ())),
                                     "lease_age": c_during.get("lease_age")}
    at(opts.cut_at + opts.cut)
    proxy.restore()
    marks["restore"] = time.time()
    rejoined = wait_held(replicas, set(), 30, count=3)
    events["cut"]["rejoined_s"] = rejoined and round(rejoined, 2)
    snapshots["after_restore"] = {k: v and v["partitions"] for k, v in holdings(replicas).items()}
    say(f"C back; partitions shared by 3 again {rejoined and round(rejoined, 1)} s later")

    at(opts.duration)
    marks["end"] = time.time()
    for r in replicas:
        if r.alive():
            r.cpu_mark(end=True)
    node_cpu = bench.cpu_seconds(node.pid()) - node_cpu0
    recv_cpu = bench.cpu_seconds(recv.pid) - recv_cpu0
    snapshots["end"] = {k: v and v["partitions"] for k, v in holdings(replicas).items()}
    say("end of the counted run; pausing every task")
    identities = sorted({i for i, _ in entry_keys(opts.entries, opts.per_task)})
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda i: call_ok(a.port, "/running", {"identity": i, "running": False},
                                        retry_for=30), identities))
    flushed = wait_flushed(replicas, opts.flush_timeout)
    say("logs flushed" if flushed else f"logs NOT flushed after {opts.flush_timeout:g} s")
    missed_logs: dict = {}
    read_missed(a.port, int(t0) - 60, int(time.time()) + 60, time.monotonic() + 300,
                missed_logs)
    records = bench.dump(recv_port)
    say(f"receiver got {len(records)} requests; {len(missed_logs)} missed logs")
    return analyse(opts, schedule_api, records, missed_logs, instants, marks, b_parts, c_parts,
                   events, snapshots, replicas, node_cpu, recv_cpu, put_s, synced_s, warm,
                   flushed)


def analyse(opts, schedule_api, records, missed_logs, instants, marks, b_parts, c_parts,
            events, snapshots, replicas, node_cpu, recv_cpu, put_s, synced_s, warm,
            flushed) -> dict:
    keys = entry_keys(opts.entries, opts.per_task)
    part_of = {identity: schedule_api.partition(identity) for identity, _ in keys}
    due: dict[str, tuple[str, str, float]] = {}
    for t in instants:
        for identity, key in keys:
            due[schedule_api.fire_id(identity, key, t)] = (identity, key, t)
    # Takeover windows: (partitions, from, to) in which a fire may go missing with a log.
    windows = [("kill", b_parts, marks["kill"], marks["kill"] + opts.window),
               ("cut", c_parts, marks["cut"], marks["restore"] + opts.window)]
    calm = [(marks["kill"], marks["kill"] + opts.window),
            (marks["start"], marks["shared"] + opts.window),
            (marks["cut"], marks["restore"] + opts.window)]

    def window_of(fire) -> str | None:
        identity, _, t = fire
        return next((name for name, parts, lo, hi in windows
                     if part_of[identity] in parts and lo <= t <= hi), None)

    received: collections.Counter = collections.Counter()
    first_arrival: dict[str, float] = {}
    unexpected = outside = 0
    every = collections.Counter(fid for _, _, fid, _, _ in records)  # any instant
    for arrival, _when, fid, _attempt, _status in records:
        if fid not in due:
            when = datetime.fromisoformat(_when).timestamp() if _when else 0
            if marks["t0"] <= when < marks["t0"] + opts.duration:
                unexpected += 1  # in the window but no entry's fire id: off schedule
            else:
                outside += 1
            continue
        received[fid] += 1
        first_arrival[fid] = min(arrival, first_arrival.get(fid, arrival))
    doubled = sorted(fid for fid, n in received.items() if n > 1)
    covered: dict[tuple[str, str], list[tuple[float, float]]] = collections.defaultdict(list)
    for log in missed_logs.values():
        covered[(log["identity"], log.get("key"))].append((log["first"], log["last"]))

    def logged(fire) -> bool:
        identity, key, t = fire
        return any(lo - 1e-3 <= t <= hi + 1e-3 for lo, hi in covered.get((identity, key), ()))

    lost = collections.Counter()
    lost_examples: dict[str, list] = collections.defaultdict(list)
    for fid, fire in due.items():
        if fid in received:
            continue
        where = window_of(fire) or "outside"
        kind = f"{where}/{'logged' if logged(fire) else 'unlogged'}"
        lost[kind] += 1
        if len(lost_examples[kind]) < 3:
            lost_examples[kind].append([fire[0], fire[1], fire[2], part_of[fire[0]]])
    lost_by_instant = collections.Counter(
        (round(due[f][2] - marks["t0"], 1), window_of(due[f]) or "outside")
        for f in due if f not in received)

    lateness = {fid: first_arrival[fid] - due[fid][2] for fid in first_arrival}
    steady = [v * 1000 for fid, v in lateness.items()
              if not any(lo <= due[fid][2] <= hi for lo, hi in calm)]
    late = [v for v in lateness.values() if v > 1.0]
    late_by_instant: dict = {}
    for fid, v in lateness.items():
        t = round(due[fid][2] - marks["t0"], 1)
        late_by_instant[t] = max(late_by_instant.get(t, 0.0), v)

    def first_fire(parts: set[int], since: float) -> tuple[float | None, float | None]:
        """Seconds from ``since`` to the first delivery of an instant after it, of these
        partitions; and that instant's offset from ``since``."""
        best = None
        for fid, arrival in first_arrival.items():
            identity, _, t = due[fid]
            if t > since and part_of[identity] in parts and (best is None or arrival < best[0]):
                best = (arrival, t)
        return (round(best[0] - since, 2), round(best[1] - since, 2)) if best else (None, None)

    events["kill"]["first_fire_s"], events["kill"]["first_instant_s"] = \
        first_fire(b_parts, marks["kill"])
    events["cut"]["first_fire_s"], events["cut"]["first_instant_s"] = \
        first_fire(c_parts, marks["cut"])
    cpu = {}
    for r in replicas:
        wall = (r.t1 or time.time()) - r.t0
        used = (r.cpu1 or 0) - (r.cpu0 or 0)
        cpu[r.name] = {"cpu_s": round(used, 1), "wall_s": round(wall, 1),
                       "pct_core": round(100 * used / wall, 1) if wall > 0 else None}
    wall = marks["end"] - marks["t0"]
    cpu["node"] = {"cpu_s": round(node_cpu, 1), "wall_s": round(wall, 1),
                   "pct_core": round(100 * node_cpu / wall, 1)}
    cpu["receiver"] = {"cpu_s": round(recv_cpu, 1), "wall_s": round(wall, 1),
                       "pct_core": round(100 * recv_cpu / wall, 1)}
    unexplained = sum(n for kind, n in lost.items()
                      if kind.startswith("outside") or kind.endswith("unlogged"))
    missed_count = sum(log.get("count", 0) for log in missed_logs.values())
    before = [log for log in missed_logs.values() if log["last"] < marks["t0"]]
    after = [log for log in missed_logs.values() if log["first"] >= marks["t0"] + opts.duration]
    contradicted = []  # (identity, key, instant, partition): logged missed, yet delivered
    times_logged: collections.Counter = collections.Counter()  # fire of the run -> missed logs
    for log in missed_logs.values():
        for t in instants:
            if not log["first"] - 1e-3 <= t <= log["last"] + 1e-3:
                continue
            times_logged[(log["identity"], log.get("key"), t)] += 1
            if schedule_api.fire_id(log["identity"], log.get("key"), t) in received:
                contradicted.append([log["identity"], log.get("key"), t,
                                     part_of.get(log["identity"])])
    twice = sorted(f for f, n in times_logged.items() if n > 1)
    return {
        "entries": opts.entries, "per_task": opts.per_task, "cron": opts.cron,
        "duration_s": opts.duration, "instants": len(instants), "due": len(due),
        "delivered": len(received), "doubled": len(doubled),
        "doubled_extra": sum(received[f] - 1 for f in doubled),
        "doubled_any_instant": sum(n > 1 for n in every.values()),
        "doubled_examples": [[*due[f], part_of[due[f][0]], received[f]] for f in doubled[:5]],
        "never_delivered": len(due) - len(received), "never_delivered_by_kind": dict(lost),
        "never_delivered_examples": dict(lost_examples),
        "never_delivered_by_instant": {f"{t:g}s {w}": n for (t, w), n in
                                       sorted(lost_by_instant.items())},
        "unexplained": unexplained,
        "missed_logs": len(missed_logs), "missed_logged_fires": missed_count,
        "missed_logs_before_t0": len(before), "missed_logs_after_run": len(after),
        "missed_but_delivered": len(contradicted),
        "missed_logged_more_than_once": len(twice),
        "missed_logged_more_than_once_examples": [[*f, part_of.get(f[0]), times_logged[f]]
                                                  for f in twice[:3]],
        "missed_but_delivered_examples": contradicted[:5],
        "missed_before_t0_fires": sum(log.get("count", 0) for log in before),
        "missed_before_t0_instants": sorted({datetime.fromtimestamp(log["last"], UTC).strftime(
            "%H:%M:%S") for log in before})[:10],
        "unexpected_requests": unexpected, "requests_outside_window": outside,
        "requests": len(records),
        "late_over_1s": len(late), "late_max_s": round(max(lateness.values(), default=0), 2),
        "late_max_by_instant_s": {f"{t:g}": round(v, 2)
                                  for t, v in sorted(late_by_instant.items())},
        "steady_fires": len(steady), "steady_p50_ms": round(bench.pct(steady, 50), 1),
        "steady_p99_ms": round(bench.pct(steady, 99), 1),
        "steady_max_ms": round(max(steady, default=float("nan")), 1),
        "events": events, "marks_s": {k: round(v - marks["t0"], 2) for k, v in marks.items()},
        "partitions": {when: {k: (len(v) if v is not None else None) for k, v in snap.items()}
                       for when, snap in snapshots.items()},
        "cpu": cpu, "logs": {r.name: r.log_summary(marks["t0"]) for r in replicas},
        "put_s": round(put_s, 1), "synced_s": round(synced_s, 1), "warm_s": round(warm, 1),
        "flushed": flushed, "window_s": opts.window,
    }


def report(r: dict) -> str:
    ev = r["events"]
    kinds = r["never_delivered_by_kind"]
    lines = [
        f"replicas: {r['entries']} entries \"{r['cron']}\" ({r['per_task']} a task), "
        f"{r['instants']} instants in {r['duration_s']:g} s; events at (s) {r['marks_s']}",
        f"  due {r['due']}  delivered {r['delivered']}  doubled {r['doubled']} "
        f"(+{r['doubled_extra']} requests; received twice counting every instant, also "
        f"before and after the run: {r['doubled_any_instant']})  never delivered "
        f"{r['never_delivered']}",
        f"  never delivered by window/log: {kinds or '{}'}  (windows: B's partitions from the "
        f"kill to +{r['window_s']:g} s, C's from the cut to the restore +{r['window_s']:g} s)",
        f"  never delivered by instant (s after t=0, window): {r['never_delivered_by_instant']}",
        f"  missed logs {r['missed_logs']} covering {r['missed_logged_fires']} fires, of which "
        f"{r['missed_logs_before_t0']} logs ({r['missed_before_t0_fires']} fires) for "
        f"instants before t = 0 (during the puts and the sync: {r['missed_before_t0_instants']})",
        f"  missed logs for instants after the run (the pause): {r['missed_logs_after_run']}; "
        f"fires logged missed yet delivered: {r['missed_but_delivered']} "
        f"{r['missed_but_delivered_examples'] or ''}",
        f"  fires of the run with more than one missed log: "
        f"{r['missed_logged_more_than_once']} {r['missed_logged_more_than_once_examples'] or ''}",
        f"  unexplained losses {r['unexplained']}; requests off schedule "
        f"{r['unexpected_requests']}, for instants outside the run {r['requests_outside_window']}",
        f"  delivered > 1 s late {r['late_over_1s']}, max {r['late_max_s']} s; "
        f"max lateness per instant (s): {r['late_max_by_instant_s']}",
        f"  steady state ({r['steady_fires']} fires): lateness p50 {r['steady_p50_ms']} ms  "
        f"p99 {r['steady_p99_ms']} ms  max {r['steady_max_ms']} ms",
        f"  kill -9 of B ({len(ev['kill']['partitions'])} partitions): held again after "
        f"{ev['kill']['held_again_s']} s; first delivery of a taken-over instant "
        f"{ev['kill']['first_fire_s']} s after the kill (instant at +"
        f"{ev['kill']['first_instant_s']} s)",
        f"  start of D: answering after {ev['start']['ready_s']} s, 3 replicas sharing after "
        f"{ev['start']['shared_s']} s",
        f"  cut of C ({len(ev['cut']['partitions'])} partitions, "
        f"{ev['cut']['connections_closed']} connections closed): held by the others after "
        f"{ev['cut']['held_by_others_s']} s (C then: {ev['cut']['c_during_cut']}); first "
        f"delivery of a taken-over instant {ev['cut']['first_fire_s']} s after the cut "
        f"(instant at +{ev['cut']['first_instant_s']} s); shared by 3 again "
        f"{ev['cut']['rejoined_s']} s after the restore",
        f"  partitions per replica: {r['partitions']}",
        "  CPU (% of a core over the time it ran): " + "  ".join(
            f"{name} {c['cpu_s']} s / {c['wall_s']} s = {c['pct_core']}%"
            for name, c in r["cpu"].items()),
        f"  puts {r['put_s']} s, synced to all replicas {r['synced_s']} s later; "
        f"logs flushed: {r['flushed']}"]
    for name, log in r["logs"].items():
        lines.append(f"  {name} log: {log['warnings']} warnings, {log['errors']} errors, "
                     f"{log['tracebacks']} tracebacks")
        lines += [f"    {n} x (at {first:g} .. {last:g} s) {text}"
                  for text, (n, first, last) in log["kinds"].items()]
    for kind, examples in r["never_delivered_examples"].items():
        lines.append(f"  never delivered {kind}, e.g. (identity, key, instant, partition): "
                     f"{examples}")
    if r["doubled_examples"]:
        lines.append(f"  doubled, e.g. (identity, key, instant, partition, times): "
                     f"{r['doubled_examples']}")
    return "\n".join(lines)


def undo(cleanup: list) -> None:
    """Run the clean-up actions, the last added first. One interrupted (a second Ctrl-C or
    SIGTERM) is run once more; one that fails is reported, and the others still run."""
    pending, again = list(cleanup), set()
    while pending:
        name, action = pending.pop()
        try:
            action()
        except (KeyboardInterrupt, SystemExit):
            say(f"interrupted while stopping the {name}"
                f"{'' if name in again else '; trying once more'}")
            if name not in again:
                again.add(name)
                pending.append((name, action))
        except Exception as exc:
            say(f"stopping the {name} failed: {exc}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--entries", type=int, default=10_000, help="entries (default 10000)")
    add("--per-task", type=int, default=10, help="entries per task (default 10)")
    add("--cron", default="*/10 * * * * *", help='cron_time of every entry, UTC (default '
        '"*/10 * * * * *": a burst of all the entries every 10 s)')
    add("--duration", type=float, default=180, help="counted seconds (default 180)")
    add("--kill-at", type=float, default=40, help="SIGKILL B at (s, default 40)")
    add("--start-at", type=float, default=80, help="start D at (s, default 80)")
    add("--cut-at", type=float, default=110, help="cut C from the cluster at (s, default 110)")
    add("--cut", type=float, default=20, help="seconds C stays cut (default 20)")
    add("--phase", type=float, default=5, help="t = 0 is this many seconds after an instant "
        "(default 5)")
    add("--window", type=float, default=6, help="takeover window: seconds after the kill, "
        "and after the restore, in which a missed fire of the partitions concerned is "
        "excused if logged (default 6)")
    add("--es-port", type=int, default=9290, help="port of our node (default 9290)")
    add("--settle-timeout", type=float, default=180, help="give up waiting for the replicas "
        "to share the partitions, or to load the tasks, after (s, default 180)")
    add("--flush-timeout", type=float, default=180, help="give up waiting for the logs to "
        "be shipped after (s, default 180)")
    add("--keep", action="store_true", help="keep the temp dir (replicas' logs, node home)")
    opts = parser.parse_args()
    if min(opts.entries, opts.per_task) < 1 or opts.entries > 100_000 or \
            not 0 < opts.kill_at < opts.start_at < opts.cut_at < opts.cut_at + opts.cut \
            < opts.duration or opts.window < 0:
        parser.error("need 1 <= entries <= 100000, per-task >= 1, 0 < kill-at < start-at "
                     "< cut-at < cut-at + cut < duration, window >= 0")
    try:
        bench.fire_instants(opts.cron, time.time(), time.time() + 1)
    except ValueError as exc:
        parser.error(f"--cron {opts.cron!r}: {exc}")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that `finally` runs
    signal.signal(signal.SIGINT, signal.default_int_handler)
    tmp = tempfile.mkdtemp(prefix="replicas-")
    cleanup: list = []
    result, status = None, 2
    try:
        result = run(opts, tmp, cleanup)
        status = 0 if result["doubled"] == 0 and result["unexplained"] == 0 and \
            result["missed_but_delivered"] == 0 and result["delivered"] > 0 else 1
    except KeyboardInterrupt:
        say("interrupted")
        status = 130
    except Exception as exc:
        say(f"run failed: {type(exc).__name__}: {exc}")
    finally:
        undo(cleanup)  # replicas, proxy, node, receiver
        if opts.keep or status == 2:
            say(f"kept {tmp} (A..D/service.log, es-node.log, es-home/node.log)")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    if result:
        print(report(result))
        print("  PASS: none doubled, no unexplained loss" if status == 0 else
              "  FAIL: " + ("nothing delivered" if not result["delivered"] else
                            "doubled, unexplained losses or missed logs of delivered fires"))
        print(json.dumps(result))
    return status


if __name__ == "__main__":
    sys.exit(main())
