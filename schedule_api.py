#!/usr/bin/env python3
"""schedule-api: fire webhooks on cron schedules, with second precision, in each task's zone.

A drop-in successor of the Go service kainonly/schedule-api: the same eight POST endpoints,
the same request fields and the same reply envelopes, so existing clients switch without
changing a line. Tasks and a searchable log of every fire live in an embedded SQLite store by
default, or in Elasticsearch when ``[elasticsearch] hosts`` is set; then any number of
processes with the same settings share the firing of the tasks (README, "Several replicas").

Run it::

    pip install -r requirements.txt
    python schedule_api.py [--config config.ini] [--host H] [--port P] [--data DIR]

Endpoints (all POST with a JSON object body; replies ``{"error": 0, ...}`` or
``{"error": 1, "msg": "..."}``), the original's eight:

    /put      create or replace a task and its entries
    /get      one task, with next_date and last_date of each entry
    /all      the identities of all tasks
    /lists    several tasks by identity
    /running  pause or resume a task
    /delete   stop and delete a task
    /search   search the logs (put, delete, running, success, error)
    /clear    delete the logs of one task

and ours: /retry (send a failed fire again), /trigger (fire an entry now), /preview (the
next fires of a cron_time), ``GET /health`` for load balancers and Docker's HEALTHCHECK,
``GET /metrics`` for Prometheus, ``GET /openapi.json``, the API as OpenAPI 3.1, and
``GET /`` a status page for a person with a browser.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import bisect
import calendar
import collections
import concurrent.futures
import configparser
import contextlib
import dataclasses
import difflib
import email.utils
import functools
import hashlib
import heapq
import hmac
import http.server
import ipaddress
import itertools
import json
import logging
import math
import os
import random
import re
import signal
import socket
import sqlite3
import ssl
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
import weakref
import zlib
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime
from typing import Any, ClassVar
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import CroniterError, croniter

__version__ = "1.1.0"

__all__ = [
    "App",
    "Clock",
    "Config",
    "CronSchedule",
    "ElasticsearchStore",
    "Entry",
    "EverySchedule",
    "Field",
    "Fire",
    "LogWriter",
    "Metrics",
    "NotFoundError",
    "Replicas",
    "SQLiteStore",
    "ScheduleError",
    "Scheduler",
    "Schedules",
    "Service",
    "StoreError",
    "Task",
    "ValidationError",
    "Webhook",
    "Webhooks",
    "carries_over",
    "check_fields",
    "field_schema",
    "fire_id",
    "fire_log",
    "import_tasks",
    "load_config",
    "load_zone",
    "main",
    "make_server",
    "missed_instants",
    "open_store",
    "openapi_document",
    "parse_schedule",
    "partition",
    "request_schema",
    "retry_plan",
    "rfc3339",
    "signature",
    "validate_search",
    "validate_task",
]

log = logging.getLogger("schedule_api")

# Constants ##################################################################################

USER_AGENT = f"schedule-api/{__version__}"
ZERO_DATE = "0001-01-01T00:00:00Z"  # what the original shows for "never" (Go's zero time)
LOG_TYPES = ("put", "delete", "running", "success", "error", "missed")
MISFIRE_POLICIES = ("skip", "once")  # what an entry does with fires it missed
OVERLAP_POLICIES = ("allow", "forbid", "replace")
METHODS = ("POST", "GET", "PUT", "PATCH", "DELETE")  # an entry's method; POST by default
BODILESS_METHODS = ("GET", "DELETE")  # sent without a body (RFC 9110 9.3.1, 9.3.5)
RETRY_DEFAULTS = {"attempts": 0, "backoff": 1.0, "max_backoff": 60.0, "max_duration": 300.0}
RETRY_LIMITS = {"attempts": (0, 20), "backoff": (0.001, 3600), "max_backoff": (0.001, 86400),
                "max_duration": (0.001, 86400)}  # (low, high) of each retry field
MAX_PREVIEW = 100
MAX_INSTANT = 1e11  # UNIX seconds (year 5138): the largest instant a request may name
MAX_EVERY = 100 * 365 * 86400.0  # seconds: @every beyond a century is a mistake
MAX_IDENTITY = 128
MAX_ENTRIES = 1000
MAX_URL = 2048
MAX_HEADERS = 100
MAX_JSON_DEPTH = 64
MAX_LISTS = 1000
MAX_SEARCH_LIMIT = 100
MAX_SEARCH_WINDOW = 10_000  # skip + limit, Elasticsearch's default max_result_window
LATE_REPLAY_LIMIT = 60.0  # seconds: fires further behind than this (a suspended host) are missed
MISSED_COUNT_LIMIT = 10  # missed instants counted one by one; past it a log says "more"
# A fire's log takes about 580 bytes in SQLite (README): 100 fires a second, 5 GB a day. The
# embedded store keeps 30 days by default, within [storage] max_log_bytes; Elasticsearch keeps
# everything, as the original did: clusters bound their indices with lifecycle policies.
SQLITE_RETENTION_DAYS = 30.0
MAX_LOG_BACKLOG = 100_000  # log records held in memory when neither store nor disk take them
TIMER_MAX_WAIT = 30.0  # seconds: the timer re-reads the clock at least this often
# Replicas on one Elasticsearch cluster (README, "Several replicas"). Tasks are spread over
# PARTITIONS by identity; a replica fires the partitions it leases. A lease names its owner
# and a horizon: the owner fires the partition's instants up to the horizon, and a successor
# only those after it, so no instant is fired by two replicas, whatever their clocks say.
PARTITIONS = 64
LEASE_RENEW = 0.5  # seconds between a replica's rounds: renew, release, take, heartbeat
LEASE_AHEAD = 1.5  # seconds: a renewal lets its owner fire this far past the renewal's start
LEASE_FENCE = 2.5  # seconds without a renewal: the owner drops the partition (fires nothing)
LEASE_TAKEOVER = 3.0  # seconds a lease or heartbeat must stand unchanged before it is dead
HANDOVER = 2.0  # seconds a partition given up to a peer still fires on the one giving it up
LEASE_CALL_TIMEOUT = 2.0  # seconds a replica waits for each of its round's calls to the cluster
TASK_SYNC = 1.0  # seconds between reads of the tasks changed through other replicas
TASK_SYNC_OVERLAP = 30.0  # seconds re-read each time: other replicas' clocks and refreshes
TASK_RESYNC = 60.0  # seconds between full reads of the tasks (a backstop for larger skews)
TOMBSTONE_DAYS = 7.0  # a deleted task's tombstone is kept this long: a replica that starts
# reads the tasks anew, but one cut off from the cluster for longer keeps the task until then
# Headers a user may not set on a webhook: the service computes them, and a wrong one corrupts
# the request (so do X-Schedule-*, the fire's own).
FORBIDDEN_HEADERS = frozenset({"content-length", "transfer-encoding", "connection", "host"})
HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")  # RFC 9110 token


# Errors #####################################################################################

class ScheduleApiError(Exception):
    """Base of every error this module raises on purpose."""


class ValidationError(ScheduleApiError, ValueError):
    """A request is wrong; ``field`` names the part at fault. Nothing was changed."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field}: {problem}" if field else problem)
        self.field = field


class NotFoundError(ValidationError):
    """A request names a task that does not exist."""

    def __init__(self, identity: str):
        super().__init__("", f"task {identity!r} not found")


class ScheduleError(ScheduleApiError, ValueError):
    """A cron_time cannot be parsed or never fires."""


class StoreError(ScheduleApiError):
    """The store could not do what was asked; the caller's change was not made."""


def nearest(name: str, known: Iterable[str]) -> str:
    """Return "; did you mean 'x'?" for the known name nearest to ``name``, or ""."""
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


# Configuration ##############################################################################

@dataclasses.dataclass(frozen=True)
class Config:
    """Every setting of the service, from defaults, config.ini, environment and flags."""

    host: str = "0.0.0.0"
    port: int = 3000
    token: str = ""
    max_body_bytes: int = 1 << 20
    request_timeout: float = 30.0
    ignore_unknown_fields: bool = False
    metrics_public: bool = False
    data: str = "data"
    webhook_timeout: float = 10.0
    max_timeout: float = 300.0
    max_connections: int = 1024
    max_connections_per_origin: int = 256
    idle_timeout: float = 30.0
    webhook_ca_certs: str = ""
    max_response_bytes: int = 64 << 10
    retry_attempts: int = 0
    misfire_grace: float = 3600.0
    signing_secret: str = ""
    es_hosts: str = ""
    es_default_index: str = "schedule-service"
    es_username: str = ""
    es_password: str = ""
    es_cloud_id: str = ""
    es_api_key: str = ""
    es_ca_certs: str = ""
    es_verify_certs: bool = True
    es_timeout: float = 10.0
    es_replicas: bool = True
    spool_max_bytes: int = 256 << 20
    flush_interval: float = 0.5
    log_retention_days: float = -1.0  # -1: the store's own default (SQLITE_RETENTION_DAYS)
    max_log_bytes: int = 2 << 30
    log_level: str = "INFO"
    log_format: str = "text"
    summary_interval: float = 60.0


# config.ini section/option -> Config field; the environment variable is
# SCHEDULE_API_<SECTION>_<OPTION> in upper case (SCHEDULE_API_SERVER_PORT, ...).
CONFIG_KEYS = {
    ("server", "host"): "host",
    ("server", "port"): "port",
    ("server", "token"): "token",
    ("server", "max_body_bytes"): "max_body_bytes",
    ("server", "request_timeout"): "request_timeout",
    ("server", "ignore_unknown_fields"): "ignore_unknown_fields",
    ("server", "metrics_public"): "metrics_public",
    ("server", "log_level"): "log_level",
    ("server", "log_format"): "log_format",
    ("server", "summary_interval"): "summary_interval",
    ("storage", "path"): "data",
    ("storage", "spool_max_bytes"): "spool_max_bytes",
    ("storage", "flush_interval"): "flush_interval",
    ("storage", "log_retention_days"): "log_retention_days",
    ("storage", "max_log_bytes"): "max_log_bytes",
    ("webhook", "timeout"): "webhook_timeout",
    ("webhook", "max_timeout"): "max_timeout",
    ("webhook", "max_connections"): "max_connections",
    ("webhook", "max_connections_per_origin"): "max_connections_per_origin",
    ("webhook", "idle_timeout"): "idle_timeout",
    ("webhook", "ca_certs"): "webhook_ca_certs",
    ("webhook", "max_response_bytes"): "max_response_bytes",
    ("webhook", "retry_attempts"): "retry_attempts",
    ("webhook", "misfire_grace"): "misfire_grace",
    ("webhook", "signing_secret"): "signing_secret",
    ("elasticsearch", "hosts"): "es_hosts",
    ("elasticsearch", "default_index"): "es_default_index",
    ("elasticsearch", "username"): "es_username",
    ("elasticsearch", "password"): "es_password",
    ("elasticsearch", "cloud_id"): "es_cloud_id",
    ("elasticsearch", "api_key"): "es_api_key",
    ("elasticsearch", "ca_certs"): "es_ca_certs",
    ("elasticsearch", "verify_certs"): "es_verify_certs",
    ("elasticsearch", "timeout"): "es_timeout",
    ("elasticsearch", "replicas"): "es_replicas",
}


# Options of earlier versions, with what took their place.
RETIRED_KEYS = {("webhook", "workers"): "was replaced in 1.1 by max_connections (webhooks in "
                                        "flight at once, default 1024): remove it"}


def _convert(name: str, raw: str, where: str) -> Any:
    kind = type(getattr(Config, name))
    text = raw.strip()
    try:
        if kind is bool:
            lowered = text.lower()
            if lowered not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                raise ValueError("expected true or false")
            return lowered in ("1", "true", "yes", "on")
        value = kind(text)
    except ValueError as exc:
        raise ValidationError(where, f"{raw!r} is not a valid {kind.__name__} ({exc})") from None
    if kind in (int, float) and (value < 0 or (isinstance(value, float) and not math.isfinite(value))):
        raise ValidationError(where, f"{raw!r} must be a non-negative number")
    return value


def _check_names(parser: configparser.ConfigParser) -> None:
    """Refuse a section or option of config.ini that CONFIG_KEYS does not know, naming the
    nearest known one: a typo must stop the start, not pass silently."""
    sections = sorted({section for section, _ in CONFIG_KEYS})
    if parser.defaults():
        raise ValidationError("[DEFAULT]", "is not used; put each option in its section")
    for section in parser.sections():
        if section not in sections:
            close = difflib.get_close_matches(section, sections, n=1)
            raise ValidationError(f"[{section}]", "is not a known section" +
                                  (f"; did you mean [{close[0]}]?" if close else
                                   f"; sections: {', '.join(sections)}"))
        options = [option for s, option in CONFIG_KEYS if s == section]
        for option in parser.options(section):
            if (section, option) in RETIRED_KEYS:
                raise ValidationError(f"[{section}] {option}", RETIRED_KEYS[section, option])
            if option not in options:
                raise ValidationError(f"[{section}] {option}",
                                      "is not a known option" + nearest(option, options))


def load_config(path: str | None = None, environ: dict | None = None, **flags: Any) -> Config:
    """Build the Config from defaults, then the file at ``path``, the environment, then flags.

    A missing ``path`` is an error only when it was named; flags that are None are ignored.
    Raises ValidationError naming the option that is wrong.
    """
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    if path:
        parser = configparser.ConfigParser(interpolation=None)
        try:
            with open(path, encoding="utf-8") as handle:
                parser.read_file(handle)
        except (OSError, configparser.Error) as exc:
            raise ValidationError("--config", f"cannot read {path}: {exc}") from None
        _check_names(parser)
        for (section, option), name in CONFIG_KEYS.items():
            if parser.has_option(section, option):
                values[name] = _convert(name, parser.get(section, option), f"[{section}] {option}")
    variables = {f"SCHEDULE_API_{section}_{option}".upper(): name
                 for (section, option), name in CONFIG_KEYS.items()}
    for variable, raw in environ.items():
        if variable.startswith("SCHEDULE_API_"):
            if variable not in variables:  # a typo must stop the start, as in config.ini
                raise ValidationError(variable, "is not a known setting" +
                                      nearest(variable, variables))
            values[variables[variable]] = _convert(variables[variable], raw, variable)
    values.update({name: value for name, value in flags.items() if value is not None})
    config = Config(**values)
    if not 0 <= config.port <= 65535:
        raise ValidationError("[server] port", "must be 0..65535")
    for name in ("max_connections", "max_connections_per_origin"):
        if getattr(config, name) < 1:
            raise ValidationError(f"[webhook] {name}", "must be at least 1")
    if config.webhook_timeout <= 0:
        raise ValidationError("[webhook] timeout", "must be above 0")
    if config.max_timeout < config.webhook_timeout:
        raise ValidationError("[webhook] max_timeout", "must be at least [webhook] timeout")
    if config.retry_attempts > RETRY_LIMITS["attempts"][1]:
        raise ValidationError("[webhook] retry_attempts", "must be 0..20")
    for name, option in (("flush_interval", "[storage] flush_interval"),
                         ("request_timeout", "[server] request_timeout")):
        if getattr(config, name) <= 0:
            raise ValidationError(option, "must be above 0")
    if config.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise ValidationError("[server] log_level", "must be DEBUG, INFO, WARNING or ERROR")
    if config.log_format not in ("text", "json"):
        raise ValidationError("[server] log_format", "must be text or json")
    return config


# Metrics ####################################################################################

class Metrics:
    """Counters and histograms for GET /metrics, in Prometheus' text format 0.0.4.

    Label values come from small fixed sets (outcomes, endpoints, statuses), never from a
    task, a key or a URL, so the series stay few however many tasks there are. Gauges are
    read when the page is rendered (render()'s ``gauges``). Thread-safe: one lock, held for
    a dictionary update.
    """

    # Seconds: 1 ms to 10 s, as lateness and webhook durations range.
    BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
    HELP: ClassVar[dict[str, tuple[str, str]]] = {
        "schedule_fires_total":
            ("counter", "Fires ended, by outcome: success, error, skipped (overlap forbid)."),
        "schedule_fires_missed_total":
            ("counter", "Fire instants missed while nothing fired (down, paused, suspended)."),
        "schedule_fire_lateness_seconds":
            ("histogram", "From a fire's instant to its first request on the wire."),
        "schedule_webhook_duration_seconds":
            ("histogram", "Duration of each try, connecting included."),
        "schedule_store_errors_total": ("counter", "Store calls that failed."),
        "schedule_http_requests_total":
            ("counter", "API requests answered, by endpoint and HTTP status."),
    }

    def __init__(self):
        self._lock = threading.Lock()  # guards _counters and _histograms
        self._counters: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        self._histograms = {name: [[0] * len(self.BUCKETS), 0.0, 0] for name, (kind, _) in
                            self.HELP.items() if kind == "histogram"}

    def count(self, name: str, value: float = 1, **labels: str) -> None:
        key = (name, tuple(sorted(labels.items())))
        with self._lock:
            self._counters[key] = self._counters.get(key, 0) + value

    def observe(self, name: str, seconds: float) -> None:
        index = bisect.bisect_left(self.BUCKETS, seconds)
        with self._lock:
            buckets, _, _ = histogram = self._histograms[name]
            if index < len(buckets):
                buckets[index] += 1
            histogram[1] += seconds
            histogram[2] += 1

    def totals(self) -> tuple[dict[tuple, float], list[int]]:
        """Return a copy of the counters and of the lateness histogram's bucket counts."""
        with self._lock:
            return dict(self._counters), [*self._histograms[
                "schedule_fire_lateness_seconds"][0]]

    def render(self, gauges: dict[str, tuple[str, list[tuple[dict, float]]]]) -> str:
        """Return the exposition text: every counter and histogram, and ``gauges`` given as
        {name: (help, [(labels, value)])}."""
        with self._lock:
            counters = dict(self._counters)
            histograms = {name: ([*h[0]], h[1], h[2]) for name, h in self._histograms.items()}
        lines = []

        def series(name: str, labels: dict | tuple, value: float) -> None:
            pairs = labels.items() if isinstance(labels, dict) else labels
            text = ",".join(f'{k}="{_label(v)}"' for k, v in pairs)
            number = str(value) if isinstance(value, int) else repr(float(value))
            lines.append(f"{name}{{{text}}} {number}" if text else f"{name} {number}")

        for name, (kind, text) in self.HELP.items():
            lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}"]
            if kind == "counter":
                for (counter, labels), value in sorted(counters.items()):
                    if counter == name:
                        series(name, labels, value)
                continue
            buckets, total, count = histograms[name]
            cumulative = 0
            for bound, hits in zip(self.BUCKETS, buckets, strict=True):
                cumulative += hits
                series(f"{name}_bucket", {"le": repr(bound)}, cumulative)
            series(f"{name}_bucket", {"le": "+Inf"}, count)
            series(f"{name}_sum", {}, total)
            series(f"{name}_count", {}, count)
        for name, (text, values) in gauges.items():
            lines += [f"# HELP {name} {text}", f"# TYPE {name} gauge"]
            for labels, value in values:
                series(name, labels, value)
        return "\n".join(lines) + "\n"


def _label(value: Any) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


# Schedules ##################################################################################

_EPOCH = datetime(1970, 1, 1)
_ONE_MICROSECOND = datetime(1970, 1, 1, 0, 0, 0, 1) - _EPOCH
_GO_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_GO_DURATION = re.compile(r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)(ns|us|µs|μs|ms|s|m|h)")
_DESCRIPTORS = {
    "@yearly": "0 0 0 1 1 *",
    "@annually": "0 0 0 1 1 *",
    "@monthly": "0 0 0 1 * *",
    "@weekly": "0 0 0 * * 0",
    "@daily": "0 0 0 * * *",
    "@midnight": "0 0 0 * * *",
    "@hourly": "0 0 * * * *",
}
# (name, low, high, names) of the six fields, seconds first as robfig/cron's WithSeconds.
_FIELDS = (
    ("second", 0, 59, None),
    ("minute", 0, 59, None),
    ("hour", 0, 23, None),
    ("day-of-month", 1, 31, None),
    ("month", 1, 12, {m: i for i, m in enumerate(("jan", "feb", "mar", "apr", "may", "jun",
                                                   "jul", "aug", "sep", "oct", "nov", "dec"),
                                                  1)}),
    ("day-of-week", 0, 6, {d: i for i, d in enumerate(("sun", "mon", "tue", "wed", "thu",
                                                       "fri", "sat"))}),
)


def load_zone(name: str) -> ZoneInfo:
    """Return the ZoneInfo for an IANA name; raise ScheduleError if there is none."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise ScheduleError(f"unknown time zone {name!r}") from None


def _utc_offset(zone: ZoneInfo, t: float) -> float:
    return datetime.fromtimestamp(t, zone).utcoffset().total_seconds()


def _wall_offset(zone: ZoneInfo, wall: datetime) -> float:
    """Return the UTC offset of the FIRST occurrence of a naive wall time in the zone."""
    return wall.replace(tzinfo=zone, fold=0).utcoffset().total_seconds()


@functools.lru_cache(maxsize=4096)
def _offset_changes(zone: ZoneInfo, year: int) -> tuple[float, ...]:
    """Return the instants of a UTC year at which the zone's UTC offset changes (the first
    second of each new offset). Found once per zone and year: weekly steps, so that two
    changes in a year (spring and autumn) are both seen, then halving to the second."""
    start = calendar.timegm((year, 1, 1, 0, 0, 0))
    end = calendar.timegm((year + 1, 1, 1, 0, 0, 0))
    changes, low, offset = [], start - 1, _utc_offset(zone, start - 1)
    while low < end - 1:
        high = min(low + 7 * 86400, end - 1)
        if _utc_offset(zone, high) != offset:
            lo, hi = low, high
            while hi - lo > 1:  # zone transitions fall on whole seconds
                mid = (lo + hi) // 2
                if _utc_offset(zone, mid) == offset:
                    lo = mid
                else:
                    hi = mid
            changes.append(float(hi))
            low, offset = hi, _utc_offset(zone, hi)
        else:
            low = high
    return tuple(changes)


def _first_offset_change(zone: ZoneInfo, t: float, until: float) -> float | None:
    """Return the first instant in (t, until] where the zone's UTC offset changes, or None."""
    year = time.gmtime(math.floor(t)).tm_year
    while True:
        changes = _offset_changes(zone, year)
        i = bisect.bisect_right(changes, t)
        if i < len(changes):
            return changes[i] if changes[i] <= until else None
        if calendar.timegm((year + 1, 1, 1, 0, 0, 0)) > until:
            return None
        year += 1


class CronSchedule:
    """A parsed cron_time in a zone, answering "when is the next fire after instant t?".

    Daylight-saving policy (Vixie cron's, which users expect; neither robfig nor croniter do it):
    a wall time that a spring-forward gap skips fires once, at the first instant after the gap;
    a wall time that a fall-back repeats fires once, at its first occurrence; but a schedule that
    covers every hour (``*`` in the hour field) follows real time, so it keeps its spacing
    through both changes. Instants are UNIX seconds (floats).
    """

    def __init__(self, expression: str, zone: ZoneInfo, every_hour: bool):
        self.expression = expression  # croniter's form, seconds first
        self.zone = zone
        self.every_hour = every_hour
        self._cron = croniter(expression, _EPOCH, second_at_beginning=True)
        # Entries with equal schedules share this object, and fire at the same instants: the
        # last answer serves them all (see next_fire).
        self._memo: tuple[int, tuple[float, str | None]] | None = None
        self._lock = threading.Lock()  # guards _cron (stateful) and _memo

    def _wall_next(self, wall: datetime) -> datetime:
        """Return the first wall time matching the expression strictly after ``wall``."""
        self._cron.set_current(wall, force=True)
        return self._cron.get_next(datetime)

    def _instant(self, wall: datetime, offset: float) -> float:
        return (wall - _EPOCH).total_seconds() - offset

    def next_after(self, t: float) -> float:
        """Return the first fire instant strictly after ``t``.

        Raises ScheduleError if the expression matches no date (e.g. 30 February).
        """
        return self.next_fire(t)[0]

    def next_fire(self, t: float) -> tuple[float, str | None]:
        """Return the first fire instant strictly after ``t`` and what daylight saving did
        to it: None, "moved" (its wall time was skipped by a spring-forward), "merged" (it
        stands for several wall times: runs in a gap, or both passes of a repeated hour), or
        "repeated" (the second pass of a repeated wall time, fired by an every-hour
        schedule). Raises ScheduleError if the expression matches no date.
        """
        # Fires and zone changes fall on whole seconds, so the answer for t is the answer for
        # the whole second below it. And if the first fire after second s is f, it is also
        # the first after any second in [s, f): the memo holds for that whole span. So 1,000
        # every-second entries compute one answer a second, and 100,000 yearly entries
        # loaded with put times spread over months compute a handful, not one each.
        second = math.floor(t)
        with self._lock:
            memo = self._memo
            if memo is None or not memo[0] <= second < memo[1][0]:
                # Equal answers widen the span down to ``second``; others replace it.
                memo = self._memo = (second, self._next_fire(second))
            return memo[1]

    def _next_fire(self, t: int) -> tuple[float, str | None]:
        zone = self.zone
        start, inclusive = float(t), False
        while True:
            local = datetime.fromtimestamp(start, zone)
            offset = local.utcoffset().total_seconds()
            wall = local.replace(tzinfo=None, fold=0)
            if inclusive:
                wall -= _ONE_MICROSECOND
            try:
                candidate_wall = self._wall_next(wall)
            except CroniterError:
                raise ScheduleError("cron_time matches no date") from None
            candidate = self._instant(candidate_wall, offset)
            change = _first_offset_change(zone, start, candidate)
            if change is None:
                first_offset = _wall_offset(zone, candidate_wall)
                second_pass = self._instant(candidate_wall, first_offset) < candidate
                if second_pass and not self.every_hour:
                    # A fixed-time wall that a fall-back repeats fires at its first pass only.
                    start, inclusive = candidate, False
                    continue
                if second_pass:
                    return candidate, "repeated"
                repeats = first_offset != candidate_wall.replace(
                    tzinfo=zone, fold=1).utcoffset().total_seconds()
                return candidate, "merged" if repeats and not self.every_hour else None
            after = _utc_offset(zone, change)
            wall_before = datetime.fromtimestamp(change + offset, UTC).replace(tzinfo=None)
            wall_after = datetime.fromtimestamp(change + after, UTC).replace(tzinfo=None)
            if after > offset:  # spring forward: walls [wall_before, wall_after) never happen
                if candidate_wall < wall_after and not self.every_hour:
                    # A run at wall_after itself lands on the same instant: merged too.
                    several = self._wall_next(candidate_wall) <= wall_after
                    return change, "merged" if several else "moved"
                # An every-hour schedule follows real time: the skipped walls are skipped.
                start, inclusive = change, True
            else:  # fall back: walls [wall_after, wall_before) happen twice
                start, inclusive = change, True
                if not self.every_hour:
                    # Skip the repeated walls: continue from the wall the clock was at.
                    start = change + (wall_before - wall_after).total_seconds()


class EverySchedule:
    """``@every <duration>``: fires every ``seconds`` of real time, counted from ``anchor``."""

    every_hour = True

    def __init__(self, seconds: float, anchor: float):
        self.seconds = seconds
        self.anchor = anchor

    def next_after(self, t: float) -> float:
        """Return the first instant anchor + k*seconds (k >= 1) strictly after ``t``."""
        steps = max(0, math.floor((t - self.anchor) / self.seconds)) + 1
        instant = self.anchor + steps * self.seconds
        return instant if instant > t else instant + self.seconds

    def next_fire(self, t: float) -> tuple[float, None]:
        """Return next_after(t) and None: real time knows no daylight saving."""
        return self.next_after(t), None


def _parse_go_duration(text: str) -> float:
    if not text or _GO_DURATION.sub("", text) != "":
        raise ScheduleError(f"@every needs a duration like 5s, 1m30s or 1h, not {text!r}")
    total = sum(float(number) * _GO_UNITS[unit] for number, unit in _GO_DURATION.findall(text))
    if not total <= MAX_EVERY:
        raise ScheduleError(f"@every {text} is longer than {MAX_EVERY // 3600:.0f}h")
    # robfig/cron: under one second becomes one second, and fractions of a second are dropped.
    return float(max(1, math.floor(total)))


def _parse_field(text: str, index: int) -> str:
    """Check one field with robfig/cron's rules and return it in croniter's numeric form."""
    name, low, high, names = _FIELDS[index]

    def number(token: str) -> int:
        lowered = token.lower()
        if names and lowered in names:
            return names[lowered]
        if not (token.isascii() and token.isdigit()):
            raise ScheduleError(f"{name} field: {token!r} is not a number"
                                + (" or a name" if names else ""))
        value = int(token)
        if not low <= value <= high:
            raise ScheduleError(f"{name} field: {value} is out of range {low}-{high}")
        return value

    parts = []
    for item in text.split(","):
        range_part, slash, step_part = item.partition("/")
        if slash:
            if not (step_part.isascii() and step_part.isdigit()) or int(step_part) == 0:
                raise ScheduleError(f"{name} field: step {step_part!r} must be a positive number")
            step = int(step_part)
        else:
            step = 1
        if range_part in ("*", "?"):
            first, last = low, high
            if step == 1:
                parts.append("*")
                continue
        elif "-" in range_part:
            first_text, _, last_text = range_part.partition("-")
            first, last = number(first_text), number(last_text)
            if first > last:
                raise ScheduleError(f"{name} field: range {range_part!r} runs backwards")
        else:
            first = number(range_part)
            last = high if slash else first  # robfig: "N/S" means N through the maximum, step S
        parts.append(f"{first}-{last}/{step}" if step > 1 else
                     (str(first) if first == last else f"{first}-{last}"))
    return ",".join(parts)


def parse_schedule(cron_time: str, zone: ZoneInfo, anchor: float = 0.0):
    """Parse a cron_time the way the original (robfig/cron with seconds) does, and more.

    Accepted: six fields seconds first; five standard fields (second 0); the descriptors
    @yearly @annually @monthly @weekly @daily @midnight @hourly; ``@every <Go duration>``
    counted from ``anchor``; an optional ``CRON_TZ=<zone> `` or ``TZ=<zone> `` prefix that
    overrides ``zone``. Returns a CronSchedule or an EverySchedule; raises ScheduleError with
    a message saying what is wrong.
    """
    if not isinstance(cron_time, str):
        raise ScheduleError("must be a string")
    text = cron_time.strip()
    if text.startswith(("CRON_TZ=", "TZ=")):
        prefix, _, text = text.partition(" ")
        zone = load_zone(prefix.partition("=")[2])
        text = text.strip()
    if not text:
        raise ScheduleError("is empty")
    if text.startswith("@"):
        if text.startswith("@every"):
            return EverySchedule(_parse_go_duration(text[len("@every"):].strip()), anchor)
        if text not in _DESCRIPTORS:
            raise ScheduleError(f"unknown descriptor {text!r}")
        text = _DESCRIPTORS[text]
    fields = text.split()
    if len(fields) == 5:
        fields.insert(0, "0")
    if len(fields) != 6:
        raise ScheduleError(f"needs 6 fields (second minute hour day month weekday) or 5, "
                            f"not {len(fields)}")
    expression = " ".join(_parse_field(field, i) for i, field in enumerate(fields))
    try:
        schedule = CronSchedule(expression, zone, every_hour=expression.split()[2] == "*")
        schedule.next_after(time.time())
    except CroniterError as exc:
        raise ScheduleError(str(exc)) from None
    return schedule


def missed_instants(schedule, after: float, until: float
                    ) -> tuple[float, float, int, bool] | None:
    """Return (first, last, count, more) of the schedule's instants in (after, until], or
    None when there is none. Counted one by one up to MISSED_COUNT_LIMIT (``more``: there
    were more); the last is then found by looking back from ``until`` in doubling steps,
    so a month of every-second fires costs a few dozen next_after() calls, not millions."""
    first = schedule.next_after(after)
    if first > until:
        return None
    last, count = first, 1
    while count < MISSED_COUNT_LIMIT:
        following = schedule.next_after(last)
        if following > until:
            return first, last, count, False
        last, count = following, count + 1
    if schedule.next_after(last) > until:
        return first, last, count, False
    step = 1.0
    while True:  # some instant lies in (until - step, until]: walk to the last of them
        candidate = schedule.next_after(max(last, until - step))
        if candidate <= until:
            while (following := schedule.next_after(candidate)) <= until:
                candidate = following
            return first, candidate, count, True
        step *= 2


class Schedules:
    """Parsed schedules, shared by everything that asks: validation, the scheduler, /preview.

    Keyed by what makes one schedule differ from another: the cron_time, the zone, and for
    ``@every`` the anchor, which is handed out bound to each entry's. Entries with equal
    cron schedules share one object (and its memo of the next instant). Weak: a schedule no
    entry uses any more is freed.
    """

    def __init__(self):
        self._lock = threading.Lock()  # guards _parsed
        self._parsed: weakref.WeakValueDictionary = weakref.WeakValueDictionary()

    def get(self, cron_time: Any, zone_name: str, anchor: float = 0.0):
        """Return the schedule of ``cron_time`` in the zone; raise ScheduleError as
        parse_schedule() does. Parsed outside the lock: a slow parse stalls no other caller."""
        if not isinstance(cron_time, str):
            raise ScheduleError("must be a string")
        with self._lock:
            schedule = self._parsed.get((cron_time, zone_name))
        if schedule is None:
            schedule = parse_schedule(cron_time, load_zone(zone_name), anchor)
            if isinstance(schedule, EverySchedule):
                return schedule  # cheap to parse; each entry has its own anchor
            with self._lock:
                schedule = self._parsed.setdefault((cron_time, zone_name), schedule)
        return schedule


# Validation #################################################################################

@dataclasses.dataclass(slots=True)
class Entry:
    """One webhook of a task. ``anchor`` is when an @every entry was put (UNIX seconds);
    ``retry`` holds the retry fields the client gave (None: the configured default);
    ``timeout`` the seconds a try may take (None: [webhook] timeout)."""

    cron_time: str
    url: str
    headers: dict | None = None
    body: Any = None
    anchor: float = 0.0
    retry: dict | None = None
    overlap: str = "allow"
    method: str = "POST"
    timeout: float | None = None
    running: bool = True  # False: this entry alone is paused (/running with a key)
    misfire: str = "skip"
    misfire_grace: float | None = None  # None: [webhook] misfire_grace

    def public(self) -> dict:
        view = {"cron_time": self.cron_time, "url": self.url, "headers": self.headers,
                "body": self.body}
        # The new fields appear only when used: the original's clients see its exact shape.
        if self.retry is not None:
            view["retry"] = self.retry
        if self.overlap != "allow":
            view["overlap"] = self.overlap
        if self.method != "POST":
            view["method"] = self.method
        if self.timeout is not None:
            view["timeout"] = self.timeout
        if not self.running:
            view["running"] = False
        if self.misfire != "skip":
            view["misfire"] = self.misfire
        if self.misfire_grace is not None:
            view["misfire_grace"] = self.misfire_grace
        return view

    def retry_policy(self, default_attempts: int) -> dict:
        """Return the complete retry policy: the given fields over the defaults."""
        return {**RETRY_DEFAULTS, "attempts": default_attempts, **(self.retry or {})}


@dataclasses.dataclass(slots=True)
class Task:
    """A named set of entries sharing a time zone and a running state."""

    identity: str
    time_zone: str
    start: bool
    entries: dict[str, Entry]

    def public(self) -> dict:
        return {"identity": self.identity, "time_zone": self.time_zone, "start": self.start,
                "entries": {key: entry.public() for key, entry in self.entries.items()}}

    def document(self, last: dict[str, float] | None = None,
                 accounted: dict[str, float] | None = None) -> dict:
        """Return what a store keeps: the public task, when each entry was put ("anchors":
        @every counts from it, and it tells an entry's fires from a replaced one's), the
        last fire times, and up to when missed fires were accounted for ("accounted")."""
        doc = self.public()
        doc["anchors"] = {k: e.anchor for k, e in self.entries.items()}
        doc["last"] = dict(last or {})
        doc["accounted"] = dict(accounted or {})
        return doc

    @classmethod
    def from_document(cls, doc: dict) -> Task:
        anchors = doc.get("anchors") or {}
        # Interned: a store of 100,000 tasks repeats a few expressions, zones and URLs.
        entries = {key: Entry(sys.intern(e["cron_time"]), sys.intern(e["url"]),
                              e.get("headers"), e.get("body"), float(anchors.get(key, 0.0)),
                              e.get("retry"), sys.intern(e.get("overlap", "allow")),
                              sys.intern(e.get("method", "POST")), e.get("timeout"),
                              bool(e.get("running", True)), sys.intern(e.get("misfire", "skip")),
                              e.get("misfire_grace"))
                   for key, e in doc["entries"].items()}
        return cls(doc["identity"], sys.intern(doc["time_zone"]), bool(doc["start"]), entries)


def carries_over(old: Task | None, task: Task, key: str) -> bool:
    """Return True if entry ``key`` of ``task`` keeps the schedule it had in ``old`` (same
    cron_time, same zone): it then keeps its @every anchor, its next fire and its last."""
    before = old.entries.get(key) if old else None
    return (before is not None and old.time_zone == task.time_zone
            and before.cron_time == task.entries[key].cron_time)


@dataclasses.dataclass(frozen=True, slots=True)
class Field:
    """One field of a request object: its kind, limits and meaning. Validation takes every
    limit and choice from here, and field_schema() describes the field from here (issue
    10): one table, so the published document cannot drift from what is checked.

    ``kind``: name (a string of ``low``-``high`` characters, no control characters), zone
    (an IANA name), cron (a cron_time), url (http or https with a host, at most ``high``
    characters), boolean, number or whole (from ``low`` to ``high``; ``setting`` names the
    Config field that gives ``high`` instead), choice (one of ``choices``), object (its
    fields are REQUEST_FIELDS[``of``]), map (``low``-``high`` keys, each a name of at most
    ``keys`` characters, to objects of REQUEST_FIELDS[``of``]), headers (at most ``high``
    header names to Latin-1 strings), names (an array of at most ``high`` names of at most
    ``keys`` characters), any (any JSON value). ``null``: null counts as absent; ``empty``:
    so does "" (a /search filter).
    """

    kind: str
    doc: str = ""
    required: bool = False
    low: float | None = None
    high: float | None = None
    choices: tuple[str, ...] = ()
    default: Any = None
    null: bool = False
    empty: bool = False
    of: str = ""
    keys: int = 0
    setting: str = ""


_IDENTITY = Field("name", "the task's name", required=True, low=1, high=MAX_IDENTITY)
_INSTANT = "UNIX seconds"

# The fields of each request object, by where it stands. Anything else is refused, naming the
# nearest known field, unless [server] ignore_unknown_fields brings back the original's
# leniency. An entry may carry next_date and last_date: /get's reply put back is a valid /put.
REQUEST_FIELDS: dict[str, dict[str, Field]] = {
    "/put": {
        "identity": _IDENTITY,
        "time_zone": Field("zone", "IANA time zone of the entries", default="UTC"),
        "start": Field("boolean", "fire (true) or keep paused (false)", default=False),
        "entries": Field("map", "the webhooks, by a key that names each", required=True,
                         low=1, high=MAX_ENTRIES, of="/put entries.*", keys=MAX_IDENTITY),
    },
    "/put entries.*": {
        "cron_time": Field("cron", "when it fires: six fields (seconds first) or five, "
                                   "@descriptors, @every <duration>, CRON_TZ= prefix",
                           required=True),
        "url": Field("url", "where the webhook goes", required=True, high=MAX_URL),
        "method": Field("choice", "the webhook's method; GET and DELETE take no body",
                        choices=METHODS, default="POST"),
        "headers": Field("headers", "header name to value, sent with the webhook; not Host, "
                                    "Content-Length, Transfer-Encoding, Connection or "
                                    "X-Schedule-*", high=MAX_HEADERS, null=True),
        "body": Field("any", "sent as JSON; null: no body (nested at most "
                             f"{MAX_JSON_DEPTH} levels)", null=True),
        "timeout": Field("number", "seconds a try may take, all included; null: [webhook] "
                                   "timeout", low=0.001, setting="max_timeout", null=True),
        "retry": Field("object", "retries of a failed fire; null: [webhook] retry_attempts",
                       of="/put entries.*.retry", null=True),
        "overlap": Field("choice", "when due while its previous fire still runs",
                         choices=OVERLAP_POLICIES, default="allow"),
        "misfire": Field("choice", "what to do with fires missed while down or paused",
                         choices=MISFIRE_POLICIES, default="skip"),
        "misfire_grace": Field("number", "seconds a missed fire may be late to be sent; null: "
                                         "[webhook] misfire_grace", low=0, high=MAX_EVERY,
                               null=True),
        "running": Field("boolean", "false: this entry alone is paused", default=True),
        "next_date": Field("any", "ignored (from /get's reply)"),
        "last_date": Field("any", "ignored (from /get's reply)"),
    },
    "/put entries.*.retry": {
        name: Field("whole" if name == "attempts" else "number", doc, low=low, high=high,
                    default=RETRY_DEFAULTS[name] if name != "attempts" else None)
        for (name, (low, high)), doc in zip(RETRY_LIMITS.items(), (
            "retries after the first try; default [webhook] retry_attempts",
            "seconds before the first retry, doubling each time",
            "the most seconds any retry waits",
            "seconds after the scheduled instant past which no try runs"), strict=True)},
    "/get": {"identity": _IDENTITY},
    "/all": {},
    "/lists": {"identity": Field("names", "identities; unknown ones are left out",
                                 required=True, high=MAX_LISTS, keys=MAX_IDENTITY)},
    "/running": {
        "identity": _IDENTITY,
        "key": Field("name", "one entry alone; null: the whole task", low=1,
                     high=MAX_IDENTITY, null=True),
        "running": Field("boolean", "resume (true) or pause (false)", required=True),
    },
    "/delete": {"identity": _IDENTITY},
    "/search": {
        "type": Field("choice", "the kind of log; all when absent", choices=LOG_TYPES,
                      null=True, empty=True),
        "identity": Field("name", "exact match", low=1, high=MAX_IDENTITY, null=True,
                          empty=True),
        "key": Field("name", "exact match on a fire's entry", low=1, high=MAX_IDENTITY,
                     null=True, empty=True),
        "scheduled": Field("number", f"exact match on a fire's instant, {_INSTANT}", low=0,
                           high=MAX_INSTANT, null=True),
        "time": Field("object", "a span of log times", of="/search time", null=True),
        "limit": Field("whole", "how many logs, newest first", low=1, high=MAX_SEARCH_LIMIT,
                       default=20, null=True),
        "skip": Field("whole", f"offset; skip + limit at most {MAX_SEARCH_WINDOW}", low=0,
                      high=MAX_SEARCH_WINDOW, default=0, null=True),
    },
    "/search time": {
        side: Field("number", f"{_INSTANT}, {doc}", low=-MAX_INSTANT, high=MAX_INSTANT, null=True)
        for side, doc in (("gte", "at or after"), ("lte", "at or before"))},
    "/clear": {"identity": _IDENTITY},
    "/retry": {
        "identity": _IDENTITY,
        "key": Field("name", "the entry", required=True, low=1, high=MAX_IDENTITY),
        "scheduled": Field("number", f"the failed fire's instant, {_INSTANT}", required=True,
                           low=0, high=MAX_INSTANT),
    },
    "/trigger": {
        "identity": _IDENTITY,
        "key": Field("name", "the entry", required=True, low=1, high=MAX_IDENTITY),
    },
    "/preview": {
        "cron_time": Field("cron", "the schedule", required=True),
        "time_zone": Field("zone", "IANA time zone", default="UTC"),
        "count": Field("whole", "how many fires", low=1, high=MAX_PREVIEW, default=10),
        "after": Field("number", f"{_INSTANT}; null: now", low=0, high=MAX_INSTANT, null=True),
    },
}


def check_fields(value: dict, where: str, prefix: str = "", strict: bool = True) -> None:
    """Refuse a field of ``value`` that REQUEST_FIELDS[where] does not list: ValidationError
    names it (after ``prefix``) and the nearest known field. Nothing when not ``strict``."""
    known = REQUEST_FIELDS[where]
    unknown = sorted(name for name in value if name not in known) if strict else ()
    if unknown:
        raise ValidationError(f"{prefix}{unknown[0]}",
                              "is not a known field" + nearest(unknown[0], known))


# JSON Schema (2020-12, as OpenAPI 3.1 has it) of the table above, for GET /openapi.json. The
# patterns are the checks above written as regular expressions that JSON Schema tools read.
_NO_CONTROL = r"^[^\u0000-\u001f\u007f]*$"
_HTTP_URL = r"^[Hh][Tt][Tt][Pp][Ss]?://[^\u0000-\u0020\u007f]+$"
_LATIN1_LINE = r"^[\u0001-\u0009\u000b\u000c\u000e-\u00ff]*$"  # no CR, LF or NUL
_EXAMPLES = {"zone": ["UTC", "Asia/Shanghai", "America/New_York"],
             "cron": ["*/10 * * * * *", "0 30 9 * * mon-fri", "30 9 * * *", "@daily",
                      "@every 1h30m", "CRON_TZ=Europe/Paris 0 0 3 * * *"],
             "url": ["http://127.0.0.1:8080/hook"]}


def _any_case(name: str) -> str:
    return "".join(f"[{c.upper()}{c.lower()}]" if c.isalpha() else c for c in name)


def _name_schema(low: int, high: int) -> dict:
    return {"type": "string", "minLength": low, "maxLength": high, "pattern": _NO_CONTROL}


def field_schema(spec: Field, strict: bool = True, config: Config | None = None) -> dict:
    """Return the JSON Schema of a Field: the limits validation checks, the default, and
    null where null counts as absent. ``strict``: objects refuse unknown fields
    (additionalProperties false); ``config`` gives the limits that are settings."""
    high = getattr(config or Config(), spec.setting) if spec.setting else spec.high
    kind = spec.kind
    if kind == "name":
        schema = _name_schema(0 if spec.empty else int(spec.low), int(high))
    elif kind in ("zone", "cron"):
        schema = {"type": "string", "minLength": 1, "examples": _EXAMPLES[kind]}
    elif kind == "url":
        schema = {"type": "string", "maxLength": int(high), "pattern": _HTTP_URL,
                  "examples": _EXAMPLES[kind]}
    elif kind == "boolean":
        schema = {"type": "boolean"}
    elif kind in ("number", "whole"):
        schema = {"type": "number" if kind == "number" else "integer", "minimum": spec.low,
                  "maximum": high}
    elif kind == "choice":
        schema = {"type": "string", "enum": [*spec.choices, *([""] if spec.empty else [])]}
    elif kind == "object":
        schema = request_schema(spec.of, strict, config)
    elif kind == "map":
        schema = {"type": "object", "minProperties": spec.low, "maxProperties": high,
                  "propertyNames": _name_schema(1, spec.keys),
                  "additionalProperties": request_schema(spec.of, strict, config)}
    elif kind == "headers":
        reserved = "|".join(_any_case(name) for name in sorted(FORBIDDEN_HEADERS))
        schema = {"type": "object", "maxProperties": int(high),
                  "propertyNames": {"pattern": HEADER_NAME.pattern, "not": {
                      "pattern": f"^(?:{reserved}|{_any_case('x-schedule-')}.*)$"}},
                  "additionalProperties": {"type": "string", "pattern": _LATIN1_LINE}}
    elif kind == "names":
        schema = {"type": "array", "maxItems": int(high), "items": _name_schema(1, spec.keys)}
    else:  # any JSON value
        schema = {}
    if spec.null and kind != "any":
        schema = {"anyOf": [schema, {"type": "null"}]}
    if spec.default is not None:
        schema["default"] = spec.default
    return {"description": spec.doc, **schema} if spec.doc else schema


def request_schema(where: str, strict: bool = True, config: Config | None = None) -> dict:
    """Return the JSON Schema of request object REQUEST_FIELDS[where] (see field_schema)."""
    fields = REQUEST_FIELDS[where]
    schema = {"type": "object",
              "properties": {name: field_schema(spec, strict, config)
                             for name, spec in fields.items()},
              "additionalProperties": not strict}
    required = [name for name, spec in fields.items() if spec.required]
    return {**schema, "required": required} if required else schema


def _reject_constant(name: str) -> None:
    """Refuse NaN and Infinity, which Python's json reads but JSON does not have."""
    raise ValueError(f"{name} is not valid JSON")


def _check_json(value: Any, field: str) -> None:
    """Refuse JSON nested deeper than MAX_JSON_DEPTH and strings that are not valid Unicode."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise ValidationError(field, f"is nested deeper than {MAX_JSON_DEPTH} levels")
        if isinstance(item, dict):
            stack.extend((k, depth + 1) for k in item)
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)
        elif isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                raise ValidationError(field, "contains an unpaired surrogate") from None


def _name(value: Any, field: str, limit: int = MAX_IDENTITY) -> str:
    if not isinstance(value, str) or not value:
        raise ValidationError(field, "must be a non-empty string")
    if len(value) > limit:
        raise ValidationError(field, f"must be at most {limit} characters")
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise ValidationError(field, "must not contain control characters")
    return value


def _bool(value: Any, field: str) -> bool:
    if not isinstance(value, bool):
        raise ValidationError(field, "must be true or false")
    return value


def _url(value: Any, field: str, limit: int = MAX_URL) -> str:
    if not isinstance(value, str) or not value:
        raise ValidationError(field, "must be a non-empty string")
    if len(value) > limit:
        raise ValidationError(field, f"must be at most {limit} characters")
    if any(ord(c) <= 32 or ord(c) == 127 for c in value):
        raise ValidationError(field, "must not contain spaces or control characters")
    try:
        parts = urllib.parse.urlsplit(value)
        _ = parts.port  # raises ValueError for a port that is not a number or out of range
    except ValueError as exc:
        raise ValidationError(field, f"is not a valid URL ({exc})") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValidationError(field, "must be an http or https URL with a host")
    return value


def reserved_header(name: str) -> bool:
    """Return True for a header name the service sets itself (FORBIDDEN_HEADERS, X-Schedule-*)."""
    lowered = name.lower()
    return lowered in FORBIDDEN_HEADERS or lowered.startswith("x-schedule-")


def _headers(value: Any, field: str) -> dict | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ValidationError(field, "must be an object of header names to string values")
    limit = int(REQUEST_FIELDS["/put entries.*"]["headers"].high)
    if len(value) > limit:
        raise ValidationError(field, f"must have at most {limit} headers")
    for name, text in value.items():
        if not HEADER_NAME.fullmatch(name):
            raise ValidationError(field, f"{name!r} is not a valid header name")
        if reserved_header(name):
            raise ValidationError(f"{field}.{name}", "is set by the service and cannot be given")
        if not isinstance(text, str):
            raise ValidationError(f"{field}.{name}", "must be a string")
        if any(c in text for c in "\r\n\0"):
            raise ValidationError(f"{field}.{name}", "must not contain line breaks")
        if not all(ord(c) < 256 for c in text):  # HTTP sends header values as Latin-1
            raise ValidationError(f"{field}.{name}", "must be ASCII or Latin-1 text")
    return value


def validate_task(request: Any, now: float, schedules: Schedules | None = None,
                  strict: bool = True, max_timeout: float = Config.max_timeout) -> Task:
    """Turn a /put request into a Task, or raise ValidationError naming the field.

    ``now`` becomes the anchor of @every entries. ``start`` defaults to false and
    ``time_zone`` to "UTC", as the original's zero values. Cron times are parsed through
    ``schedules``, so that the scheduler finds them parsed. ``strict``: unknown fields are
    refused (check_fields). An entry's ``timeout`` may be up to ``max_timeout`` seconds.
    """
    schedules = schedules or Schedules()
    if not isinstance(request, dict):
        raise ValidationError("", "request body must be a JSON object")
    check_fields(request, "/put", strict=strict)
    identity = _take(request, "/put", "identity")
    zone_name = _take(request, "/put", "time_zone")
    if not isinstance(zone_name, str) or not zone_name:
        raise ValidationError("time_zone", "must be an IANA time zone name like Asia/Shanghai")
    try:
        load_zone(zone_name)
    except ScheduleError as exc:
        raise ValidationError("time_zone", str(exc)) from None
    start = _take(request, "/put", "start")
    entries_in = request.get("entries")
    limits = REQUEST_FIELDS["/put"]["entries"]
    if not isinstance(entries_in, dict) or len(entries_in) < limits.low:
        raise ValidationError("entries", "must be a non-empty object of entries")
    if len(entries_in) > limits.high:
        raise ValidationError("entries", f"must have at most {limits.high} entries")
    entries = {}
    for key, spec in entries_in.items():
        field = f"entries.{key}"
        _name(key, f"entries key {key!r}", limits.keys)
        if not isinstance(spec, dict):
            raise ValidationError(field, "must be an object with cron_time and url")
        check_fields(spec, "/put entries.*", f"{field}.", strict)
        cron_time = spec.get("cron_time")
        try:
            schedules.get(cron_time, zone_name, now)
        except ScheduleError as exc:
            raise ValidationError(f"{field}.cron_time", str(exc)) from None
        _check_json(spec.get("body"), f"{field}.body")
        at = "/put entries.*"
        overlap = _take(spec, at, "overlap", f"{field}.overlap")
        method = _take(spec, at, "method", f"{field}.method")
        if method in BODILESS_METHODS and spec.get("body") is not None:
            raise ValidationError(f"{field}.body", f"a {method} webhook is sent without a body")
        timeout = _take(spec, at, "timeout", f"{field}.timeout", max_timeout)
        grace = _take(spec, at, "misfire_grace", f"{field}.misfire_grace")
        entries[key] = Entry(cron_time, _take(spec, at, "url", f"{field}.url"),
                             _headers(spec.get("headers"), f"{field}.headers"),
                             spec.get("body"), anchor=now,
                             retry=_retry(spec.get("retry"), f"{field}.retry", strict),
                             overlap=overlap, method=method,
                             timeout=None if timeout is None else float(timeout),
                             running=_take(spec, at, "running", f"{field}.running"),
                             misfire=_take(spec, at, "misfire", f"{field}.misfire"),
                             misfire_grace=None if grace is None else float(grace))
    return Task(identity, zone_name, start, entries)


def _take(request: dict, where: str, name: str, label: str = "",
          high: float | None = None) -> Any:
    """Return field ``name`` of ``request`` checked against REQUEST_FIELDS[where][name]: its
    default when absent (or null, or "", where the table counts them as absent), else the
    value, checked by kind (zone, cron, object, map, headers, names and any are left to the
    caller). ``high`` replaces the table's (a setting's value). Raises ValidationError naming
    ``label`` (the field's name by default)."""
    spec = REQUEST_FIELDS[where][name]
    label, value = label or name, request.get(name)
    if not spec.required and (name not in request or (value is None and spec.null)
                              or (value == "" and spec.empty)):
        return spec.default
    high = spec.high if high is None else high
    if spec.kind == "name":
        return _name(value, label, int(high))
    if spec.kind == "url":
        return _url(value, label, int(high))
    if spec.kind == "boolean":
        return _bool(value, label)
    if spec.kind == "choice":
        return _choice(value, label, spec.choices)
    if spec.kind == "number":
        return _number(value, label, spec.low, high)
    if spec.kind == "whole":
        return _whole(value, label, int(spec.low), int(high))
    return value


def _choice(value: Any, field: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValidationError(field, f"must be one of {', '.join(choices)}")
    return value


def _number(value: Any, field: str, low: float, high: float) -> float:
    # Comparisons first: math.isfinite() overflows on integers like 10**400.
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            not low <= value <= high:
        raise ValidationError(field, f"must be a number from {low:g} to {high:g}")
    return value


def _whole(value: Any, field: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValidationError(field, f"must be a whole number from {low} to {high}")
    return value


def _retry(value: Any, field: str, strict: bool = True) -> dict | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ValidationError(field, "must be an object with attempts, backoff, max_backoff "
                                     "and/or max_duration")
    check_fields(value, "/put entries.*.retry", f"{field}.", strict)
    fields = REQUEST_FIELDS["/put entries.*.retry"]
    value = {name: value[name] for name in fields if name in value}
    for name, spec in fields.items():
        if name in value:
            _number(value[name], f"{field}.{name}", spec.low, spec.high)
            if spec.kind == "whole" and not isinstance(value[name], int):
                raise ValidationError(f"{field}.attempts", "must be a whole number")
    return dict(value)


def validate_search(request: dict, strict: bool = True) -> dict:
    """Return the normalised /search query, or raise ValidationError naming the field."""
    check_fields(request, "/search", strict=strict)
    query: dict[str, Any] = {"type": None, "identity": None, "key": None, "scheduled": None,
                             "gte": None, "lte": None, "limit": 20, "skip": 0}
    for name in ("type", "identity", "key", "scheduled"):
        query[name] = _take(request, "/search", name)
    span = request.get("time")
    if span is not None:
        if not isinstance(span, dict):
            raise ValidationError("time", "must be an object with gte and/or lte")
        check_fields(span, "/search time", "time.", strict)
        for side in ("gte", "lte"):
            query[side] = _take(span, "/search time", side, f"time.{side}")
    for name in ("limit", "skip"):
        query[name] = _take(request, "/search", name)
    if query["skip"] + query["limit"] > MAX_SEARCH_WINDOW:
        raise ValidationError("skip", f"skip + limit must be at most {MAX_SEARCH_WINDOW}")
    return query


def make_log(kind: str, identity: str, **fields: Any) -> dict:
    """Return a log record: type, identity, time (UNIX seconds) and the given fields."""
    now = time.time()
    record = {"type": kind, "identity": identity, "time": int(now), **fields}
    record["_id"] = uuid.uuid4().hex
    record["_ts"] = now
    return record


def _public_log(record: dict) -> dict:
    return {k: v for k, v in record.items() if k not in ("_id", "_ts", "_since")}


# Stores #####################################################################################
#
# One small interface, two implementations. A store keeps task documents (Task.document())
# and log records (make_log()); it raises StoreError when it cannot do what was asked.
#
#   save_task(doc)          durable before it returns
#   delete_task(identity)   the task, its last fire times (not its logs)
#   load_tasks()            every task document, with "last" filled in from the logs' fires
#   append_logs(records)    idempotent: a record's "_id" written twice is stored once
#   search(query)           validate_search()'s query -> {"total": n, "records": [...]}
#   clear(identity)         delete that identity's logs, return how many
#   prune(before)           delete the logs older than UNIX time ``before``, return how many
#   trim(max_bytes)         delete the oldest logs while they take more than max_bytes (SQLite;
#                           a cluster bounds its own indices), return how many
#   health()                {"store": kind, "ok": bool, ...}
#   close()

def _fire_times(records: Iterable[dict]) -> dict[tuple[str, str, str], float]:
    """Return the latest scheduled instant per (identity, key, since) among fire logs.

    ``since`` (the record's "_since": when its entry was put) tells the fires of an entry
    from those of an earlier entry of the same key whose logs were still on their way when
    it was replaced: a store keeps last fires per since, and answers the current entry's.
    """
    latest: dict[tuple[str, str, str], float] = {}
    for record in records:
        if record.get("_since") is None:
            continue
        if record["type"] in ("success", "error"):
            slot, at = (record["identity"], record["key"], _since(record["_since"])), \
                record["scheduled"]
        elif record["type"] == "missed":  # accounted for up to its last instant
            slot, at = (record["identity"], record["key"],
                        _since(record["_since"]) + _MISSED), record["last"]
        else:
            continue
        latest[slot] = max(latest.get(slot, 0.0), at)
    return latest


_MISSED = "+missed"  # the since of an entry's "missed up to" mark, beside its last fire


def _since(anchor: float) -> str:
    return repr(float(anchor))


def _marks(doc: dict) -> Iterator[tuple[str, str, float]]:
    """Yield (key, since, at) of a task document's last fires and missed-up-to marks."""
    anchors = doc["anchors"]
    for field, suffix in (("last", ""), ("accounted", _MISSED)):
        for key, at in (doc.get(field) or {}).items():
            yield key, _since(anchors[key]) + suffix, at


def _read_marks(doc: dict, stored: dict[str, dict[str, float]]) -> dict:
    """Fill a task document's "last" and "accounted" from the stored {key: {since: at}}:
    the current entries' only (an entry replaced since has a new since)."""
    anchors = doc.get("anchors") or {}
    for field, suffix in (("last", ""), ("accounted", _MISSED)):
        doc[field] = {key: by_since[_since(anchors[key]) + suffix]
                      for key, by_since in stored.items()
                      if key in anchors and _since(anchors[key]) + suffix in by_since}
    return doc


def search_reply(result: dict, index: str) -> dict:
    """Shape a store's search result as Elasticsearch answers it, as the original replied."""
    return {"hits": {"total": {"value": result["total"], "relation": "eq"},
                     "max_score": None,
                     "hits": [{"_index": index, "_type": "_doc", "_id": record["_id"],
                               "_score": None, "_source": _public_log(record)}
                              for record in result["records"]]}}


class SQLiteStore:
    """The embedded default: one SQLite file in WAL mode under the data folder, for one
    process: a second process on the same folder is refused (it would fire every task a
    second time); replicas share an Elasticsearch cluster instead."""

    kind = "sqlite"
    SCHEMA = """
        CREATE TABLE IF NOT EXISTS tasks (identity TEXT PRIMARY KEY, doc TEXT NOT NULL);
        CREATE TABLE IF NOT EXISTS last_fire (identity TEXT, key TEXT, since TEXT, at REAL,
                                              PRIMARY KEY (identity, key, since));
        CREATE TABLE IF NOT EXISTS logs (seq INTEGER PRIMARY KEY, id TEXT UNIQUE NOT NULL,
            type TEXT NOT NULL, identity TEXT NOT NULL, key TEXT, scheduled REAL,
            time INTEGER NOT NULL, ts REAL NOT NULL, doc TEXT NOT NULL);
        CREATE INDEX IF NOT EXISTS logs_identity ON logs (identity, ts);
        CREATE INDEX IF NOT EXISTS logs_type ON logs (type, ts);
        CREATE INDEX IF NOT EXISTS logs_ts ON logs (ts);
    """

    def __init__(self, folder: str):
        os.makedirs(folder, exist_ok=True)
        self.path = os.path.join(folder, "schedule.db")
        self._folder_lock = self._lock_folder(folder)
        try:
            self._write = self._connect()
            self._write.executescript(self.SCHEMA)
            self._read = self._connect()
        except sqlite3.Error as exc:
            self._folder_lock.close()
            raise StoreError(f"cannot open {self.path}: {exc}") from None
        self._write_lock = threading.Lock()
        self._read_lock = threading.Lock()

    @staticmethod
    def _lock_folder(folder: str):
        """Hold an exclusive lock on <folder>/lock for the life of the store (the system
        drops it when the process ends, kill -9 included); raise StoreError if another
        process holds it."""
        import fcntl  # POSIX only, as the service is

        handle = open(os.path.join(folder, "lock"), "a+")  # noqa: SIM115 - held open
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "?"
            handle.close()
            raise StoreError(f"another schedule-api process (pid {holder}) uses the data "
                             f"folder {os.path.abspath(folder)}: two processes on one SQLite "
                             "store would fire every task twice. Give each its own --data, "
                             "or run replicas on Elasticsearch") from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        return handle

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None,
                             timeout=30)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")  # a commit is on disk before the reply: kill -9 safe
        return db

    def _writing(self, work: Callable[[sqlite3.Connection], Any]) -> Any:
        with self._write_lock:
            try:
                self._write.execute("BEGIN IMMEDIATE")
                try:
                    result = work(self._write)
                except BaseException:
                    self._write.execute("ROLLBACK")
                    raise
                self._write.execute("COMMIT")
                return result
            except sqlite3.Error as exc:
                raise StoreError(f"sqlite: {exc}") from None

    def _reading(self, sql: str, args: tuple = ()) -> list:
        with self._read_lock:
            try:
                return self._read.execute(sql, args).fetchall()
            except sqlite3.Error as exc:
                raise StoreError(f"sqlite: {exc}") from None

    def save_task(self, doc: dict, token: str = "", merge_marks: bool = False) -> None:
        text = json.dumps({k: v for k, v in doc.items() if k not in ("last", "accounted")})
        identity = doc["identity"]

        def work(db):
            db.execute("INSERT OR REPLACE INTO tasks (identity, doc) VALUES (?, ?)",
                       (identity, text))
            # The document's marks replace the stored ones: a changed entry has none.
            db.execute("DELETE FROM last_fire WHERE identity = ?", (identity,))
            db.executemany("INSERT INTO last_fire (identity, key, since, at) VALUES (?, ?, ?, ?)",
                           [(identity, *mark) for mark in _marks(doc)])
        self._writing(work)

    def delete_task(self, identity: str, token: str = "") -> None:
        def work(db):
            db.execute("DELETE FROM tasks WHERE identity = ?", (identity,))
            db.execute("DELETE FROM last_fire WHERE identity = ?", (identity,))
        self._writing(work)

    def load_tasks(self) -> Iterator[dict]:
        last: dict[str, dict[str, float]] = {}
        for identity, key, since, at in self._reading(
                "SELECT identity, key, since, at FROM last_fire"):
            last.setdefault(identity, {}).setdefault(key, {})[since] = at
        # Streamed, so 100,000 documents never sit in memory at once, on a connection of its
        # own, so /health (which reads) answers meanwhile.
        try:
            db = self._connect()
            try:
                for identity, text in db.execute("SELECT identity, doc FROM tasks"):
                    yield _read_marks(json.loads(text), last.get(identity, {}))
            finally:
                db.close()
        except sqlite3.Error as exc:
            raise StoreError(f"sqlite: {exc}") from None

    def append_logs(self, records: list[dict]) -> None:
        rows = [(r["_id"], r["type"], r["identity"], r.get("key"), r.get("scheduled"),
                 r["time"], r["_ts"], json.dumps(_public_log(r))) for r in records]
        fires = [(i, k, since, at) for (i, k, since), at in _fire_times(records).items()]

        def work(db):
            db.executemany("INSERT OR REPLACE INTO logs (id, type, identity, key, scheduled, "
                           "time, ts, doc) VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)
            db.executemany("INSERT INTO last_fire (identity, key, since, at) SELECT ?, ?, ?, ? "
                           "WHERE EXISTS (SELECT 1 FROM tasks WHERE identity = ?1) ON CONFLICT "
                           "(identity, key, since) DO UPDATE SET at = max(at, excluded.at)",
                           fires)
        self._writing(work)

    def search(self, query: dict) -> dict:
        where, args = [], []
        for column in ("type", "identity", "key", "scheduled"):
            if query[column] is not None:
                where.append(f"{column} = ?")
                args.append(query[column])
        if query["gte"] is not None:
            where.append("time >= ?")
            args.append(query["gte"])
        if query["lte"] is not None:
            where.append("time <= ?")
            args.append(query["lte"])
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        total = self._reading(f"SELECT count(*) FROM logs {clause}", tuple(args))[0][0]
        rows = self._reading(f"SELECT id, doc FROM logs {clause} ORDER BY ts DESC, seq DESC "
                             f"LIMIT ? OFFSET ?", (*args, query["limit"], query["skip"]))
        return {"total": total, "records": [{**json.loads(doc), "_id": id_} for id_, doc in rows]}

    def clear(self, identity: str) -> int:
        return self._writing(lambda db: db.execute(
            "DELETE FROM logs WHERE identity = ?", (identity,)).rowcount)

    def prune(self, before: float) -> int:
        deleted = 0
        while True:  # in slices, so that writers never wait long for the lock
            count = self._writing(lambda db: db.execute(
                "DELETE FROM logs WHERE seq IN (SELECT seq FROM logs WHERE time < ? LIMIT 5000)",
                (before,)).rowcount)
            deleted += count
            if count < 5000:
                return deleted

    def used_bytes(self) -> int:
        """Return the bytes the database's pages in use take (free pages are reused)."""
        (pages,), (free,), (size,) = (self._reading(f"PRAGMA {name}")[0] for name in
                                      ("page_count", "freelist_count", "page_size"))
        return (pages - free) * size

    def trim(self, max_bytes: int) -> int:
        # The database (logs, tasks, indexes) over the bound: its oldest logs go, down to
        # 90% of it, so that it is not trimmed again at once; in slices sized by the share
        # to delete, at most 5,000 rows a transaction.
        deleted = 0
        if self.used_bytes() <= max_bytes:
            return 0
        while (used := self.used_bytes()) > max_bytes * 0.9:
            rows = self._reading("SELECT count(*) FROM logs")[0][0]
            share = (used - max_bytes * 0.9) / used
            limit = min(5000, int(rows * share) + 1)
            count = self._writing(lambda db, n=limit: db.execute(
                "DELETE FROM logs WHERE seq IN (SELECT seq FROM logs ORDER BY seq LIMIT ?)",
                (n,)).rowcount)
            deleted += count
            if not count:
                break
        return deleted

    def health(self) -> dict:
        try:
            self._reading("SELECT 1")
            return {"store": self.kind, "ok": True, "path": self.path}
        except StoreError as exc:
            return {"store": self.kind, "ok": False, "path": self.path, "reason": str(exc)}

    def close(self) -> None:
        with self._write_lock, self._read_lock:
            self._write.close()
            self._read.close()
        self._folder_lock.close()  # and with it the lock


class ElasticsearchStore:
    """Tasks and logs in Elasticsearch, through the official client (7.17, 8.x or 9.x).

    Logs go to ``[elasticsearch] default_index`` as the original's did; tasks to
    ``<default_index>-tasks``, one document per identity. Indices we create have explicit
    mappings with ``dynamic: false``: the users' body, header and response objects are kept in
    _source but never indexed, so arbitrary JSON cannot break indexing. An index made earlier
    by the Go service (identity and type as text with a .keyword sub-field) keeps working:
    filters use the keyword sub-field there, so they stay exact.
    """

    kind = "elasticsearch"
    LOG_MAPPING: ClassVar[dict] = {"dynamic": False, "properties": {
        "type": {"type": "keyword"}, "identity": {"type": "keyword"},
        "key": {"type": "keyword"}, "url": {"type": "keyword", "ignore_above": 2048},
        "time": {"type": "long"}, "@timestamp": {"type": "date", "format": "epoch_millis"},
        "scheduled": {"type": "double"}, "status": {"type": "integer"},
        "duration_ms": {"type": "float"}, "message": {"type": "text"},
        "attempts": {"type": "integer"}, "tries": {"type": "object", "enabled": False},
        "retry_of": {"type": "keyword"}, "trigger": {"type": "boolean"},
        "first": {"type": "double"}, "last": {"type": "double"}, "count": {"type": "integer"},
        "more": {"type": "boolean"}, "misfire": {"type": "keyword"}, "fired": {"type": "boolean"},
        "method": {"type": "keyword"},
        "body": {"type": "object", "enabled": False},
        "header": {"type": "object", "enabled": False},
        "response": {"type": "object", "enabled": False}}}
    TASK_MAPPING: ClassVar[dict] = {"dynamic": False, "properties": {
        "identity": {"type": "keyword"},
        "task": {"type": "object", "enabled": False},
        "last": {"type": "object", "enabled": False},
        # Replicas: when a task last changed (ms), the change's token, and tombstones, so
        # that each replica learns of the changes made through the others (Replicas).
        "changed": {"type": "long"}, "token": {"type": "keyword"},
        "deleted": {"type": "boolean"}}}
    # Leases of the partitions and the replicas' heartbeats (Replicas): a few dozen small
    # documents, refreshed often, so that a search sees a heartbeat within a round.
    CLUSTER_MAPPING: ClassVar[dict] = {"dynamic": False, "properties": {
        "kind": {"type": "keyword"}, "owner": {"type": "keyword"},
        "replica": {"type": "keyword"}}}

    def __init__(self, config: Config):
        import elasticsearch  # only this store needs the client

        self._major = int(elasticsearch.__versionstr__.split(".")[0])
        options: dict[str, Any] = {"max_retries": 1, "retry_on_timeout": False}
        timeout_option = "timeout" if self._major < 8 else "request_timeout"
        options[timeout_option] = config.es_timeout
        if config.es_cloud_id:
            options["cloud_id"] = config.es_cloud_id
        else:
            options["hosts"] = [host if "://" in host else f"http://{host}"
                                for host in (h.strip() for h in config.es_hosts.split(","))
                                if host]
        if config.es_username:  # 7.17 silently ignores basic_auth=: each major its own name
            auth_option = "http_auth" if self._major < 8 else "basic_auth"
            options[auth_option] = (config.es_username, config.es_password)
        if config.es_api_key:
            options["api_key"] = config.es_api_key
        if config.es_ca_certs:
            options["ca_certs"] = config.es_ca_certs
        if not config.es_verify_certs:
            options["verify_certs"] = False
        self._errors = tuple({getattr(elasticsearch, name) for name in (
            "TransportError", "ApiError", "ConnectionError", "ConnectionTimeout",
            "SerializationError") if hasattr(elasticsearch, name)})
        try:
            self._es = elasticsearch.Elasticsearch(**options)
        except (ValueError, TypeError) as exc:
            raise StoreError(f"elasticsearch settings: {exc}") from None
        self.index = config.es_default_index
        self.tasks_index = f"{self.index}-tasks"
        self.cluster_index = f"{self.index}-cluster"
        self._hosts = options.get("hosts") or ["cloud"]
        self._fields = {"identity": "identity", "type": "type"}
        self._ready = False
        self._ready_lock = threading.Lock()
        self._dirty = threading.Event()  # a log was written since the last refresh
        self._dirty.set()  # logs written before a restart are not yet searchable either

    def _call(self, method: str, *args: Any, timeout: float | None = None,
              **kwargs: Any) -> Any:
        """Call a client method (dotted for namespaces), within ``timeout`` seconds when
        given; return the body as plain data."""
        target = self._es
        if timeout is not None:  # each major its own way
            if self._major < 8:
                kwargs["request_timeout"] = timeout
            else:
                target = target.options(request_timeout=timeout)
        for part in method.split("."):
            target = getattr(target, part)
        try:
            response = target(*args, **kwargs)
        except self._errors as exc:
            raise StoreError(f"elasticsearch {method}: {exc}") from None
        return getattr(response, "body", response)

    def _ensure(self) -> None:
        """Create missing indices; learn the field names of an index made by the Go service."""
        if self._ready:
            return
        with self._ready_lock:
            if self._ready:
                return
            for index, mapping, settings in (
                    (self.index, self.LOG_MAPPING, None),
                    (self.tasks_index, self.TASK_MAPPING, None),
                    (self.cluster_index, self.CLUSTER_MAPPING, {"refresh_interval": "100ms"})):
                if not bool(self._call("indices.exists", index=index)):
                    try:
                        self._call("indices.create", index=index, mappings=mapping,
                                   **({"settings": settings} if settings else {}))
                    except StoreError as exc:
                        if "resource_already_exists" not in str(exc):
                            raise
            # A tasks index of an earlier version lacks the replicas' fields.
            self._put_mapping(self.tasks_index, {"properties": self.TASK_MAPPING["properties"]})
            mapping = next(iter(self._call("indices.get_mapping", index=self.index).values()))
            properties = mapping["mappings"].get("properties", {})
            for name in self._fields:
                spec = properties.get(name, {})
                keyword = spec.get("fields", {}).get("keyword", {}).get("type") == "keyword"
                self._fields[name] = f"{name}.keyword" if spec.get("type") == "text" and \
                    keyword else name
            missing = {name: spec for name, spec in self.LOG_MAPPING["properties"].items()
                       if name not in properties}
            if missing or str(mapping["mappings"].get("dynamic")).lower() != "false":
                # An index the Go service made: add the fields it lacks, and stop mapping
                # new fields of the users' JSON, which could make later logs unindexable.
                self._put_mapping(self.index, {"dynamic": False, "properties": missing})
            self._ready = True

    def _put_mapping(self, index: str, change: dict) -> None:
        try:
            if self._major < 8:
                self._call("indices.put_mapping", index=index, body=change)
            else:
                self._call("indices.put_mapping", index=index, **change)
        except StoreError as exc:
            log.warning("could not extend the mapping of %s: %s", index, exc)

    def save_task(self, doc: dict, token: str = "", merge_marks: bool = False
                  ) -> tuple[int, int]:
        """Store a task; return its document's version (primary term, sequence number),
        which grows with every change of it (Replicas). With ``merge_marks`` the stored
        last fires stay where they are later than the document's (a replica that does not
        fire the task knows them only as of the last change it read)."""
        self._ensure()
        task = {k: v for k, v in doc.items() if k not in ("last", "accounted")}
        last: dict[str, dict[str, float]] = {}
        if merge_marks:
            try:
                stored = self._call("get", index=self.tasks_index, id=doc["identity"])
                last = stored["_source"].get("last") or {}
            except StoreError as exc:
                if "404" not in str(exc) and "not_found" not in str(exc).lower():
                    raise
        for key, since, at in _marks(doc):
            last.setdefault(key, {})[since] = max(at, last.get(key, {}).get(since, at))
        return self._version(self._call(
            "index", index=self.tasks_index, id=doc["identity"],
            document={"identity": doc["identity"], "task": task, "last": last,
                      "changed": int(time.time() * 1000), "token": token}))

    def delete_task(self, identity: str, token: str = "") -> tuple[int, int]:
        """Delete a task, leaving a tombstone so that other replicas learn of it (and a log
        on its way cannot bring it back); return the tombstone's version."""
        self._ensure()
        return self._version(self._call(
            "index", index=self.tasks_index, id=identity,
            document={"identity": identity, "deleted": True,
                      "changed": int(time.time() * 1000), "token": token}))

    @staticmethod
    def _version(reply: dict) -> tuple[int, int]:
        return reply["_primary_term"], reply["_seq_no"]

    def load_tasks(self) -> Iterator[dict]:
        for _, _, _, doc in self.task_changes():
            if doc is not None:
                yield doc

    def task_changes(self, since: float | None = None
                     ) -> Iterator[tuple[str, tuple[int, int], str, dict | None]]:
        """Yield (identity, version, token, task document or None for a deleted one) of every
        task, or of those changed since the UNIX time ``since`` (as the writers' clocks say).
        Reading them all also deletes the tombstones older than TOMBSTONE_DAYS."""
        self._ensure()
        if since is None:  # all: as they are now (the changes are re-read with overlap)
            self._call("indices.refresh", index=self.tasks_index)
        query = ({"match_all": {}} if since is None else
                 {"range": {"changed": {"gte": int(since * 1000)}}})
        after, old = None, []
        while True:
            extra = {"search_after": after} if after else {}
            page = self._call("search", index=self.tasks_index, size=1000,
                              sort=[{"identity": "asc"}], query=query,
                              seq_no_primary_term=True, **extra)
            hits = page["hits"]["hits"]
            for hit in hits:
                source = hit["_source"]
                version = (hit["_primary_term"], hit["_seq_no"])
                doc = None if source.get("deleted") else \
                    _read_marks(source["task"], source.get("last") or {})
                if doc is not None:
                    doc["changed"] = source.get("changed", 0) / 1000
                if doc is None and source.get("changed", 0) < \
                        (time.time() - TOMBSTONE_DAYS * 86400) * 1000:
                    old.append((source["identity"], version))
                yield source["identity"], version, source.get("token", ""), doc
            if len(hits) < 1000:
                break
            after = hits[-1]["sort"]
        if since is None and old:  # only if still tombstones: a put since then stays
            self._call("bulk", body=[{"delete": {
                "_index": self.tasks_index, "_id": identity, "if_primary_term": version[0],
                "if_seq_no": version[1]}} for identity, version in old])

    def leases(self, timeout: float | None = None) -> tuple[dict[int, dict], dict[str, dict]]:
        """Return the partitions' leases as they are now ({partition: document with its
        version}, a real-time read) and the replicas' heartbeats ({replica: document with
        its version}, as last refreshed), each read within ``timeout`` seconds."""
        self._ensure()
        ids = [f"lease-{part}" for part in range(PARTITIONS)]
        leases = {}
        request = {"body": {"ids": ids}} if self._major < 8 else {"ids": ids}
        for doc in self._call("mget", index=self.cluster_index, timeout=timeout,
                              **request)["docs"]:
            if doc.get("found"):
                leases[int(doc["_id"][6:])] = {**doc["_source"], "_version": (
                    doc["_primary_term"], doc["_seq_no"])}
        page = self._call("search", index=self.cluster_index, size=1000, timeout=timeout,
                          query={"term": {"kind": "replica"}}, seq_no_primary_term=True)
        replicas = {hit["_source"]["replica"]: {**hit["_source"], "_version": (
            hit["_primary_term"], hit["_seq_no"])} for hit in page["hits"]["hits"]}
        return leases, replicas

    def write_leases(self, writes: list[tuple[str, dict | None, tuple[int, int] | None]],
                     timeout: float | None = None) -> list[tuple[int, int] | None]:
        """Write lease and heartbeat documents in one request: each (id, document, version)
        replaces the document only if it is still at that version (compare-and-set), or
        creates it only if absent when the version is None, or writes it whatever its
        version when that is (); a None document deletes.
        Return, for each, its new version, or None where another writer changed it first
        (a version conflict). Raises StoreError if the cluster did not answer, or refused
        a write for another reason (written ones stand; the next round finds them)."""
        lines: list[dict] = []
        for doc_id, doc, version in writes:
            action: dict[str, Any] = {"_index": self.cluster_index, "_id": doc_id}
            if version:
                action.update(if_primary_term=version[0], if_seq_no=version[1])
            if doc is None:
                lines.append({"delete": action})
            else:
                lines += [{"create" if version is None else "index": action}, doc]
        results = [next(iter(item.values())) for item in
                   self._call("bulk", body=lines, timeout=timeout)["items"]]
        failed = [result for result in results
                  if result.get("status", 500) >= 300 and result.get("status") not in (404, 409)]
        if failed:
            raise StoreError(f"elasticsearch bulk: {len(failed)} lease writes failed, first: "
                             f"{failed[0].get('error')}")
        return [(result["_primary_term"], result["_seq_no"])
                if result.get("status", 500) < 300 else None for result in results]

    def append_logs(self, records: list[dict]) -> None:
        self._ensure()
        lines: list[dict] = []
        for record in records:
            lines.append({"index": {"_index": self.index, "_id": record["_id"]}})
            lines.append({**_public_log(record), "@timestamp": int(record["_ts"] * 1000)})
        for (identity, key, since), at in _fire_times(records).items():
            lines.append({"update": {"_index": self.tasks_index, "_id": identity,
                                     "retry_on_conflict": 3}})
            lines.append({"doc": {"last": {key: {since: at}}}})
        reply = self._call("bulk", body=lines)
        self._dirty.set()
        if not reply.get("errors"):
            return
        retry = []
        for item in reply["items"]:
            action, result = next(iter(item.items()))
            status = result.get("status", 500)
            if status < 300 or (action == "update" and status == 404):  # a deleted task
                continue
            if status == 429 or status >= 500:
                retry.append(result)
            else:
                log.error("elasticsearch refused log %s: %s", result.get("_id"),
                          result.get("error"))
        if retry:  # the whole batch goes again; record ids make that idempotent
            raise StoreError(f"elasticsearch bulk: {len(retry)} items failed, first: "
                             f"{retry[0].get('error')}")

    def search(self, query: dict) -> dict:
        self._ensure()
        self._refresh_if_written()
        filters: list[dict] = []
        for name in ("type", "identity", "key", "scheduled"):
            if query[name] is not None:
                filters.append({"term": {self._fields.get(name, name): query[name]}})
        span = {side: query[side] for side in ("gte", "lte") if query[side] is not None}
        if span:
            filters.append({"range": {"time": span}})
        reply = self._call(
            "search", index=self.index, query={"bool": {"filter": filters}},
            size=query["limit"], from_=query["skip"], track_total_hits=True,
            sort=[{"time": {"order": "desc"}},
                  {"@timestamp": {"order": "desc", "unmapped_type": "date"}}])
        records = []
        for hit in reply["hits"]["hits"]:
            source = {k: v for k, v in hit["_source"].items() if k != "@timestamp"}
            records.append({**source, "_id": hit["_id"]})
        return {"total": reply["hits"]["total"]["value"], "records": records}

    def _refresh_if_written(self) -> None:
        # Read your writes (an API call's log is searchable once it replied) without paying
        # a refresh on every write: refresh before a read only when something was written.
        if self._dirty.is_set():
            self._dirty.clear()
            self._call("indices.refresh", index=self.index)

    def _delete_logs(self, query: dict) -> int:
        self._ensure()
        self._refresh_if_written()  # what was written before the call is deleted too
        reply = self._call("delete_by_query", index=self.index, refresh=True,
                           conflicts="proceed", body={"query": query})
        return reply.get("deleted", 0)

    def clear(self, identity: str) -> int:
        return self._delete_logs({"term": {self._fields["identity"]: identity}})

    def prune(self, before: float) -> int:
        return self._delete_logs({"range": {"time": {"lt": before}}})

    def trim(self, max_bytes: int) -> int:
        return 0  # a cluster's indices are bounded by its own lifecycle policies

    def health(self) -> dict:
        state = {"store": self.kind, "hosts": self._hosts, "index": self.index}
        try:  # briefly: a hung cluster must not make /health (and Docker's check) hang
            if self._major < 8:
                ok = bool(self._es.ping(request_timeout=2))
            else:
                ok = bool(self._es.options(request_timeout=2).ping())
        except Exception as exc:  # noqa: BLE001 - ping() returns False on most errors; be sure
            ok, state["reason"] = False, str(exc)
        return {**state, "ok": ok}

    def close(self) -> None:
        self._es.close()


# Log writer #################################################################################

class LogWriter:
    """Batch log records into the store from a background thread.

    write() queues a fire's record and returns at once; records reach the store at most
    ``interval`` seconds later. write_now() stores an API call's record before returning, so
    that /search sees it when the call has replied. When the store fails, records go to a
    spool folder on disk (bounded by ``spool_max_bytes``), and while anything is spooled new
    batches go there too, so a hung store holds no more than one batch in memory. A second
    thread ships the spool, oldest first, when the store answers again, also after a
    restart; stores overwrite by record id, so a batch sent twice is never doubled. When
    neither the store nor the disk takes records (a full disk), they wait in memory, up to
    MAX_LOG_BACKLOG; past the spool's bound or that, they are dropped and counted in
    ``dropped`` (GET /health), never lost silently. The same thread deletes logs older than
    ``retention`` seconds (hourly) and the oldest while they take over ``max_bytes`` (each
    minute; 0: no bound).
    """

    def __init__(self, store, spool_dir: str, interval: float = 0.5, max_batch: int = 2000,
                 spool_max_bytes: int = 256 << 20, retention: float = 0.0,
                 max_bytes: int = 0, metrics: Metrics | None = None):
        self._store = store
        self._metrics = metrics or Metrics()
        self._retention = retention  # seconds logs are kept; 0: for ever
        self._max_bytes = max_bytes
        self._spool_dir = spool_dir
        self._interval = interval
        self._max_batch = max_batch
        self._spool_max_bytes = spool_max_bytes
        self._cond = threading.Condition()  # guards _pending, _sending and _closing
        self._pending: list[dict] = []
        self._sending: list[dict] = []  # the batch being written
        self._closing = False
        self._closed = False
        self._spool_lock = threading.Lock()  # guards _spooled_bytes and new spool files
        os.makedirs(spool_dir, exist_ok=True)
        for name in os.listdir(spool_dir):  # half-written by a process that was killed
            if name.endswith(".tmp"):
                with contextlib.suppress(OSError):
                    os.remove(os.path.join(spool_dir, name))
        self._spooled_bytes = sum(os.path.getsize(os.path.join(spool_dir, name))
                                  for name in self.spooled_files())
        self.dropped = 0
        self._complained = -math.inf  # when the last "cannot write logs" error was logged
        self._failing = False  # neither store nor disk took the last batch
        self._stop_shipping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="log-writer", daemon=True)
        self._shipper = threading.Thread(target=self._ship_loop, name="log-shipper",
                                         daemon=True)
        self._thread.start()
        self._shipper.start()

    def write(self, record: dict) -> None:
        """Queue one record for the next batch (after close(): spool it at once)."""
        with self._cond:
            if not self._closed:
                self._pending.append(record)
                if len(self._pending) >= self._max_batch:
                    self._cond.notify()
                return
        self._spool_safely([record])  # a webhook that outlived the shutdown

    def write_now(self, record: dict) -> None:
        """Store one record before returning (spooled if the store fails; queued if even the
        disk fails: the change it logs is made, so the reply must not say otherwise)."""
        try:
            self._store_or_spool([record])
        except OSError as exc:
            log.error("cannot spool a log record (%s); keeping it in memory", exc)
            with self._cond:
                self._pending.append(record)

    def backlog(self) -> int:
        """Return how many records wait in memory, the batch being written included."""
        with self._cond:
            return len(self._pending) + len(self._sending)

    def spooled_files(self) -> list[str]:
        return sorted(name for name in os.listdir(self._spool_dir) if name.endswith(".jsonl"))

    def _store_or_spool(self, batch: list[dict]) -> None:
        try:
            self._store.append_logs(batch)
        except StoreError as exc:
            self._metrics.count("schedule_store_errors_total")
            log.warning("log store failed (%s); spooling %d records", exc, len(batch))
            self._spool(batch)

    def _complain(self, message: str, *args: Any) -> None:
        """Log an ERROR about records not written, at most once a minute (a full disk would
        otherwise write a line a second); the counts in /health are always current."""
        if time.monotonic() - self._complained >= 60.0:
            self._complained = time.monotonic()
            log.error(message + " (%d dropped so far; said again at most once a minute)",
                      *args, self.dropped)

    def spooled_bytes(self) -> int:
        with self._spool_lock:
            return self._spooled_bytes

    def _spool(self, batch: list[dict]) -> None:
        data = "".join(json.dumps(record) + "\n" for record in batch).encode()
        with self._spool_lock:
            if self._spooled_bytes + len(data) > self._spool_max_bytes:
                self.dropped += len(batch)
                self._complain("log spool full (%d bytes): dropped %d records",
                               self._spooled_bytes, len(batch))
                return
            name = os.path.join(self._spool_dir, f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}")
            try:
                with open(name + ".tmp", "wb") as handle:
                    handle.write(data)
                    handle.flush()
                    os.fsync(handle.fileno())
                os.replace(name + ".tmp", name + ".jsonl")
            except OSError:  # a full disk: leave no half file behind, a try each second
                with contextlib.suppress(OSError):
                    os.remove(name + ".tmp")
                raise
            self._spooled_bytes += len(data)

    def ship_spool(self) -> bool:
        """Send spooled files to the store, oldest first; return True when none is left."""
        for name in self.spooled_files():
            path = os.path.join(self._spool_dir, name)
            with open(path, encoding="utf-8") as handle:
                records = [json.loads(line) for line in handle if line.strip()]
            try:
                for start in range(0, len(records), self._max_batch):
                    self._store.append_logs(records[start:start + self._max_batch])
            except StoreError as exc:
                log.info("spool not shipped yet: %s", exc)
                return False
            size = os.path.getsize(path)
            os.remove(path)
            with self._spool_lock:
                self._spooled_bytes -= size
            log.info("shipped %d spooled log records", len(records))
        with self._spool_lock:  # files are made under this lock: none can appear meanwhile
            if not self.spooled_files():
                self._spooled_bytes = 0  # whatever was removed by hand, the spool is empty
        return True

    def _spool_in_use(self) -> bool:
        with self._spool_lock:
            return self._spooled_bytes > 0

    def _spool_safely(self, batch: list[dict]) -> None:
        try:
            self._spool(batch)
        except OSError as exc:
            self.dropped += len(batch)
            self._complain("cannot spool %d log records, dropped: %s", len(batch), exc)

    def prune(self) -> int:
        """Delete the logs older than the retention; return how many (0 when it is off)."""
        if not self._retention:
            return 0
        deleted = self._store.prune(time.time() - self._retention)
        if deleted:
            log.info("deleted %d logs older than %g days", deleted, self._retention / 86400)
        return deleted

    def trim(self) -> int:
        """Delete the oldest logs while they take over max_bytes; return how many."""
        if not self._max_bytes:
            return 0
        deleted = self._store.trim(self._max_bytes)
        if deleted:
            log.info("deleted the %d oldest logs: they took over [storage] max_log_bytes",
                     deleted)
        return deleted

    def _ship_loop(self) -> None:
        # [when next, period, chore, what it does]: first a minute after the start.
        chores = [[time.monotonic() + 60.0, 3600.0, self.prune, "delete old logs"],
                  [time.monotonic() + 60.0, 60.0, self.trim, "bound the logs' size"]]
        while not self._stop_shipping.wait(1.0):
            try:
                if self._spool_in_use():
                    self.ship_spool()
            except (OSError, ValueError) as exc:  # a disk error, a damaged spool file
                log.error("cannot ship the log spool: %s", exc)
                self._set_aside_damaged()
            for chore in chores:
                if time.monotonic() >= chore[0]:
                    chore[0] = time.monotonic() + chore[1]
                    try:
                        chore[2]()
                    except StoreError as exc:
                        log.warning("cannot %s now: %s", chore[3], exc)

    def _set_aside_damaged(self) -> None:
        """Rename spool files that are not JSON lines to *.bad, so they block nothing."""
        for name in self.spooled_files():
            path = os.path.join(self._spool_dir, name)
            try:
                with open(path, encoding="utf-8") as handle:
                    for line in handle:
                        json.loads(line)
            except (OSError, ValueError):
                log.error("log spool file %s is damaged; kept as %s.bad", path, path)
                try:
                    size = os.path.getsize(path)
                    os.replace(path, path + ".bad")
                except OSError:
                    continue
                with self._spool_lock:
                    self._spooled_bytes -= size

    def _run(self) -> None:
        while True:
            with self._cond:
                if not self._closing and len(self._pending) < self._max_batch:
                    self._cond.wait(self._interval)
                batch = self._sending = self._pending[:self._max_batch]
                del self._pending[:self._max_batch]
                closing = self._closing and not self._pending
            try:
                if batch and self._spool_in_use():
                    self._spool(batch)  # the store is failing or catching up: never wait on it
                elif batch:
                    self._store_or_spool(batch)
            except OSError as exc:  # the store failed and so did the disk: try again soon
                with self._cond:
                    self._pending[:0] = batch
                    self._sending = []
                    excess = len(self._pending) - MAX_LOG_BACKLOG
                    if excess > 0:  # memory is bounded too: the oldest go, counted
                        del self._pending[:excess]
                        self.dropped += excess
                    held = len(self._pending)
                self._complain("cannot store or spool log records (%s); %d wait in memory, "
                               "retrying each second", exc, held)
                self._failing = True
                if closing:
                    return
                time.sleep(1.0)
                continue
            with self._cond:
                self._sending = []
            if self._failing and batch:
                self._failing = False
                log.info("log records are written again (%d dropped in all)", self.dropped)
            if closing:
                return

    def close(self, timeout: float = 10.0) -> None:
        """Flush every queued record (to the store, or to the spool) and stop the threads."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._thread.join(timeout)
        self._stop_shipping.set()
        with self._cond:
            # Still writing (a hung store) or failed: keep it all on disk; a record spooled
            # twice is stored once.
            rest = self._sending + self._pending if self._thread.is_alive() else self._pending
            self._pending = []
            self._closed = True
        if rest:
            self._spool_safely(rest)
        self._shipper.join(min(timeout, 2.0))


# Webhook delivery ###########################################################################
#
# Every webhook goes out from ONE asyncio event loop on its own thread, over HTTP/1.1
# connections kept alive per origin. The design card asked for urllib; we measured first
# (README, "Benchmarks"): a burst of 1,000 small POSTs to a receiver on 127.0.0.1 cost
# 871 us of CPU per POST with urllib (a new connection each, 32 threads), 400 us with
# http.client keep-alive threads, and 47 us with asyncio streams over kept-alive connections
# and requests encoded in advance: 18x less, so the burst leaves in a tenth of the time.
# Still the standard library, still one file.

_HEAD_LIMIT = 64 << 10  # bytes: a reply's status line and headers, at most
_DRAIN_LIMIT = 1 << 20  # bytes: a reply's body beyond max_response_bytes read and dropped, at
#                         most, to keep its connection; past it the connection is closed
_URL_SAFE = "".join(chr(c) for c in range(33, 127))  # quote() only what HTTP cannot carry
_DNS_TTL = 10.0  # seconds a host name's addresses are reused before it is looked up again
_CHUNK_SIZE = re.compile(rb"[0-9A-Fa-f]{1,16}")  # RFC 9112 7.1: HEXDIG, nothing else


def rfc3339(instant: float | None, zone: ZoneInfo) -> str:
    """Format an instant as RFC 3339 in the zone, with seconds ("Z" for UTC, as Go does)."""
    if instant is None:
        return ZERO_DATE
    text = datetime.fromtimestamp(instant, zone).replace(microsecond=0).isoformat()
    return text[:-6] + "Z" if text.endswith("+00:00") else text


def fire_id(identity: str, key: str, scheduled: float) -> str:
    """Return a stable id of one fire: the same on every retry, different for every instant.
    The instant counts as a float, so 1795593600 and 1795593600.0 name the same fire."""
    return hashlib.sha256(f"{identity}\n{key}\n{float(scheduled)!r}".encode()).hexdigest()[:32]


def signature(secrets: Iterable[str], timestamp: int, body: bytes) -> str:
    """Return the X-Schedule-Signature value: ``t=<unix>,v1=<hex>`` with one v1 per secret,
    each an HMAC-SHA256 of ``"<t>." + body``."""
    message = f"{timestamp}.".encode() + body
    return ",".join([f"t={timestamp}"] + [
        "v1=" + hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()
        for secret in secrets])


def _retry_after(value: str | None) -> float | None:
    """Return the seconds a Retry-After header asks for (delta or HTTP date), or None."""
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        return float(value)
    try:
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


def _header_value(text: str) -> str:
    """Return text as a header value: as it is when Latin-1 (what HTTP carries), else its
    UTF-8 percent-encoded (an identity or key in Chinese must not stop its webhook)."""
    try:
        text.encode("latin-1")
        return text
    except UnicodeEncodeError:
        return urllib.parse.quote(text, safe=_URL_SAFE)


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def _proxy_for(scheme: str, host: str, proxies: dict[str, str]
               ) -> tuple[str, int, str | None] | None:
    """Return (host, port, Proxy-Authorization) of the proxy urllib would use for a URL,
    given urllib.request.getproxies() (HTTP_PROXY, HTTPS_PROXY, NO_PROXY), or None for a
    direct connection."""
    url = proxies.get(scheme)
    if not url or urllib.request.proxy_bypass_environment(host, proxies):
        return None
    parts = urllib.parse.urlsplit(url if "://" in url else f"http://{url}")
    auth = None
    if parts.username is not None:
        user, password = (urllib.parse.unquote(part or "") for part in (parts.username,
                                                                      parts.password))
        pair = f"{user}:{password}"
        auth = "Basic " + base64.b64encode(pair.encode()).decode()
    return parts.hostname or "", parts.port or 80, auth


class Webhook:
    """An entry's webhook, ready to send: the constant part of its request, built once per
    entry version (not per fire). ``origin`` names the connections it may use; ``head`` is
    the request line and every header but the four that change per try; ``body`` the
    encoded JSON. A URL that cannot be sent (a host IDNA refuses) sets ``problem`` instead:
    its fires fail with that message. ``proxies`` is urllib.request.getproxies(), read once
    by Webhooks (it costs 35 us: most of building a Webhook)."""

    __slots__ = ("authority", "body", "entry", "head", "host", "identity", "key", "literal",
                 "origin", "port", "problem", "proxy", "tls", "zone")

    def __init__(self, identity: str, key: str, entry: Entry, zone: ZoneInfo,
                 proxies: dict[str, str]):
        self.identity, self.key, self.entry, self.zone = identity, key, entry, zone
        self.body = b"" if entry.body is None else json.dumps(entry.body).encode()
        self.problem = None
        try:
            parts = urllib.parse.urlsplit(entry.url)
            self.tls = parts.scheme == "https"
            host = parts.hostname or ""
            self.host = host if host.isascii() else host.encode("idna").decode("ascii")
            self.port = parts.port or (443 if self.tls else 80)
        except (ValueError, UnicodeError) as exc:
            self.problem = f"invalid URL: {exc}"
            self.head, self.origin, self.proxy = b"", None, None
            return
        self.literal = _is_address(self.host)  # no name to look up
        # host:port, always: what CONNECT needs (RFC 9112 3.2.3); Host omits a default port.
        self.authority = f"[{self.host}]:{self.port}" if ":" in self.host else \
            f"{self.host}:{self.port}"
        host_header = self.authority if parts.port is not None else \
            self.authority.rpartition(":")[0]
        target = urllib.parse.quote(parts.path or "/", safe=_URL_SAFE)
        if parts.query:
            target += "?" + urllib.parse.quote(parts.query, safe=_URL_SAFE)
        self.proxy = _proxy_for(parts.scheme, self.host, proxies)
        headers = {"host": ("Host", host_header), "user-agent": ("User-Agent", USER_AGENT),
                   "x-schedule-identity": ("X-Schedule-Identity", _header_value(identity)),
                   "x-schedule-key": ("X-Schedule-Key", _header_value(key))}
        if self.proxy and not self.tls:  # a plain proxy takes the whole URL (RFC 9112 3.2.2)
            target = f"http://{host_header}{target}"
            if self.proxy[2]:
                headers["proxy-authorization"] = ("Proxy-Authorization", self.proxy[2])
        if entry.body is not None:
            headers["content-type"] = ("Content-Type", "application/json")
        for name, value in (entry.headers or {}).items():  # the entry's own win over ours
            if not reserved_header(name):  # (a task stored before 1.1 may have one)
                headers[name.lower()] = (name, value)
        if entry.method not in BODILESS_METHODS:
            headers["content-length"] = ("Content-Length", str(len(self.body)))
        self.head = (f"{entry.method} {target} HTTP/1.1\r\n" + "".join(
            f"{name}: {value}\r\n" for name, value in headers.values())).encode("latin-1")
        self.origin = (parts.scheme, self.host, self.port, self.proxy)

    def encode(self, scheduled: float, attempt: int, secrets: tuple[str, ...] = ()) -> bytes:
        """Return the whole request of one try: head, the per-try headers, body."""
        extra = (f"X-Schedule-Time: {rfc3339(scheduled, self.zone)}\r\n"
                 f"X-Schedule-Fire-Id: {fire_id(self.identity, self.key, scheduled)}\r\n"
                 f"X-Schedule-Attempt: {attempt}\r\n")
        if secrets:
            extra += f"X-Schedule-Signature: {signature(secrets, int(time.time()), self.body)}\r\n"
        return b"".join((self.head, extra.encode(), b"\r\n", self.body))


class Fire:
    """One fire of an entry, from its first try to its last: its webhook, the instant it was
    due, its tries so far, and what the scheduler keeps of it (slot, generation, retry
    policy, why it must stop, whether it is done or waits on the heap for a retry)."""

    __slots__ = ("deadline", "done", "gen", "policy", "queued", "scheduled", "sent_at", "slot",
                 "stop", "timeout", "tries", "triggered", "webhook")

    def __init__(self, webhook: Webhook, scheduled: float, policy: dict | None = None,
                 slot: Any = None, timeout: float = 10.0):
        self.webhook, self.scheduled, self.policy = webhook, scheduled, policy
        self.slot, self.gen = slot, slot.gen if slot is not None else 0
        self.tries: list[dict] = []
        self.timeout = timeout  # seconds the next try may take, all included
        self.deadline: float | None = None  # time.monotonic() past which no try may start
        self.sent_at = 0.0  # when the current try was handed over (the scheduler's clock)
        self.stop: str | None = None  # why no more tries may be made (overlap policy)
        self.done = False
        self.queued = False  # on the heap, waiting for its retry
        self.triggered = False  # sent by /trigger, outside the entry's schedule


def fire_log(webhook: Webhook, scheduled: float, tries: list[dict], reason: str | None = None,
             **extra: Any) -> dict:
    """Return the one log record of a fire: success if its last try succeeded, else error
    with every try's problem and ``reason`` in ``message``."""
    last = tries[-1] if tries else {"status": None, "response": None, "error": None,
                                    "duration_ms": 0.0}
    entry = webhook.entry
    if entry.method != "POST":
        extra["method"] = entry.method
    fields = {"key": webhook.key, "url": entry.url, "header": entry.headers, "body": entry.body,
              "status": last["status"], "response": last["response"],
              "scheduled": scheduled, "duration_ms": last["duration_ms"],
              "attempts": len(tries),
              "tries": [{k: t[k] for k in ("at", "status", "error", "duration_ms", "delay")
                         if k in t} for t in tries], **extra}
    if tries and last["error"] is None:
        return make_log("success", webhook.identity, **fields)
    message = [t["error"] for t in tries] + ([reason] if reason else [])
    return make_log("error", webhook.identity, message=message, **fields)


def retry_plan(policy: dict, tries: int, outcome: dict, elapsed: float,
               rng: random.Random) -> tuple[float | None, str | None]:
    """Decide what follows a try: (delay, None) to try again in ``delay`` seconds, (None,
    reason) to give up on a failed fire, (None, None) when there is nothing more to do.

    Retried: connection errors, timeouts, 5xx and 429; not other statuses. Delays grow
    exponentially with full jitter (AWS's "Exponential Backoff and Jitter"), capped at
    max_backoff; a 429 or 503's Retry-After is honoured within that cap. No try starts later
    than max_duration after the scheduled instant (``elapsed`` is the time since it).
    """
    if outcome["error"] is None or policy["attempts"] == 0:
        return None, None
    status = outcome["status"]
    if status is not None and status != 429 and status < 500:
        return None, f"not retried: HTTP {status}"
    if tries > policy["attempts"]:
        return None, f"gave up after {tries} tries"
    cap = min(policy["max_backoff"], policy["backoff"] * 2 ** (tries - 1))
    delay = rng.uniform(0, cap)
    if outcome["retry_after"] is not None and status in (429, 503):
        delay = min(outcome["retry_after"], policy["max_backoff"])
    if elapsed + delay > policy["max_duration"]:
        return None, f"gave up: max_duration of {policy['max_duration']:g} s reached"
    return delay, None


# -- HTTP/1.1 on asyncio streams --

class _BadReply(ValueError):
    """The receiver's reply is not HTTP/1.x as RFC 9112 writes it."""


def _failed(error: str) -> dict:
    return {"status": None, "response": None, "error": error, "retry_after": None}


def _parse_head(head: bytes) -> tuple[str, int, str, dict[str, str]]:
    """Return (version, status, reason, headers) of a reply's head; header names in lower
    case, repeated ones joined with ", ". Splitting by hand costs 1.6 us against 35 us for
    http.client.parse_headers (REFERENCE.md), and a burst is thousands of replies."""
    lines = head.decode("latin-1").split("\r\n")
    version, _, rest = lines[0].partition(" ")
    code, _, reason = rest.partition(" ")
    if not version.startswith("HTTP/1.") or len(code) != 3 or not code.isdigit():
        raise _BadReply(f"not an HTTP/1.x status line: {lines[0][:80]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if colon:
            name, value = name.strip().lower(), value.strip()
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
    return version, int(code), reason.strip(), headers


def _reply_value(data: bytes, limit: int) -> Any:
    """Return the kept part of a reply: parsed when it is whole and JSON, else text."""
    text = data[:limit].decode("utf-8", errors="replace")
    if len(data) <= limit:
        try:  # what a receiver sends must not break us: NaN, or nesting beyond recursion
            return json.loads(text, parse_constant=_reject_constant)
        except (ValueError, RecursionError):
            pass
    return text


class _Reply:
    """A reply as far as it was read: its head, then ``body`` (the part a log keeps) once
    that is in, and ``reusable`` once the rest was read too (or is known to be unreadable)."""

    __slots__ = ("body", "headers", "reason", "reusable", "status", "version")

    def __init__(self, head: bytes):
        self.version, self.status, self.reason, self.headers = _parse_head(head)
        self.body: bytes | None = None
        self.reusable = False


async def _read_chunked(reader: asyncio.StreamReader, reply: _Reply, keep: int) -> None:
    kept, total = bytearray(), 0
    while True:
        size_text = (await reader.readuntil(b"\r\n")).split(b";", 1)[0].strip()
        if not _CHUNK_SIZE.fullmatch(size_text):
            raise _BadReply(f"bad chunk size {size_text[:20]!r}")
        size = int(size_text, 16)
        if size == 0:
            reply.body = bytes(kept)
            while await reader.readuntil(b"\r\n") != b"\r\n":  # trailer fields, dropped
                pass
            reply.reusable = True
            return
        total += size
        if total > keep + _DRAIN_LIMIT:
            reply.body = bytes(kept)
            return
        chunk = await reader.readexactly(size + 2)
        if chunk[-2:] != b"\r\n":
            raise _BadReply("a chunk is not followed by CRLF")
        kept += chunk[:max(0, min(size, keep - len(kept)))]
        if len(kept) >= keep and reply.body is None:
            reply.body = bytes(kept)  # the log's part is in: the rest is only drained


async def _read_body(reader: asyncio.StreamReader, reply: _Reply, keep: int) -> None:
    """Read a reply's body (RFC 9112 6.3) into ``reply``: its first ``keep`` bytes, then up
    to _DRAIN_LIMIT more to keep the connection."""
    headers = reply.headers
    if reply.status in (204, 304) or reply.status < 200:
        reply.body, reply.reusable = b"", True
        return
    codings = [c.strip().lower() for c in headers.get("transfer-encoding", "").split(",")]
    if codings[-1] == "chunked":
        await _read_chunked(reader, reply, keep)
        # Both framings at once is how requests are smuggled (RFC 9112 6.1): never reuse.
        reply.reusable = reply.reusable and "content-length" not in headers
        return
    length_text = headers.get("content-length")
    if length_text is None or codings != [""]:  # the body runs until the receiver closes
        body = bytearray()
        while len(body) < keep and (chunk := await reader.read(65536)):
            body += chunk
        reply.body = bytes(body[:keep])
        return
    if not (length_text.isascii() and length_text.isdigit()):
        raise _BadReply(f"bad Content-Length {length_text[:20]!r}")
    length = int(length_text)
    reply.body = await reader.readexactly(min(length, keep))
    rest = length - len(reply.body)
    if rest > _DRAIN_LIMIT:
        return
    while rest:
        rest -= len(await reader.readexactly(min(rest, 65536)))
    reply.reusable = True


class _Connection:
    __slots__ = ("idle_since", "open", "origin", "reader", "used", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 open_count: list[int]):
        self.reader, self.writer = reader, writer
        self.used = False  # a reply was read on it: the receiver may close it while idle
        self.idle_since = 0.0
        self.origin: _Origin | None = None
        self.open = open_count  # the sockets open in all, one of them this one
        open_count[0] += 1

    def alive(self) -> bool:
        return not (self.writer.is_closing() or self.reader.at_eof())

    def close(self, graceful: bool = False) -> None:
        """Close it: gracefully (FIN, TLS close_notify) after a whole reply, else abort."""
        if self.reader is not None:
            if graceful:
                self.writer.close()
            else:
                self.writer.transport.abort()
            self.reader = self.writer = None
            self.open[0] -= 1


class _Origin:
    """One (scheme, host, port, proxy): its idle connections, freshest last, how many of its
    fires are in flight, and the fires that wait for one of them to end."""

    __slots__ = ("busy", "idle", "waiting")

    def __init__(self):
        self.busy = 0
        self.idle: list[_Connection] = []
        self.waiting: list[tuple] = []  # heap of (instant, seq, fire, done)


class Webhooks:
    """Send webhooks from one asyncio event loop on its own thread.

    ``send(fires, done)`` hands a batch over in one call and returns at once. Each fire gets
    one try, and ``done(fire, outcome)`` is called exactly once for it, on the loop's thread
    (keep it short): outcome is {"status", "response", "error" (None on a 2xx),
    "retry_after", "duration_ms"}, or None for a fire never sent because the service shut
    down. A receiver's fault is an outcome, never an exception.

    Connections speak HTTP/1.1 and are kept alive per origin; one is reused only after its
    reply was read whole, never after ``Connection: close``, and closed after idle_timeout
    idle. At most max_connections_per_origin fires are in flight per origin, so one slow or
    hanging receiver cannot hold the others' connections, and max_connections in all (open
    sockets stay under it too); fires over those caps wait in order of their instant and go
    late, never dropped. A try on a reused connection that fails before any byte of the
    reply (the receiver had closed it while idle) is sent once more on a new connection, as
    the same try: receivers deduplicate on X-Schedule-Fire-Id. Every timeout (connect, reply
    headers, whole reply: all within the fire's ``timeout``) is the loop's; no thread waits.
    """

    def __init__(self, config: Config, metrics: Metrics | None = None):
        self._metrics = metrics or Metrics()
        self.timeout = config.webhook_timeout
        self.max_timeout = config.max_timeout
        self.proxies = urllib.request.getproxies()  # the environment's, read once
        self._max_response = config.max_response_bytes
        self._secrets = tuple(secret.strip() for secret in config.signing_secret.split(",")
                              if secret.strip())
        # One origin may not hold every connection: at least one stays for the others.
        self._total = config.max_connections
        self._per_origin = max(1, min(config.max_connections_per_origin, self._total - 1))
        self._idle_timeout = config.idle_timeout
        self._tls = ssl.create_default_context()  # verification and SNI, as urllib does
        if config.webhook_ca_certs:
            self._tls.load_verify_locations(config.webhook_ca_certs)
        # Used on the loop's thread only:
        self._origins: dict[tuple, _Origin] = {}
        self._idle: dict[_Connection, None] = {}  # every idle connection, longest idle first
        self._open = [0]  # sockets open, idle or not (a list: each connection counts itself)
        self._busy = 0  # fires in flight
        self._waiting: list[tuple] = []  # heap of fires held back by max_connections
        self._seq = itertools.count()
        self._tasks: set[asyncio.Task] = set()
        self._resent = 0  # tries sent again after a kept-alive connection turned out closed
        # Host names are looked up in a pool of our own, one lookup per name at a time and
        # kept _DNS_TTL s: asyncio's default pool has 6 threads on 2 cores, and a few fires
        # to a name whose lookup hangs would hold them all, and with them every other name.
        self._resolver = concurrent.futures.ThreadPoolExecutor(8, thread_name_prefix="dns")
        self._addresses: dict[tuple[str, int], tuple[float, list]] = {}
        self._lookups: dict[tuple[str, int], asyncio.Future] = {}
        self._closed = False
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="webhooks", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.call_soon(self._sweep)
        self._loop.run_forever()

    def send(self, fires: list[Fire], done: Callable[[Fire, dict | None], None]) -> None:
        """Start one try of each fire, in order of their instants as connections allow; call
        ``done(fire, outcome)`` as each ends. Thread-safe; never blocks."""
        if not fires:
            return
        if not self._closed:
            try:
                self._loop.call_soon_threadsafe(self._admit_all, fires, done)
                return
            except RuntimeError:  # the loop is closed
                pass
        for fire in fires:
            done(fire, None)

    def close(self, timeout: float) -> None:
        """Stop: fires still waiting end unsent; those in flight get ``timeout`` seconds to
        finish, then are cancelled (their outcome says so). Returns when all have ended."""
        if self._loop.is_closed():
            return
        future = asyncio.run_coroutine_threadsafe(self._shut_down(timeout), self._loop)
        try:
            future.result(timeout + 10)
        except (concurrent.futures.TimeoutError, RuntimeError):
            log.error("webhooks did not stop within %g s", timeout + 10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        if not self._thread.is_alive():
            self._loop.close()

    def stats(self) -> dict:
        """Return fires in flight, fires waiting for a connection, and open connections."""
        waiting = len(self._waiting) + sum(len(o.waiting) for o in list(self._origins.values()))
        return {"webhooks_in_flight": self._busy, "webhooks_waiting": waiting,
                "webhooks_resent": self._resent, "connections_open": self._open[0],
                "connections_idle": len(self._idle)}

    # -- on the loop's thread --

    def _admit_all(self, fires: list[Fire], done: Callable) -> None:
        for fire in fires:
            self._admit(fire, done)

    def _admit(self, fire: Fire, done: Callable) -> None:
        """Start the fire's try now if the caps allow, else queue it by its instant."""
        if self._closed:
            done(fire, None)
            return
        key = fire.webhook.origin
        origin = self._origins.get(key)
        if origin is None:
            origin = self._origins[key] = _Origin()
        if origin.busy >= self._per_origin:
            heapq.heappush(origin.waiting, (fire.scheduled, next(self._seq), fire, done))
        elif self._busy >= self._total:
            heapq.heappush(self._waiting, (fire.scheduled, next(self._seq), fire, done))
        else:
            origin.busy += 1
            self._busy += 1
            task = self._loop.create_task(self._deliver(origin, fire, done))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _admit_waiting(self, origin: _Origin) -> None:
        """After a fire of ``origin`` ended: start the earliest waiting fires that now fit."""
        while self._busy < self._total:
            own = origin.waiting if origin.waiting and origin.busy < self._per_origin else None
            if own and not (self._waiting and self._waiting[0] < own[0]):
                heap = own
            elif self._waiting:
                heap = self._waiting
            else:
                break
            _, _, fire, done = heapq.heappop(heap)
            self._admit(fire, done)  # a fire of a full origin moves to that origin's heap
        if origin.waiting and origin.busy < self._per_origin:
            # Held back by max_connections now, not by their origin: wait with the others.
            for item in origin.waiting:
                heapq.heappush(self._waiting, item)
            origin.waiting.clear()

    async def _deliver(self, origin: _Origin, fire: Fire, done: Callable) -> None:
        started = time.monotonic()
        kept = None
        try:
            outcome, kept = await self._exchange(origin, fire)
        except asyncio.CancelledError:
            outcome = _failed("request failed: the service shut down before the reply")
        except Exception as exc:  # a bug must cost one try, never the fire's log
            log.exception("webhook of %s/%s failed", fire.webhook.identity, fire.webhook.key)
            outcome = _failed(f"internal error: {type(exc).__name__}")
        duration = time.monotonic() - started
        outcome["duration_ms"] = round(duration * 1000, 3)
        self._metrics.observe("schedule_webhook_duration_seconds", duration)
        origin.busy -= 1
        self._busy -= 1
        if kept is not None:
            self._keep(origin, kept)
        self._admit_waiting(origin)
        try:
            done(fire, outcome)
        except Exception:  # the loop must go on for the other fires
            log.exception("after the webhook of %s/%s", fire.webhook.identity,
                          fire.webhook.key)

    async def _exchange(self, origin: _Origin, fire: Fire) -> tuple[dict, _Connection | None]:
        """Make one try; return its outcome and the connection to keep (None: closed)."""
        webhook, timeout = fire.webhook, fire.timeout
        if webhook.problem:
            return _failed(f"request failed: {webhook.problem}"), None
        if fire.deadline is not None:  # max_duration also runs while a fire waits its turn
            timeout = min(timeout, fire.deadline - time.monotonic())
            if timeout <= 0:  # no try was made: the fire ends, this is not one of its tries
                return {**_failed("max_duration ran out while it waited for a connection"),
                        "unsent": True}, None
        data = webhook.encode(fire.scheduled, len(fire.tries) + 1, self._secrets)
        phase, conn, reply = "connecting", self._take_idle(origin), None
        late = not fire.tries and not fire.triggered
        try:
            async with asyncio.timeout(timeout):
                while True:
                    if conn is None:
                        phase = "connecting"
                        while self._open[0] >= self._total and self._idle:  # make room
                            self._drop_idle(next(iter(self._idle)))
                        conn = await self._connect(webhook)
                    phase = "waiting for the reply"
                    conn.writer.write(data)
                    if late:  # a first try on the wire: how late (real time, once)
                        self._metrics.observe("schedule_fire_lateness_seconds",
                                              max(0.0, time.time() - fire.scheduled))
                        late = False
                    try:
                        reply = _Reply(await conn.reader.readuntil(b"\r\n\r\n"))
                    except (asyncio.IncompleteReadError, ConnectionError) as exc:
                        if not conn.used or getattr(exc, "partial", b""):
                            raise
                    # A kept-alive connection the receiver closed while it was idle (or timed
                    # out with a 408, as Go's transport also reads it): the request did not
                    # arrive. Once more, as the same try, on a new connection.
                    if reply is not None and not (conn.used and reply.status == 408):
                        break
                    conn.close()
                    conn, reply = None, None
                    self._resent += 1
                conn.used = True
                while 100 <= reply.status < 200 and reply.status != 101:  # RFC 9110 15.2
                    reply = _Reply(await conn.reader.readuntil(b"\r\n\r\n"))
                phase = "reading the reply"
                await _read_body(conn.reader, reply, self._max_response + 1)
        except (TimeoutError, asyncio.IncompleteReadError) as exc:
            if reply is None or reply.body is None:
                if conn:
                    conn.close()
                error = (f"timed out {phase}" if isinstance(exc, TimeoutError) else
                         f"the connection closed while {phase}")
                return {**_failed(f"request failed: {error}"),
                        "status": reply and reply.status}, None
            reply.reusable = False  # the part a log keeps is in; the rest was not
        except asyncio.LimitOverrunError:
            conn.close()
            return _failed(f"request failed: reply headers over {_HEAD_LIMIT} bytes"), None
        except (OSError, ValueError, EOFError) as exc:
            if conn:
                conn.close()
            return _failed(f"request failed: {exc or type(exc).__name__}"), None
        except BaseException:  # cancelled at shutdown
            if conn:
                conn.close()
            raise
        outcome = {"status": reply.status, "error": None, "retry_after": None,
                   "response": _reply_value(reply.body, self._max_response)}
        if not 200 <= reply.status < 300:
            outcome["error"] = f"HTTP {reply.status} {reply.reason}".rstrip()
        if reply.status in (429, 503):
            outcome["retry_after"] = _retry_after(reply.headers.get("retry-after"))
        if (reply.reusable and reply.version == "HTTP/1.1" and reply.status != 101
                and self._idle_timeout > 0
                and "close" not in reply.headers.get("connection", "").lower()):
            return outcome, conn
        conn.close(graceful=True)
        return outcome, None

    async def _resolve(self, host: str, port: int) -> list[tuple]:
        """Return [(family, sockaddr)] of host:port, looked up at most once per _DNS_TTL."""
        key = (host, port)
        known = self._addresses.get(key)
        if known and known[0] > self._loop.time():
            return known[1]
        lookup = self._lookups.get(key)
        if lookup is None:
            lookup = self._lookups[key] = self._loop.run_in_executor(
                self._resolver, socket.getaddrinfo, host, port, 0, socket.SOCK_STREAM)
            lookup.add_done_callback(lambda done: (self._lookups.pop(key, None),
                                                   done.cancelled() or done.exception()))
        infos = await asyncio.shield(lookup)  # a fire's timeout must not end the others' wait
        found = [(family, address) for family, _, _, _, address in infos]
        self._addresses[key] = (self._loop.time() + _DNS_TTL, found)
        return found

    async def _connect(self, webhook: Webhook) -> _Connection:
        """Open a connection for the webhook: direct, through its proxy (plain), or through
        a CONNECT tunnel of its proxy (https), with TLS as the URL asks."""
        proxy = webhook.proxy
        host, port = (proxy[0], proxy[1]) if proxy else (webhook.host, webhook.port)
        tls = self._tls if webhook.tls and not proxy else None
        addresses = [(0, (host, port))] if _is_address(host) else \
            await self._resolve(host, port)
        for i, (family, address) in enumerate(addresses):  # each address in turn
            try:
                reader, writer = await asyncio.open_connection(
                    address[0], address[1], family=family, ssl=tls, limit=_HEAD_LIMIT,
                    server_hostname=webhook.host if tls else None)
                break
            except OSError:
                if i == len(addresses) - 1:
                    raise
        conn = _Connection(reader, writer, self._open)
        if proxy and webhook.tls:
            try:
                auth = f"Proxy-Authorization: {proxy[2]}\r\n" if proxy[2] else ""
                writer.write(f"CONNECT {webhook.authority} HTTP/1.1\r\nHost: "
                             f"{webhook.authority}\r\n{auth}\r\n".encode("latin-1"))
                _, status, reason, _ = _parse_head(await reader.readuntil(b"\r\n\r\n"))
                if status != 200:
                    raise ConnectionError(f"the proxy refused CONNECT: {status} {reason}")
                await writer.start_tls(self._tls, server_hostname=webhook.host)
            except BaseException:
                conn.close()
                raise
        return conn

    def _take_idle(self, origin: _Origin) -> _Connection | None:
        """Return the origin's freshest idle connection that is still open, or None."""
        while origin.idle:
            conn = origin.idle.pop()
            del self._idle[conn]
            if conn.alive() and self._loop.time() - conn.idle_since < self._idle_timeout:
                return conn
            conn.close()
        return None

    def _keep(self, origin: _Origin, conn: _Connection) -> None:
        conn.idle_since, conn.origin = self._loop.time(), origin
        origin.idle.append(conn)
        self._idle[conn] = None

    def _drop_idle(self, conn: _Connection) -> None:
        del self._idle[conn]
        conn.origin.idle.remove(conn)
        conn.close(graceful=True)

    def _sweep(self) -> None:
        """Close connections idle too long and forget origins with nothing left; every 1 s."""
        now = self._loop.time()
        for conn in [c for c in itertools.takewhile(
                lambda c: now - c.idle_since >= self._idle_timeout, self._idle)]:
            self._drop_idle(conn)
        for key in [k for k, (until, _) in self._addresses.items() if until <= now]:
            del self._addresses[key]
        for key in [k for k, o in self._origins.items() if not (o.busy or o.idle or o.waiting)]:
            del self._origins[key]
        if not self._closed:
            self._loop.call_later(1.0, self._sweep)

    async def _shut_down(self, timeout: float) -> None:
        self._closed = True
        waiting = self._waiting + [item for o in self._origins.values() for item in o.waiting]
        self._waiting = []
        for origin in self._origins.values():
            origin.waiting = []
        for _, _, fire, done in sorted(waiting, key=lambda item: item[:2]):
            done(fire, None)
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=timeout)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=5)
        for conn in list(self._idle):
            self._drop_idle(conn)
        self._resolver.shutdown(wait=False, cancel_futures=True)


# Scheduler ##################################################################################

class Clock:
    """Real time. Tests pass a clock of their own with the same two methods."""

    def now(self) -> float:
        """Return the current instant in UNIX seconds."""
        return time.time()

    def wait(self, event: threading.Event, timeout: float) -> None:
        """Block until ``event`` is set or ``timeout`` seconds have passed."""
        event.wait(timeout)


def partition(identity: str) -> int:
    """Return the partition of a task: replicas fire the partitions they lease."""
    return zlib.crc32(identity.encode("utf-8")) % PARTITIONS


class _Lease:
    """A partition this replica fires: the instants after ``after`` (its previous owner's
    horizon) and up to ``horizon`` (this replica's latest renewal); once given up, none after
    ``until``. Due instants past the horizon wait in ``held`` for the next renewal, and so
    do the entries resumed while the clock is past it, in ``pending``."""

    __slots__ = ("after", "fired", "held", "horizon", "pending", "until")

    def __init__(self, after: float, horizon: float):
        self.after, self.horizon = after, horizon
        self.until: float | None = None
        self.fired = after  # the latest instant fired here
        self.held: list[tuple[float, _Slot]] = []
        self.pending: list[tuple[_Slot, str, float | None]] = []

    def bound(self) -> float:
        """Return the latest instant this replica may fire."""
        return self.horizon if self.until is None else min(self.horizon, self.until)


class _Slot:
    """The scheduler's state of one entry version: its schedule, its webhook (built when the
    entry is put, or at its first fire for the tasks loaded at start), its next and last
    fires, and the fire still being tried. ``gen`` changes when the entry is paused,
    replaced or deleted, which stops the retries of its earlier fires."""

    __slots__ = ("accounted", "entry", "gen", "identity", "inflight", "key", "last", "next",
                 "part", "policy", "running", "schedule", "webhook", "zone")

    def __init__(self, identity: str, key: str, entry: Entry, zone: ZoneInfo, schedule,
                 policy: dict, last: float | None):
        self.identity, self.key, self.entry, self.zone = identity, key, entry, zone
        self.schedule, self.policy = schedule, policy
        self.part = partition(identity)
        self.webhook: Webhook | None = None
        self.next: float | None = None
        self.last: float | None = last
        self.accounted = 0.0  # its missed fires were logged up to this instant
        self.running = False  # on the heap: its task runs (start, /running)
        self.gen = 0
        self.inflight: Fire | None = None


class Scheduler:
    """Fire entries at their instants: one timer thread over a heap; Webhooks sends.

    The timer thread pops what is due, computes next instants and hands each batch of due
    fires to ``webhooks.send`` in one call: it never does I/O and never waits on a webhook.
    When a try ends (on the webhooks' loop), ``_tried`` puts the fire's retry back on the
    heap, due after its backoff, so a waiting retry holds nothing; or hands the fire's one
    log record to ``sink``. Fires due while connections are busy go late, never dropped.
    Fires missed while nothing fired (the service was down, the task or entry paused, the
    host suspended past LATE_REPLAY_LIMIT) are found when the entry runs again: a "missed"
    log says which, and an entry with misfire "once" fires the latest of them, late, if it
    is at most misfire_grace old ("skip", the default, only logs them).

    With ``replicated``, it fires only the partitions it was given (``own``), each within
    its lease's bounds (see _Lease); the tasks of the others are kept, for the API, unarmed.
    """

    def __init__(self, webhooks: Webhooks, sink: Callable[[dict], None],
                 clock: Clock | None = None, retry_attempts: int = 0,
                 schedules: Schedules | None = None, misfire_grace: float = 3600.0,
                 metrics: Metrics | None = None, replicated: bool = False):
        self._metrics = metrics or Metrics()
        self._leases: dict[int, _Lease] | None = {} if replicated else None
        self._webhooks = webhooks
        self._sink = sink
        self._clock = clock or Clock()
        self._retry_attempts = retry_attempts
        self._misfire_grace = misfire_grace
        self._failed: collections.Counter[str] = collections.Counter()  # since take_failed()
        self._missed_memo: dict[tuple, tuple | None] = {}  # see _log_missed
        # Shared by the entries that give no retry of their own (read only): a dict per
        # entry would be 23 MB for 100,000 of them.
        self._default_policy = Entry("", "").retry_policy(retry_attempts)
        self._schedules = schedules or Schedules()
        self._rng = random.Random()  # used on the webhooks' loop only
        self._lock = threading.Lock()  # guards _tasks, _slots, _heap, the counters, slots
        self._tasks: dict[str, Task] = {}
        self._slots: dict[str, dict[str, _Slot]] = {}
        self._heap: list[tuple[float, int, _Slot | Fire]] = []
        self._stale = 0
        self._busy = 0  # fires handed to the webhooks and not yet ended or re-queued
        self._waiting = 0  # fires waiting on the heap for a retry
        self._seq = itertools.count()
        self._wake = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None

    # -- the registry, called from request threads --

    def _queue_retry(self, fire: Fire, at: float) -> None:
        if not fire.queued:
            fire.queued = True
            self._waiting += 1
        heapq.heappush(self._heap, (at, next(self._seq), fire))
        self._wake.set()

    def _expedite(self, slot: _Slot) -> None:
        """Make the entry's fire that waits for a retry end now, not at its retry time: it
        was stopped (paused, replaced, deleted, or overlap "replace"), so it is only
        logged. (Earlier fires still waiting, which overlap "allow" permits, end at their
        retry times.)"""
        fire = slot.inflight
        if fire is not None and fire.queued:
            self._queue_retry(fire, self._clock.now())  # the later item finds it taken

    def _disarm(self, slot: _Slot) -> None:
        slot.gen += 1
        self._expedite(slot)
        if slot.running:
            slot.running, slot.next = False, None
            self._stale += 1

    def _arm(self, slot: _Slot, now: float, keep_next: float | None = None) -> None:
        try:
            slot.next = keep_next if keep_next is not None else slot.schedule.next_after(now)
        except ScheduleError:
            slot.next = None
            return
        slot.running = True
        heapq.heappush(self._heap, (slot.next, next(self._seq), slot))

    def _owns(self, slot: _Slot) -> bool:
        return self._leases is None or slot.part in self._leases

    def fires(self, identity: str) -> bool:
        """Return True if this scheduler fires the task (its partition is leased here)."""
        with self._lock:
            return self._leases is None or partition(identity) in self._leases

    def _bound(self, slot: _Slot, now: float) -> float:
        """Return ``now``, or earlier the latest instant the slot's lease lets it fire: what
        lies beyond waits for a renewal (or is its successor's)."""
        return now if self._leases is None else min(now, self._leases[slot.part].bound())

    def _resume(self, slot: _Slot, now: float, why: str, after: float = 0.0,
                changed: float | None = None) -> None:
        """Arm a slot that did not run (loaded at start, resumed, put running again) after
        accounting for its instants that never fired: those after its last fire, its put
        and what was already logged missed, up to now (_log_missed). Its first instant
        after that is computed first: when it is after now, it is the next fire, and equal
        entries resumed together share that answer (CronSchedule's memo), so 100,000 tasks
        load without one computation each. A put time of 0 means unknown (a hand-made
        task document without anchors): nothing is counted then. Instants up to ``after``
        were another replica's (its lease's horizon). An entry put (or resumed through
        another replica) at ``changed`` fires what fell due since then now, late: the put
        took a moment to store, or this replica learnt of it a moment later (Service._sync)."""
        lease = None if self._leases is None else self._leases[slot.part]
        if lease is not None and now > lease.horizon:  # counted once a renewal covers now
            slot.running, slot.next = True, None
            lease.pending.append((slot, why, changed))
            return
        since, first = self._first_unfired(slot, after)
        bound = self._bound(slot, now)  # (a partition being handed over: up to its until)
        if changed is not None and first is not None:
            if since < changed and first <= min(changed, bound):
                self._log_missed(slot, since, min(changed, bound), why)
            since, first = self._first_unfired(slot, max(after, changed))
            for _ in range(MISSED_COUNT_LIMIT):
                if first is None or first > bound:
                    break
                slot.last = since = first
                self._queue_retry(self._start_fire(slot, first), now)  # due at once
                first = self._first_unfired(slot, first)[1]
        if first is not None and first <= bound:
            self._log_missed(slot, since, bound, why)
        self._arm(slot, bound, first if first is not None and first > bound else None)

    @staticmethod
    def _first_unfired(slot: _Slot, after: float) -> tuple[float, float | None]:
        """Return the instant from which the slot's fires are unaccounted for, and the
        first of them (None: none, or unknown)."""
        since = max(slot.last or 0.0, slot.accounted) if slot.entry.anchor else 0.0
        since = max(since, slot.entry.anchor, after)
        try:
            return since, slot.schedule.next_after(since) if since else None
        except ScheduleError:
            return since, None

    def _log_missed(self, slot: _Slot, since: float, now: float, why: str,
                    may_fire: bool = True) -> None:
        """Log the slot's instants in (since, now] as missed (caller holds the lock), and
        with misfire "once" queue the latest to fire now if it is at most misfire_grace
        old. Equal entries missing the same span share one computation."""
        key = (slot.schedule, since, math.floor(now))
        if key not in self._missed_memo:
            if len(self._missed_memo) > 1000:
                self._missed_memo.clear()
            try:
                self._missed_memo[key] = missed_instants(slot.schedule, since, now)
            except ScheduleError:
                self._missed_memo[key] = None
        missed = self._missed_memo[key]
        if missed is None:
            return
        first, last, count, more = missed
        slot.accounted = last
        self._metrics.count("schedule_fires_missed_total", count)
        entry = slot.entry
        grace = self._misfire_grace if entry.misfire_grace is None else entry.misfire_grace
        late = may_fire and entry.misfire == "once" and now - last <= grace
        zone = slot.zone
        what = (f"missed {count}{' or more' if more else ''} fire{'s' if count > 1 else ''} "
                f"from {rfc3339(first, zone)}"
                f" to {rfc3339(last, zone)} ({why}); misfire: {entry.misfire}")
        if entry.misfire == "once" and may_fire:
            what += (": the last one fires now, late" if late else
                     f": the last one is over {grace:g} s old, not fired")
        log.info("%s/%s %s", slot.identity, slot.key, what)
        record = make_log("missed", slot.identity, key=slot.key, url=entry.url, first=first,
                          last=last, count=count, more=more, misfire=entry.misfire,
                          fired=late, message=[what])
        record["_since"] = entry.anchor  # the store keeps "missed up to" per entry version
        self._sink(record)
        if late:
            slot.last = last
            self._queue_retry(self._start_fire(slot, last), now)  # due at once, via the heap

    def put(self, task: Task, last: dict[str, float] | None = None,
            prepare: bool = True, accounted: dict[str, float] | None = None,
            changed: float | None = None) -> None:
        """Add or replace a task. An entry put again unchanged is left as it is (its fire in
        flight and retries go on); entries whose schedule is unchanged keep their next fire
        and last fire; others start from now. ``last`` and ``accounted`` are the stored
        marks of a task loaded at start. With ``prepare`` the entries' webhooks are built
        now, else at their first fire (100,000 tasks loaded at start would take 57 MB and
        4 s more). ``changed``: when the put was made, here or through another replica
        (see _resume).
        Raises ScheduleError for a bad cron_time."""
        zone = load_zone(task.time_zone)
        # Parsed and built outside the lock: a put of 1,000 new entries must not stall the timer.
        slots = {key: _Slot(task.identity, key, entry, zone,
                            self._schedules.get(entry.cron_time, task.time_zone, entry.anchor),
                            entry.retry_policy(self._retry_attempts) if entry.retry
                            else self._default_policy, None)
                 for key, entry in task.entries.items()}
        if prepare:
            for slot in slots.values():
                self._webhook(slot)
        with self._lock:
            now = self._clock.now()
            old_task = self._tasks.get(task.identity)
            old = self._slots.pop(task.identity, {})
            for key, slot in slots.items():
                before = old.get(key)
                same = before is not None and carries_over(old_task, task, key)
                runs = task.start and slot.entry.running and self._owns(slot)
                if same and before.entry == slot.entry and before.running == runs:
                    slots[key] = old.pop(key)
                    continue
                slot.last = before.last if same else (last or {}).get(key)
                slot.accounted = before.accounted if same else (accounted or {}).get(key, 0.0)
                if runs:
                    if same and before.running:
                        self._arm(slot, now, before.next)
                        continue
                    self._resume(slot, now, "the service was down, or the entry paused",
                                 self._after(slot), changed)
            for slot in old.values():
                self._disarm(slot)
            self._tasks[task.identity] = task
            self._slots[task.identity] = slots
            self._compact()
            self._wake.set()

    def set_running(self, task: Task) -> None:
        """Apply the running states of a task already here (``start``, and each entry's
        ``running``): pause what stops, resume what runs again. Resuming starts from now;
        what was missed while paused is logged and follows the entry's misfire rule
        (_resume). Raises KeyError for an unknown task."""
        with self._lock:
            slots = self._slots[task.identity]
            self._tasks[task.identity] = task
            now = self._clock.now()
            for key, slot in slots.items():
                slot.entry = task.entries[key]
                if task.start and slot.entry.running and self._owns(slot):
                    if not slot.running:
                        self._resume(slot, now, "the entry was paused", self._after(slot))
                elif slot.running or slot.inflight:
                    self._disarm(slot)
            self._compact()
            self._wake.set()

    def trigger(self, identity: str, key: str) -> Fire:
        """Fire an entry now, once, outside its schedule, with its retry policy; return the
        fire (its ``scheduled`` is now). Raises KeyError for an unknown task or entry."""
        with self._lock:
            slot = self._slots[identity][key]
            fire = Fire(slot.webhook, self._clock.now(), slot.policy, slot)
            fire.triggered = True
            self._queue_retry(fire, fire.scheduled)  # due at once, through the heap
            return fire

    def delete(self, identity: str) -> bool:
        """Remove a task at once; return False if it did not exist."""
        with self._lock:
            for slot in self._slots.pop(identity, {}).values():
                self._disarm(slot)
            self._compact()
            return self._tasks.pop(identity, None) is not None

    def task(self, identity: str) -> Task | None:
        with self._lock:
            return self._tasks.get(identity)

    def identities(self) -> list[str]:
        with self._lock:
            return sorted(self._tasks)

    def dates(self, identity: str) -> dict[str, tuple[float | None, float | None]]:
        """Return {key: (next fire, last fire)} of a task's entries (None where there is none).
        An entry another replica fires shows its next instant as that replica computes it."""
        with self._lock:
            task, now = self._tasks.get(identity), self._clock.now()
            dates = {}
            for key, slot in self._slots.get(identity, {}).items():
                next_at = slot.next if slot.running else None
                if next_at is None and not self._owns(slot) and task.start and \
                        slot.entry.running:
                    with contextlib.suppress(ScheduleError):
                        next_at = slot.schedule.next_after(now)
                dates[key] = (next_at, slot.last)
            return dates

    # -- the partitions, given and taken by Replicas --

    def _after(self, slot: _Slot) -> float:
        return 0.0 if self._leases is None else self._leases[slot.part].after

    def own(self, parts: dict[int, tuple[float, float]], why: str) -> None:
        """Start firing partitions, {partition: (after, horizon)}: their entries' instants
        after ``after`` (what was missed since is logged, as after a restart: ``why`` says
        why), and up to ``horizon`` until extended."""
        with self._lock:
            now = self._clock.now()
            for part, (after, horizon) in parts.items():
                self._leases[part] = _Lease(after, horizon)
            for identity, slots in self._slots.items():
                task = self._tasks[identity]
                for slot in slots.values():
                    if slot.part in parts and task.start and slot.entry.running and \
                            not slot.running:
                        try:
                            self._resume(slot, now, why, parts[slot.part][0])
                        except Exception:  # one bad entry must not leave the others unarmed
                            log.exception("cannot arm %s/%s", slot.identity, slot.key)
            self._wake.set()

    def extend(self, parts: dict[int, float]) -> None:
        """Move partitions' horizons to later instants; fire what waited for that."""
        with self._lock:
            for part, horizon in parts.items():
                lease = self._leases.get(part)
                if lease is None:
                    continue
                lease.horizon = max(lease.horizon, horizon)
                held, lease.held = lease.held, []
                for at, slot in held:
                    heapq.heappush(self._heap, (at, next(self._seq), slot))
                pending, lease.pending = lease.pending, []
                now = self._clock.now()
                for slot, why, changed in pending:
                    if self._current(slot) and slot.running and slot.next is None:
                        slot.running = False
                        self._resume(slot, now, why, lease.after, changed)
            self._wake.set()

    def _current(self, slot: _Slot) -> bool:
        return self._slots.get(slot.identity, {}).get(slot.key) is slot

    def release(self, parts: dict[int, float | None]) -> dict[int, float]:
        """Fire nothing after ``until`` in partitions given up, {partition: until, or None
        for now}; return each partition's until, never before an instant it fired or its
        predecessor may have: the next owner fires only the instants after it."""
        with self._lock:
            now, untils = self._clock.now(), {}
            for part, until in parts.items():
                lease = self._leases.get(part)
                if lease is not None:
                    lease.until = untils[part] = max(now if until is None else until,
                                                     lease.after, lease.fired)
            self._wake.set()
            return untils

    def drop(self, parts: dict[int, float], why: str) -> dict[int, float]:
        """Stop firing partitions, {partition: the latest horizon written for it} (their
        fires in flight and retries go on); return the latest instant each one's lease
        covered here. Its due instants the timer has not reached yet are still this
        replica's: they fire now, late. Those that waited for a renewal that never came are
        logged missed, with ``why``, up to the horizon written: past it, they are the next
        owner's to account for (it starts after the horizon it reads)."""
        with self._lock:
            now = self._clock.now()
            dropped = {part: self._leases.pop(part) for part in parts if part in self._leases}
            for part, lease in dropped.items():
                for at, slot in lease.held:
                    if slot.running and slot.next == at and at <= parts[part]:
                        self._log_missed(slot, at - 0.5, at, why, may_fire=False)
                for slot, _, _ in lease.pending:
                    since, first = self._first_unfired(slot, lease.after)
                    upto = min(now, parts[part])
                    if self._current(slot) and slot.running and first is not None and \
                            first <= upto:
                        self._log_missed(slot, since, upto, why, may_fire=False)
            for slots in self._slots.values():
                for slot in slots.values():
                    if slot.part not in dropped or not slot.running:
                        continue
                    bound = min(now, dropped[slot.part].bound())
                    while slot.next is not None and slot.next <= bound:
                        slot.last = slot.next
                        self._queue_retry(self._start_fire(slot, slot.next), now)
                        slot.next = slot.schedule.next_after(slot.next)
                    slot.running, slot.next = False, None
                    self._stale += 1
            self._compact()
            return {part: lease.bound() for part, lease in dropped.items()}

    def leases(self) -> dict[int, dict]:
        """Return the partitions fired here: {partition: {after, horizon, until}}."""
        with self._lock:
            return {part: {"after": lease.after, "horizon": lease.horizon,
                           "until": lease.until} for part, lease in (self._leases or {}).items()}

    def take_failed(self) -> collections.Counter[str]:
        """Return the failed fires by task since the last call, and start again."""
        with self._lock:
            failed, self._failed = self._failed, collections.Counter()
            return failed

    def counts(self) -> dict[str, int]:
        """Return how many tasks and entries run and are paused."""
        with self._lock:
            counts = dict.fromkeys(("tasks running", "tasks paused", "entries running",
                                    "entries paused"), 0)
            for task in self._tasks.values():
                counts["tasks running" if task.start else "tasks paused"] += 1
                for entry in task.entries.values():
                    running = task.start and entry.running
                    counts["entries running" if running else "entries paused"] += 1
            return counts

    def marks(self, identity: str) -> tuple[dict[str, float], dict[str, float]]:
        """Return a task's ({key: last fire}, {key: missed fires logged up to}) to store."""
        with self._lock:
            slots = self._slots.get(identity, {})
            return ({key: slot.last for key, slot in slots.items() if slot.last is not None},
                    {key: slot.accounted for key, slot in slots.items() if slot.accounted})

    def __len__(self) -> int:
        with self._lock:
            return len(self._tasks)

    def _compact(self) -> None:
        # Stale heap items are skipped when popped; rebuild when they are the larger part.
        if self._stale > 1024 and self._stale * 2 > len(self._heap):
            kept, seen = [], set()  # a slot paused and resumed may have two items: keep one
            for item in self._heap:
                slot = item[2]
                if isinstance(slot, Fire):
                    kept.append(item)
                elif slot.running and slot.next == item[0] and id(slot) not in seen:
                    seen.add(id(slot))
                    kept.append(item)
            self._heap = kept
            heapq.heapify(self._heap)
            self._stale = 0

    def idle(self) -> bool:
        """Return True when no fire is due and none is being tried (retries may wait)."""
        with self._lock:
            due = self._heap and self._heap[0][0] <= self._clock.now()
            return not due and self._busy == 0

    def stats(self) -> dict:
        """Return the number of fires being tried and of retries waiting for their time."""
        with self._lock:
            return {"fires_running": self._busy, "retries_waiting": self._waiting}

    # -- the fire path: timer thread, then the webhooks' loop --

    def start(self) -> None:
        """Start the timer thread."""
        self._thread = threading.Thread(target=self._run, name="timer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            with self._lock:
                if self._stopping:
                    return
                now = self._clock.now()
                due = self._pop_due(now)
                timeout = self._heap[0][0] - now if self._heap else TIMER_MAX_WAIT
                self._wake.clear()
            if due:
                self._send(due, now)
            else:
                self._clock.wait(self._wake, min(max(timeout, 0.0), TIMER_MAX_WAIT))

    def _pop_due(self, now: float) -> list[Fire]:
        """Pop every due item (caller holds the lock): return the fires to try now."""
        due = []
        while self._heap and self._heap[0][0] <= now:
            at, _, item = heapq.heappop(self._heap)
            if isinstance(item, Fire):  # a retry whose backoff is over
                if item.queued:  # not already taken by an earlier item (see _expedite)
                    item.queued = False
                    self._waiting -= 1
                    due.append(item)
                continue
            slot = item
            if not slot.running or slot.next != at:
                self._stale -= 1
                continue
            if self._leases is not None:
                lease = self._leases.get(slot.part)
                if lease is None or (lease.until is not None and at > lease.until):
                    slot.running, slot.next = False, None  # given up: its successor fires it
                    continue
                if at > lease.horizon:  # fired only once a renewal says it is still ours
                    lease.held.append((at, slot))
                    continue
                lease.fired = max(lease.fired, at)
            try:
                if at < now - LATE_REPLAY_LIMIT:  # the host slept, or the clock jumped
                    bound = self._bound(slot, now)  # (no further than the lease goes)
                    self._log_missed(slot, at - 0.5, bound, f"{now - at:.0f} s behind: the "
                                                            "host was suspended, or its "
                                                            "clock jumped")
                    at = None
                    following = slot.schedule.next_after(bound)
                else:
                    slot.last = at
                    following = slot.schedule.next_after(at)
            except Exception:
                log.exception("no next fire for %s/%s", slot.identity, slot.key)
                slot.running, slot.next = False, None
            else:
                slot.next = following
                heapq.heappush(self._heap, (following, next(self._seq), slot))
            if at is not None:
                due.append(self._start_fire(slot, at))
        self._busy += len(due)
        return due

    def _start_fire(self, slot: _Slot, at: float) -> Fire:
        """Return the fire of a slot due at ``at``, applying the entry's overlap policy."""
        fire = Fire(slot.webhook, at, slot.policy, slot)
        previous = slot.inflight
        if previous is not None and not previous.done:
            overlap, zone = slot.entry.overlap, slot.zone
            if overlap == "forbid":
                fire.stop = (f"skipped: the fire due {rfc3339(previous.scheduled, zone)} is "
                             "still running (overlap: forbid)")
                return fire
            if overlap == "replace":
                previous.stop = (f"abandoned: replaced by the fire due {rfc3339(at, zone)}"
                                 " (overlap: replace)")
                self._expedite(previous.slot)
        slot.inflight = fire
        return fire

    def _webhook(self, slot: _Slot) -> Webhook:
        if slot.webhook is None:
            slot.webhook = Webhook(slot.identity, slot.key, slot.entry, slot.zone,
                                   self._webhooks.proxies)
        return slot.webhook

    def _stopped(self, fire: Fire) -> str | None:
        if fire.stop:
            return fire.stop
        if fire.gen != fire.slot.gen:
            return "stopped: the task was paused, replaced or deleted"
        return None

    def _send(self, fires: list[Fire], now: float) -> None:
        """Hand the due fires to the webhooks in one call; end at once those that may not
        be tried. No try may outlast its fire's max_duration."""
        ready = []
        for fire in fires:
            fire.webhook = fire.webhook or self._webhook(fire.slot)
            reason = self._stopped(fire)
            # (an entry stored before [webhook] max_timeout was lowered keeps within it)
            timeout = min(fire.webhook.entry.timeout or self._webhooks.timeout,
                          self._webhooks.max_timeout)
            if reason is None and fire.policy["attempts"]:
                left = fire.scheduled + fire.policy["max_duration"] - now
                if left <= 0:
                    reason = f"gave up: max_duration of {fire.policy['max_duration']:g} s reached"
                timeout = max(0.1, min(timeout, left))
                fire.deadline = time.monotonic() + timeout  # also while it waits its turn
            if reason is None:
                fire.sent_at, fire.timeout = now, timeout
                ready.append(fire)
            else:
                self._finish(fire, reason)
        self._webhooks.send(ready, self._tried)

    def _tried(self, fire: Fire, outcome: dict | None) -> None:
        """Take a try's outcome (on the webhooks' loop): queue the fire's retry or end it."""
        if outcome is None:
            self._finish(fire, "stopped: the service shut down before the next try")
            return
        if outcome.get("unsent"):
            self._finish(fire, f"gave up: max_duration of {fire.policy['max_duration']:g} s "
                               f"reached ({outcome['error']})")
            return
        outcome["at"] = fire.sent_at
        fire.tries.append(outcome)
        delay, reason = retry_plan(fire.policy, len(fire.tries), outcome,
                                   self._clock.now() - fire.scheduled, self._rng)
        if delay is not None:
            with self._lock:
                reason = ("stopped: the service shut down before the next try"
                          if self._stopping else self._stopped(fire))
                if reason is None:
                    outcome["delay"] = round(delay, 3)
                    self._queue_retry(fire, self._clock.now() + delay)
                    self._busy -= 1
                    return
        self._finish(fire, reason)

    def _finish(self, fire: Fire, reason: str | None, handed: bool = True) -> None:
        """End a fire: its one log record goes to the sink."""
        with self._lock:
            fire.done = True
            if fire.slot.inflight is fire:
                fire.slot.inflight = None
            self._busy -= handed
        if fire.triggered:
            record = fire_log(fire.webhook, fire.scheduled, fire.tries, reason, trigger=True)
        else:
            record = fire_log(fire.webhook, fire.scheduled, fire.tries, reason)
            # When its entry version was put: the store keeps last fires per version.
            record["_since"] = fire.webhook.entry.anchor
        log.debug("fired %s/%s: %s after %d tries", fire.webhook.identity, fire.webhook.key,
                  record["type"], len(fire.tries))
        if record["type"] == "error":
            with self._lock:
                self._failed[fire.webhook.identity] += 1
        skipped = not fire.tries and (fire.stop or "").startswith("skipped")
        self._metrics.count("schedule_fires_total", outcome="skipped" if skipped else
                            record["type"])
        self._sink(record)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop firing; let webhooks in flight finish within ``timeout`` seconds, and log
        the fires whose next try will not be made."""
        with self._lock:
            self._stopping = True
            self._wake.set()
        if self._thread:
            self._thread.join(timeout)
        self._webhooks.close(timeout)  # waiting fires come back through _tried, unsent
        with self._lock:
            waiting = {id(item): item for _, _, item in self._heap
                       if isinstance(item, Fire) and item.queued}
            for fire in waiting.values():
                fire.queued = False
            self._heap = [item for item in self._heap if not isinstance(item[2], Fire)]
            heapq.heapify(self._heap)
            self._waiting = 0
        if waiting:
            log.warning("shutdown: %d fires waiting for a retry; logged as errors", len(waiting))
        for fire in waiting.values():
            self._finish(fire, "stopped: the service shut down before the next try",
                         handed=False)


# Replicas ###################################################################################

class Replicas:
    """Share the firing of the tasks with the other processes on the same Elasticsearch
    cluster (README, "Several replicas"): each replica leases a fair share of the
    PARTITIONS and fires only those.

    A lease is a document changed only by compare-and-set: its owner, and its horizon, the
    instant up to which the owner may fire. Every LEASE_RENEW the owner moves the horizon to
    LEASE_AHEAD past the round's start (never back); a successor fires only the instants
    after the horizon it took over. So an instant is fired by one replica at most, whatever
    the replicas' clocks say, and a replica cut off from the cluster stops by itself at its
    horizon, before a peer may take the lease: a lease is dead once it has stood unchanged
    for LEASE_TAKEOVER, as each replica times it on its own monotonic clock. A replica
    giving a partition up (a peer joined, or it stops) sets the horizon HANDOVER ahead and
    fires until then, so a handover neither doubles nor misses a fire.

    A heartbeat document per replica tells who is alive; the partitions go evenly to the
    living, in the order of their ids.
    """

    def __init__(self, store, scheduler: Scheduler, clock: Clock, replica_id: str = ""):
        self.id = replica_id or uuid.uuid4().hex[:12]
        self._store, self._scheduler, self._clock = store, scheduler, clock
        self._lock = threading.Lock()  # guards what health() reads
        self._held: dict[int, tuple[int, int]] = {}  # partition -> our lease's version
        self._renewed: dict[int, float] = {}  # partition -> monotonic start of its last renewal
        self._floor: dict[int, float] = {}  # partition -> no horizon we write goes below it
        self._sent: dict[int, float] = {}  # partition -> the latest horizon we tried to write
        self._releasing: dict[int, tuple[float, float]] = {}  # partition -> until, monotonic
        self._dropped: dict[int, float] = {}  # partition -> the last instant it let us fire
        self._seen: dict[str, tuple[tuple[int, int], float]] = {}  # doc -> version, since
        self._peers: list[str] = [self.id]
        self._failing = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Take this replica's share (one round, so that a lone replica fires at once), then
        keep it in a thread, which also retries when the cluster does not answer yet."""
        self._step()
        self._thread = threading.Thread(target=self._run, name="replicas", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(LEASE_RENEW):
            self._step()

    def _step(self) -> None:
        try:
            self._round()
            if self._failing:
                log.warning("replicas: the cluster answers again")
            self._failing = False
        except StoreError as exc:
            if not self._failing:
                log.warning("replicas: cannot renew the leases: %s", exc)
            self._failing = True
        except Exception:
            log.exception("replicas: round failed")
        try:
            self._fence()
        except Exception:
            log.exception("replicas: fence failed")

    def _fresh(self, doc_id: str, version: tuple[int, int], started: float) -> bool:
        """Return True while a document's version has changed within LEASE_TAKEOVER."""
        seen = self._seen.get(doc_id)
        if seen is None or seen[0] != version:
            self._seen[doc_id] = (version, started)
            return True
        return started - seen[1] < LEASE_TAKEOVER

    def _round(self) -> None:
        started, now = time.monotonic(), self._clock.now()
        leases, beats = self._store.leases(timeout=LEASE_CALL_TIMEOUT)
        alive = {self.id}
        writes: list[tuple[str, dict | None, Any]] = []
        for replica, doc in beats.items():
            if self._fresh(f"replica-{replica}", doc["_version"], started):
                alive.add(replica)
            elif started - self._seen[f"replica-{replica}"][1] > 60 * LEASE_TAKEOVER:
                writes.append((f"replica-{replica}", None, doc["_version"]))  # long dead
        peers = sorted(alive)
        share = PARTITIONS // len(peers) + (peers.index(self.id) < PARTITIONS % len(peers))
        # What each write means: (verb, partition, the horizon it writes, the instant the
        # taker fires after, why the instants since then were missed)
        plans: list[tuple[str, int, float, float, str]] = []

        def lease(part: int, owner: str, horizon: float, after: float) -> dict:
            return {"kind": "lease", "owner": owner, "horizon": horizon, "from": after,
                    "by": self.id}
        for part in list(self._held):
            doc = leases.get(part)
            if doc is not None and doc["owner"] == self.id:  # our own write, its answer lost
                self._held[part] = doc["_version"]
        mine = sorted(self._held)
        for part in mine[share:]:  # a peer joined: give the surplus up
            until = max(now + HANDOVER, self._floor[part])
            writes.append((f"lease-{part}", lease(part, "", until, until), self._held[part]))
            plans.append(("release", part, until, 0.0, ""))
        for part in mine[:share]:
            horizon = max(now + LEASE_AHEAD, self._floor[part])
            writes.append((f"lease-{part}", lease(part, self.id, horizon, self._floor[part]),
                           self._held[part]))
            plans.append(("renew", part, horizon, 0.0, ""))
        free = []
        for part in range(PARTITIONS):
            doc = leases.get(part)
            if part in self._held or part in self._releasing:
                continue
            if doc is None:
                free.append((2, part, None, 0.0, "the service was down, or the entry paused"))
            elif doc["owner"] == self.id:  # ours before the cluster stopped answering
                after = self._dropped.get(part, doc.get("from", doc["horizon"]))
                free.append((0, part, doc["_version"], after,
                             "this replica could not reach the cluster"))
            elif doc["owner"] == "":  # given up
                free.append((0, part, doc["_version"], doc["horizon"],
                             f"its partition had no owner after replica {doc['by']} gave it up"))
            elif not self._fresh(f"lease-{part}", doc["_version"], started):
                free.append((1, part, doc["_version"], doc["horizon"],
                             (f"its partition had no owner: replica {doc['owner']} stopped "
                              "renewing its lease")))
        for _, part, version, after, why in sorted(free)[:max(0, share - len(mine))]:
            horizon = max(now + LEASE_AHEAD, after)
            writes.append((f"lease-{part}", lease(part, self.id, horizon, after), version))
            plans.append(("take", part, horizon, after, why))
        writes.append((f"replica-{self.id}", {"kind": "replica", "replica": self.id,
                                              "at": now, "held": len(mine)}, ()))
        for _, part, horizon, _, _ in plans:  # may be written even if no answer comes
            self._sent[part] = max(self._sent.get(part, 0.0), horizon)
        results = self._store.write_leases(writes, timeout=LEASE_CALL_TIMEOUT)
        results = results[len(writes) - len(plans) - 1:]  # the heartbeats' deletions first
        self._enact(plans, results, started, peers)

    def _enact(self, plans: list, results: list, started: float, peers: list[str]) -> None:
        """Act on what the round's writes did: fire what was taken, extend what was renewed,
        stop what was lost, hand over what was released."""
        taken: dict[str, dict[int, tuple[float, float]]] = collections.defaultdict(dict)
        renewed: dict[int, float] = {}
        released: dict[int, float] = {}
        lost = []
        with self._lock:
            self._peers = peers
            for (verb, part, horizon, after, why), version in zip(plans, results,
                                                                   strict=False):
                if version is None:  # another replica changed it first
                    if verb != "take":
                        lost.append(part)
                        self._held.pop(part, None)
                    continue
                if verb == "release":
                    self._held.pop(part)
                    released[part] = horizon
                    continue
                self._held[part], self._renewed[part] = version, started
                self._floor[part] = horizon
                if verb == "take":
                    self._dropped.pop(part, None)
                    taken[why][part] = (after, horizon)
                else:
                    renewed[part] = horizon
        if lost:
            log.warning("replicas: lost partitions %s to another replica", lost)
            self._dropped.update(self._scheduler.drop(
                {part: self._sent.get(part, 0.0) for part in lost},
                "this replica lost the lease of its partition"))
        if released:
            log.info("replicas: handing partitions %s over (%d replicas)", sorted(released),
                     len(peers))
            self._scheduler.extend(released)  # the release was written: it fires until then
            for part, until in self._scheduler.release(released).items():
                self._releasing[part] = (until, started + until - self._clock.now())
        for why, parts in taken.items():
            log.info("replicas: took partitions %s (%d replicas; %s)", sorted(parts),
                     len(peers), why)
            self._scheduler.own(parts, why)
        self._scheduler.extend(renewed)
        done = [part for part, (_, deadline) in self._releasing.items()
                if time.monotonic() > deadline]
        if done:
            self._scheduler.drop({part: self._releasing[part][0] for part in done},
                                 "handed over")
            with self._lock:
                for part in done:
                    del self._releasing[part]

    def _fence(self) -> None:
        """Drop the partitions whose lease this replica could not renew for LEASE_FENCE
        (the scheduler already fires nothing past their horizon)."""
        stale = [part for part in self._held
                 if time.monotonic() - self._renewed[part] > LEASE_FENCE]
        if stale:
            log.warning("replicas: no renewal for %g s: stopped firing partitions %s",
                        LEASE_FENCE, stale)
            with self._lock:
                for part in stale:
                    del self._held[part]
            self._dropped.update(self._scheduler.drop(
                {part: self._sent.get(part, 0.0) for part in stale},
                "this replica could not renew its lease in time"))

    def stop(self) -> None:
        """Hand every partition over (firing on until HANDOVER when peers are alive to take
        them; alone, it stops at once), then leave. Errors are logged: the leases then
        simply run out."""
        self._stop.set()
        if self._thread:
            self._thread.join()
        held = dict(self._held)
        ahead = self._clock.now() + HANDOVER if len(self._peers) > 1 else None
        untils = self._scheduler.release(dict.fromkeys(held, ahead))
        try:
            results = self._store.write_leases(
                [(f"lease-{part}", {"kind": "lease", "owner": "", "horizon": untils[part],
                                    "from": untils[part], "by": self.id}, version)
                 for part, version in held.items()] + [(f"replica-{self.id}", None, ())],
                timeout=LEASE_CALL_TIMEOUT)
            self._scheduler.extend({part: untils[part] for part, version in zip(
                held, results, strict=False) if version is not None})
        except StoreError as exc:
            log.warning("replicas: could not hand the partitions over: %s", exc)
        last = max([*untils.values(), *(until for until, _ in self._releasing.values())],
                   default=0.0)
        while self._clock.now() < last:
            time.sleep(min(0.1, max(0.0, last - self._clock.now())))
        self._scheduler.drop({**{part: until for part, (until, _) in self._releasing.items()},
                              **untils}, "handed over")
        with self._lock:
            self._held.clear()
            self._releasing.clear()

    def health(self) -> dict:
        """Return this replica's id, the partitions it fires, the age of its oldest lease
        renewal (seconds) and the replicas it sees alive."""
        with self._lock:
            oldest = min((self._renewed[part] for part in self._held), default=None)
            return {"replica": self.id, "partitions": sorted(self._held),
                    "lease_age": None if oldest is None else
                    round(time.monotonic() - oldest, 3),
                    "replicas": list(self._peers)}


# Service ####################################################################################

class Service:
    """The operations of the API, the original's eight and ours, as plain methods; no HTTP.

    Each takes the request object and returns the reply's data (None for a plain "ok"), or
    raises ValidationError (the client's mistake; nothing changed) or StoreError (the store
    refused; nothing changed).
    """

    OPERATIONS = ("put", "get", "all", "lists", "running", "delete", "search", "clear",
                  "retry", "preview", "trigger")

    def __init__(self, config: Config, store, writer: LogWriter, clock: Clock | None = None,
                 metrics: Metrics | None = None):
        self.metrics = metrics or Metrics()
        self._config = config
        self._store = store
        self._writer = writer
        self._clock = clock or Clock()
        self._schedules = Schedules()
        self._webhooks = Webhooks(config, self.metrics)
        replicated = store.kind == "elasticsearch" and config.es_replicas
        self._scheduler = Scheduler(self._webhooks, writer.write, self._clock,
                                    config.retry_attempts, self._schedules,
                                    config.misfire_grace, self.metrics, replicated)
        self._lock = threading.Lock()  # serialises changes, so store and scheduler agree
        self._strict = not config.ignore_unknown_fields
        self.ready = threading.Event()  # set once the stored tasks are loaded
        # Replicas: the partitions' leases, and the task changes made through other replicas,
        # read every TASK_SYNC: the version and token of each task as last applied here.
        self.replicas = (Replicas(store, self._scheduler, self._clock,
                                  f"{socket.gethostname()}-{uuid.uuid4().hex[:6]}")
                         if replicated else None)
        self._applied: dict[str, tuple[tuple[int, int], str]] = {}
        self._syncing = threading.Event()  # set: stop reading other replicas' changes
        self._sync_thread: threading.Thread | None = None

    def start(self) -> int:
        """Load every stored task with its running state, start firing; return the count.

        Until it returns, ``ready`` is unset and the API answers only /health. Raises
        StoreError when the store cannot be read; calling it again then is safe.
        """
        if self.replicas is None:
            count = sum(self._apply(doc["identity"], None, "", doc)
                        for doc in self._store.load_tasks())
        else:
            count = sum(self._apply(*change) for change in self._store.task_changes()
                        if change[3] is not None)
        self._scheduler.start()
        if self.replicas is not None:
            self.replicas.start()
            self._sync_thread = threading.Thread(target=self._sync, name="sync", daemon=True)
            self._sync_thread.start()
        self.ready.set()
        return count

    def _apply(self, identity: str, version: tuple[int, int] | None, token: str,
               doc: dict | None, synced: bool = False) -> bool:
        """Apply a stored task (None: deleted) unless this replica has it already, or a
        later version of it; return True if it was applied. ``synced``: changed through
        another replica while this one runs, so what fell due since fires, late."""
        with self._lock:
            known = self._applied.get(identity)
            if known is not None and ((token and known[1] == token) or version <= known[0]):
                return False
            if version is not None:
                self._applied[identity] = (version, token)
            if doc is None:
                self._scheduler.delete(identity)
                return True
            try:
                self._scheduler.put(Task.from_document(doc), doc.get("last"), prepare=False,
                                    accounted=doc.get("accounted"),
                                    changed=doc.get("changed") if synced else None)
            except (ScheduleError, KeyError, TypeError, ValueError) as exc:
                log.error("stored task %r cannot be scheduled: %s", identity, exc)
                return False
            return True

    def _sync(self) -> None:
        """Apply the tasks put, paused, resumed or deleted through other replicas: those
        changed lately every TASK_SYNC, all of them every TASK_RESYNC."""
        # Wall time, as the writers stamp their changes (not the service's clock).
        since, full, failing = time.time(), time.monotonic(), False
        while not self._syncing.wait(TASK_SYNC):
            started = time.time()
            whole = time.monotonic() - full > TASK_RESYNC
            try:
                for change in self._store.task_changes(
                        None if whole else since - TASK_SYNC_OVERLAP):
                    self._apply(*change, synced=True)
            except StoreError as exc:
                if not failing:
                    log.warning("cannot read the tasks changed by other replicas: %s", exc)
                failing = True
                continue
            failing, since = False, started
            if whole:
                full = time.monotonic()

    def _save(self, doc: dict | None, identity: str) -> None:
        """Store a task document (None: delete the task); caller holds the lock. What this
        replica writes is applied here already: its own sync must not apply it again."""
        if self.replicas is None:
            if doc is None:
                self._store.delete_task(identity)
            else:
                self._store.save_task(doc)
            return
        token = uuid.uuid4().hex
        if doc is None:
            version = self._store.delete_task(identity, token)
        else:
            version = self._store.save_task(doc, token, not self._scheduler.fires(identity))
        self._applied[identity] = (version, token)

    def stop(self, timeout: float = 10.0) -> None:
        self._syncing.set()
        if self._sync_thread:
            self._sync_thread.join()
        if self.replicas is not None:
            self.replicas.stop()
        self._scheduler.stop(timeout)

    def _require(self, identity: str) -> Task:
        task = self._scheduler.task(identity)
        if task is None:
            raise NotFoundError(identity)
        return task

    def _view(self, task: Task) -> dict:
        zone = load_zone(task.time_zone)
        view = task.public()
        dates = self._scheduler.dates(task.identity)  # a put in between may change the keys
        for key, entry in view["entries"].items():
            next_at, last_at = dates.get(key, (None, None))
            entry["next_date"] = rfc3339(next_at, zone)
            entry["last_date"] = rfc3339(last_at, zone)
        return view

    def put(self, request: dict) -> None:
        """Create or replace a task atomically; unchanged entries keep their fire times."""
        # @every counts from the put's whole second: its fires fall on whole seconds, as in
        # robfig/cron, and X-Schedule-Time (whole seconds) names them exactly.
        received = self._clock.now()
        task = validate_task(request, math.floor(received), self._schedules,
                             self._strict, self._config.max_timeout)
        with self._lock:
            old = self._scheduler.task(task.identity)
            last, accounted = self._scheduler.marks(task.identity)
            kept = [key for key in task.entries if carries_over(old, task, key)]
            for key in kept:
                task.entries[key].anchor = old.entries[key].anchor
            last = {key: last[key] for key in kept if key in last}
            accounted = {key: accounted[key] for key in kept if key in accounted}
            self._save(task.document(last, accounted), task.identity)
            # An instant that falls while the task is stored fires, late (it is not missed).
            self._scheduler.put(task, last, accounted=accounted, changed=received)
        self._writer.write_now(make_log("put", task.identity, body=task.public()))

    def _fields(self, request: dict, endpoint: str) -> dict:
        check_fields(request, endpoint, strict=self._strict)
        return request

    def get(self, request: dict) -> dict:
        return self._view(self._require(_take(self._fields(request, "/get"), "/get",
                                              "identity")))

    def all(self, request: dict) -> list:
        self._fields(request, "/all")
        return self._scheduler.identities()

    def lists(self, request: dict) -> list:
        identities = self._fields(request, "/lists").get("identity")
        limits = REQUEST_FIELDS["/lists"]["identity"]
        if not isinstance(identities, list) or len(identities) > limits.high:
            raise ValidationError("identity", f"must be an array of at most {limits.high} "
                                              "task identities")
        views = []
        for i, identity in enumerate(identities):
            task = self._scheduler.task(_name(identity, f"identity[{i}]", limits.keys))
            if task is not None:
                views.append(self._view(task))
        return views

    def running(self, request: dict) -> None:
        """Pause or resume a task, or with ``key`` one of its entries."""
        identity = _take(self._fields(request, "/running"), "/running", "identity")
        running = _take(request, "/running", "running")
        key = request.get("key")
        with self._lock:
            task = self._require(identity)
            if key is None:
                task = dataclasses.replace(task, start=running)
            else:
                entry = self._entry(task, key, "/running")
                task = dataclasses.replace(task, entries={
                    **task.entries, key: dataclasses.replace(entry, running=running)})
            self._save(task.document(*self._scheduler.marks(identity)), identity)
            self._scheduler.set_running(task)
        body = {"identity": identity, **({} if key is None else {"key": key}),
                "running": running}
        self._writer.write_now(make_log("running", identity, body=body))

    def _entry(self, task: Task, key: Any, where: str) -> Entry:
        entry = task.entries.get(_take({"key": key}, where, "key"))
        if entry is None:
            raise ValidationError("key", f"task {task.identity!r} has no entry {key!r}")
        return entry

    def trigger(self, request: dict) -> dict:
        """Fire an entry now, once, outside its schedule (also when paused), with its
        headers, body, signature and retry policy; its log carries "trigger": true. Returns
        the fire's instant and id at once; the log says how it went."""
        identity = _take(self._fields(request, "/trigger"), "/trigger", "identity")
        key = request.get("key")
        self._entry(self._require(identity), key, "/trigger")
        try:
            fire = self._scheduler.trigger(identity, key)
        except KeyError:  # deleted or replaced in between
            raise NotFoundError(identity) from None
        return {"identity": identity, "key": key, "scheduled": fire.scheduled,
                "fire_id": fire_id(identity, key, fire.scheduled)}

    def delete(self, request: dict) -> None:
        identity = _take(self._fields(request, "/delete"), "/delete", "identity")
        with self._lock:
            self._require(identity)
            self._save(None, identity)
            self._scheduler.delete(identity)
        self._writer.write_now(make_log("delete", identity, body={"identity": identity}))

    def search(self, request: dict) -> dict:
        return search_reply(self._store.search(validate_search(request, self._strict)),
                            self._config.es_default_index)

    def clear(self, request: dict) -> None:
        self._store.clear(_take(self._fields(request, "/clear"), "/clear", "identity"))

    def retry(self, request: dict) -> dict:
        """Send one failed fire again, now, once, with its fire id; return its new log."""
        identity = _take(self._fields(request, "/retry"), "/retry", "identity")
        key = _take(request, "/retry", "key")
        scheduled = float(_take(request, "/retry", "scheduled"))
        task = self._require(identity)
        entry = self._entry(task, key, "/retry")
        found = {kind: self._store.search(validate_search(
            {"type": kind, "identity": identity, "key": key, "scheduled": scheduled,
             "limit": 1}))["records"] for kind in ("error", "success")}
        if not found["error"]:
            raise ValidationError("scheduled", "no failed fire of that entry at that instant")
        if found["success"]:
            raise ValidationError("scheduled", "that fire has succeeded since")
        webhook = Webhook(identity, key, entry, load_zone(task.time_zone),
                          self._webhooks.proxies)
        fire = Fire(webhook, scheduled, timeout=entry.timeout or self._webhooks.timeout)
        answer: concurrent.futures.Future = concurrent.futures.Future()
        sent_at = self._clock.now()

        def tried(_: Fire, outcome: dict | None) -> None:
            if answer.set_running_or_notify_cancel():
                answer.set_result(outcome)
            elif outcome is not None:  # the request stopped waiting: the log comes later
                outcome["at"] = sent_at
                self._writer.write(fire_log(webhook, scheduled, [outcome], retry_of=of))

        of = found["error"][0]["_id"]
        self._webhooks.send([fire], tried)
        try:
            outcome = answer.result(fire.timeout + 10)
        except concurrent.futures.TimeoutError:
            if answer.cancel():
                raise ValidationError("", "the fire is still waiting for a connection to its "
                                          "receiver; its log will say how it went") from None
            outcome = answer.result()
        if outcome is None:
            raise ValidationError("", "the service is shutting down; try again after it")
        outcome["at"] = sent_at
        record = fire_log(webhook, scheduled, [outcome], retry_of=of)
        self._writer.write_now(record)
        return {**_public_log(record), "_id": record["_id"]}

    def preview(self, request: dict) -> list:
        """Return the next fires of a cron_time, each with what daylight saving did to it."""
        zone_name = _take(self._fields(request, "/preview"), "/preview", "time_zone")
        try:
            zone = load_zone(zone_name if isinstance(zone_name, str) else "")
        except ScheduleError as exc:
            raise ValidationError("time_zone", str(exc)) from None
        count = _take(request, "/preview", "count")
        after = _take(request, "/preview", "after")
        after = self._clock.now() if after is None else after
        try:  # @every counts from a whole second, as for a put
            schedule = self._schedules.get(request.get("cron_time"), zone.key, math.floor(after))
        except ScheduleError as exc:
            raise ValidationError("cron_time", str(exc)) from None
        fires, t = [], after
        for _ in range(count):
            try:
                t, dst = schedule.next_fire(t)  # the scheduler's own code path
            except ScheduleError:
                break
            fires.append({"date": rfc3339(t, zone), "time": t, "dst": dst})
        return fires

    def summary(self, since: tuple[dict, list[int]]) -> tuple[str, tuple[dict, list[int]]]:
        """Return a line saying what happened since ``since`` (a Metrics.totals()), and the
        totals to give next time: fires by outcome, the tasks that failed most, missed
        fires, the lateness p99 (to its histogram bucket's bound), logs dropped."""
        now = self.metrics.totals()
        counters, buckets = (({k: v - since[0].get(k, 0) for k, v in now[0].items()}),
                             [b - a for a, b in zip(since[1], now[1], strict=True)])
        fired = {dict(labels)["outcome"]: int(v) for (name, labels), v in counters.items()
                 if name == "schedule_fires_total" and v}
        failed = self._scheduler.take_failed()
        top = ", ".join(f"{task} {count}" for task, count in failed.most_common(5))
        missed = int(sum(v for (name, _), v in counters.items()
                         if name == "schedule_fires_missed_total"))
        p99, total, seen = None, sum(buckets), 0
        for bound, hits in zip(Metrics.BUCKETS, buckets, strict=True):
            seen += hits
            if p99 is None and total and seen >= 0.99 * total:
                p99 = bound
        late = (f"lateness p99 <= {p99 * 1000:g} ms" if p99 is not None else
                "lateness p99 over 10 s" if total else "no first tries")
        outcomes = ", ".join(f"{n} {kind}" for kind, n in fired.items()) or "none"
        failures = f"; failed most: {top}" if top else ""
        line = (f"{sum(fired.values())} fires ({outcomes}){failures}; {missed} missed; "
                f"{late}; {self._writer.dropped} logs dropped in all; "
                f"{len(self._scheduler)} tasks")
        return line, now

    def metrics_text(self) -> str:
        """Return GET /metrics: the counters and histograms, and the gauges as they are."""
        state, webhooks = self._scheduler.stats(), self._webhooks.stats()
        counts = self._scheduler.counts()

        def one(text: str, value: float) -> tuple[str, list]:
            return text, [({}, value)]
        replicas = {}
        if self.replicas is not None:
            cluster = self.replicas.health()
            replicas = {
                "schedule_partitions": one("Partitions this replica fires (of "
                                           f"{PARTITIONS}).", len(cluster["partitions"])),
                "schedule_replicas": one("Replicas this one sees alive, itself included.",
                                         len(cluster["replicas"]))}
        return self.metrics.render({**replicas,
            "schedule_build_info": ("Always 1; the version as a label.",
                                    [({"version": __version__}, 1)]),
            "schedule_fires_in_flight": one("Fires being tried.", state["fires_running"]),
            "schedule_retries_waiting": one("Fires waiting for their next try.",
                                            state["retries_waiting"]),
            "schedule_webhooks_waiting": one("Requests waiting for a connection.",
                                             webhooks["webhooks_waiting"]),
            "schedule_connections_open": one("Connections open to receivers.",
                                             webhooks["connections_open"]),
            "schedule_log_backlog": one("Log records waiting in memory.",
                                        self._writer.backlog()),
            "schedule_log_spool_bytes": one("Bytes of log records in the spool.",
                                            self._writer.spooled_bytes()),
            "schedule_log_dropped": one("Log records dropped since the start (spool and "
                                        "memory full).", self._writer.dropped),
            "schedule_tasks": ("Tasks, by state.", [
                ({"state": "running"}, counts["tasks running"]),
                ({"state": "paused"}, counts["tasks paused"])]),
            "schedule_entries": ("Entries, by state.", [
                ({"state": "running"}, counts["entries running"]),
                ({"state": "paused"}, counts["entries paused"])]),
        })

    def health(self) -> dict:
        return {"version": __version__, "ready": self.ready.is_set(),
                "tasks": len(self._scheduler), **self._scheduler.stats(),
                **self._webhooks.stats(),
                "log_backlog": self._writer.backlog(),
                "log_spool_files": len(self._writer.spooled_files()),
                "log_spool_bytes": self._writer.spooled_bytes(),
                "log_dropped": self._writer.dropped, **self._store.health(),
                **(self.replicas.health() if self.replicas else {})}


# HTTP #######################################################################################

# The status page (GET /): one constant, no build step, nothing loaded from elsewhere. It
# holds no data: its script asks the JSON endpoints, with the token the person gives, so it is
# served without the token. Every value is put in as text (textContent, never innerHTML):
# identities, keys, URLs and error messages are user input.
STATUS_PAGE = r"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" href="data:,">
<title>schedule-api</title>
<style>
:root { color-scheme: light dark; --fg: #1d2330; --muted: #667085; --line: #e4e7ec;
  --bg: #fff; --head: #f6f7f9; --ok: #067647; --ok-bg: #dcfae6; --hold: #93370d;
  --hold-bg: #fef0c7; --off: #475467; --off-bg: #eaecf0; --err: #b42318; --err-bg: #fee4e2;
  --accent: #2e5aac; }
@media (prefers-color-scheme: dark) {
  :root { --fg: #e6e8ec; --muted: #98a2b3; --line: #2f3542; --bg: #14171d; --head: #1b1f27;
    --ok: #75e0a7; --ok-bg: #053321; --hold: #fec84b; --hold-bg: #4e1d09; --off: #cfd4dc;
    --off-bg: #2f3542; --err: #fda29b; --err-bg: #55160c; --accent: #84adff; } }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif;
  color: var(--fg); background: var(--bg); }
header { display: flex; flex-wrap: wrap; align-items: baseline; gap: 4px 16px;
  padding: 12px 20px; border-bottom: 1px solid var(--line); background: var(--head); }
h1 { font-size: 18px; margin: 0; }
h2 { font-size: 15px; margin: 0; }
main { padding: 0 20px 24px; }
#health { flex: 1; }
.muted { color: var(--muted); }
.small { font-size: 12px; }
.bar { display: flex; flex-wrap: wrap; align-items: center; gap: 8px 12px; margin: 20px 0 8px; }
input, select, button { font: inherit; color: inherit; }
input, select { padding: 3px 8px; border: 1px solid var(--line); border-radius: 6px;
  background: var(--bg); }
button { padding: 2px 10px; border: 1px solid var(--line); border-radius: 6px;
  background: var(--head); cursor: pointer; white-space: nowrap; }
button:hover:enabled { border-color: var(--accent); color: var(--accent); }
button:disabled { opacity: .5; cursor: default; }
table { width: 100%; border-collapse: collapse; }
th, td { text-align: left; vertical-align: top; padding: 5px 8px;
  border-bottom: 1px solid var(--line); }
th { position: sticky; top: 0; font-size: 12px; font-weight: 600; color: var(--muted);
  background: var(--head); }
tr.task td { border-top: 2px solid var(--line); }
tr.task td:first-child { font-weight: 600; }
tr.entry td:first-child { padding-left: 26px; }
code { font: 12px/1.4 ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; }
.badge { display: inline-block; padding: 0 8px; border-radius: 999px; font-size: 12px;
  font-weight: 600; white-space: nowrap; }
.running { color: var(--ok); background: var(--ok-bg); }
.paused { color: var(--hold); background: var(--hold-bg); }
.held { color: var(--off); background: var(--off-bg); }
.err { color: var(--err); }
.ok { color: var(--ok); }
.wrap { overflow-wrap: anywhere; min-width: 120px; max-width: 300px; }
.sched { min-width: 200px; }
.msg { max-width: 380px; overflow-wrap: anywhere; }
.time { white-space: nowrap; font-size: 13px; font-variant-numeric: tabular-nums; }
.empty { padding: 14px 8px; color: var(--muted); }
#problem { margin: 12px 0 0; padding: 8px 12px; border-radius: 6px; color: var(--err);
  background: var(--err-bg); }
#login { margin: 20px 0; padding: 16px; max-width: 480px; border: 1px solid var(--line);
  border-radius: 8px; background: var(--head); }
#login label { display: block; margin-bottom: 8px; font-weight: 600; }
body.locked section { display: none; }
[hidden] { display: none !important; }
</style>
</head>
<body>
<header>
  <h1>schedule-api</h1>
  <span id="health" class="muted small"></span>
  <span id="updated" class="muted small"></span>
  <label class="small"><input type="checkbox" id="auto" checked> auto-refresh</label>
  <button type="button" id="forget" hidden>Forget token</button>
</header>
<main>
<form id="login" hidden autocomplete="off">
  <label for="token">This service needs its token</label>
  <input type="password" id="token" required size="32">
  <button type="submit">Use token</button>
  <p id="login-note" class="small muted"></p>
</form>
<p id="problem" hidden></p>
<section>
  <div class="bar">
    <h2>Tasks</h2>
    <input type="search" id="filter" placeholder="Filter by identity" aria-label="Filter">
    <button type="button" id="prev">&lsaquo; Prev</button>
    <span id="range" class="muted small"></span>
    <button type="button" id="next">Next &rsaquo;</button>
    <label class="small muted">per page <select id="size">
      <option>25</option><option selected>50</option><option>100</option><option>200</option>
    </select></label>
  </div>
  <table id="tasks">
    <thead><tr><th>Task / entry</th><th>Schedule</th><th>Next fire</th><th>Last fire</th>
      <th>State</th><th>Last error</th><th></th></tr></thead>
  </table>
</section>
<section>
  <div class="bar"><h2>Latest failed fires</h2>
    <span class="muted small">all tasks, newest first; times in each task's zone</span></div>
  <table id="errors">
    <thead><tr><th>Due</th><th>Task</th><th>Entry</th><th>Error</th><th>Tries</th><th></th>
      </tr></thead>
    <tbody id="error-rows"></tbody>
  </table>
</section>
</main>
<script>
"use strict";
const TOKEN = "schedule-api-token";  // sessionStorage: this tab only
const ZERO_DATE = "0001-01-01T00:00:00Z";
const ERRORS_READ = 100, ERRORS_SHOWN = 20;
const EVERY = Math.max(1, Number(new URLSearchParams(location.search).get("refresh")) || 5);
const $ = (id) => document.getElementById(id);
const view = {page: 0, size: 50, filter: "", drawn: ""};
const resent = new Map();  // fire -> what its re-send gave, while the tab lives
let timer = null, loading = null, again = false, asking = false;

class NeedToken extends Error {}

// Every value goes in as text: append() makes a Text node of a string, and attributes are
// set by name from this script only; nothing is ever parsed as HTML.
function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value !== null && value !== undefined) node.setAttribute(name, String(value));
  }
  for (const child of children.flat()) {
    if (child !== null && child !== undefined) node.append(child);
  }
  return node;
}

async function api(path, body) {
  const headers = {"Content-Type": "application/json"};
  const token = sessionStorage.getItem(TOKEN);
  // A header carries Latin-1 only (fetch refuses the rest): such a token cannot be right.
  if (token && /[^\x00-\xff]/.test(token)) throw new NeedToken(path);
  if (token) headers.Authorization = "Bearer " + token;
  const reply = await fetch(path, {method: "POST", headers, cache: "no-store",
                                   body: JSON.stringify(body || {})});
  if (reply.status === 401) throw new NeedToken(path);
  let payload = null;
  try { payload = await reply.json(); } catch (e) { payload = null; }
  if (!payload || payload.error !== 0) {
    throw new Error(path + ": " + ((payload && payload.msg) || "HTTP " + reply.status));
  }
  return payload.data;
}

// Times as the API gives them (RFC 3339 in the task's zone), spaced for reading.
function readable(date) {
  if (!date || date === ZERO_DATE) return null;
  return date.replace("T", " ").replace(/(Z|[+-]\d\d:\d\d)$/, " $1");
}

// A log's instant (unix seconds) in the task's zone, in the same shape.
function inZone(seconds, zone) {
  const at = new Date(Math.floor(seconds) * 1000);
  try {
    const fmt = new Intl.DateTimeFormat("en-US", {timeZone: zone || "UTC", hourCycle: "h23",
      year: "numeric", month: "2-digit", day: "2-digit", hour: "2-digit", minute: "2-digit",
      second: "2-digit", timeZoneName: "longOffset"});
    const p = Object.fromEntries(fmt.formatToParts(at).map((part) => [part.type, part.value]));
    const offset = p.timeZoneName === "GMT" ? "Z" : p.timeZoneName.replace("GMT", "");
    return `${p.year}-${p.month}-${p.day} ${p.hour}:${p.minute}:${p.second} ${offset}`;
  } catch (e) {
    return at.toISOString().replace("T", " ").replace(".000Z", " Z");
  }
}

function badge(kind, text, title) {
  return el("span", {class: "badge " + kind, title}, text || kind);
}

function problemOf(log) {
  return (log.message || []).join("; ") || (log.status ? "HTTP " + log.status : "failed");
}

function clip(text, size) {
  return text.length > size ? text.slice(0, size) + "..." : text;
}

function breakable(text) {  // a URL may wrap after a slash, ? or &, as text still
  return text.split(/(?<=[/?&])/).flatMap((part, i) => i ? [el("wbr"), part] : [part]);
}

function button(label, kind, action) {
  const node = el("button", {type: "button", class: kind});
  node.append(label);
  node.addEventListener("click", () => act(node, action));
  return node;
}

async function act(node, action) {
  node.disabled = true;
  try {
    await action();
    showProblem(null);
  } catch (e) {
    if (e instanceof NeedToken) askToken(); else showProblem(e.message);
  }
  refresh();
}

function setRunning(body) {
  return () => api("/running", body);
}

function resend(log, fire) {
  return async () => {
    resent.set(fire, {ok: null, text: "sending..."});
    draw();
    try {
      const got = await api("/retry", {identity: log.identity, key: log.key,
                                       scheduled: log.scheduled});
      resent.set(fire, got.type === "success"
        ? {ok: true, text: "re-sent: success" + (got.status ? " (HTTP " + got.status + ")" : "")}
        : {ok: false, text: "re-sent: failed again: " + problemOf(got)});
    } catch (e) {
      resent.delete(fire);
      throw e;
    }
  };
}

function taskRows(task, lastErrors) {
  const body = el("tbody", {"data-identity": task.identity});
  const keys = Object.keys(task.entries).sort();
  const failing = keys.filter((key) => lastErrors.has(JSON.stringify([task.identity, key])));
  body.append(el("tr", {class: "task"},
    el("td", {class: "wrap"}, el("span", {class: "identity"}, task.identity),
       el("div", {class: "muted small zone"}, task.time_zone)),
    el("td", {class: "muted small"}, keys.length + (keys.length === 1 ? " entry" : " entries")),
    el("td"), el("td"),
    el("td", {class: "state"}, task.start ? badge("running") : badge("paused")),
    el("td", {class: "small err"}, failing.length
      ? `${failing.length} ${failing.length === 1 ? "entry" : "entries"} failing` : null),
    el("td", {}, task.start
      ? button("Pause", "pause-task", setRunning({identity: task.identity, running: false}))
      : button("Resume", "resume-task", setRunning({identity: task.identity, running: true})))));
  for (const key of keys) {
    const entry = task.entries[key];
    const on = entry.running !== false;
    const error = lastErrors.get(JSON.stringify([task.identity, key]));
    const state = !task.start ? badge("held", "task paused", "the whole task is paused")
      : on ? badge("running") : badge("paused");
    const next = readable(entry.next_date);
    const last = readable(entry.last_date);
    const target = {identity: task.identity, key};
    body.append(el("tr", {class: "entry", "data-key": key},
      el("td", {class: "wrap key"}, key),
      el("td", {class: "wrap sched"}, el("code", {}, entry.cron_time),
         el("div", {class: "muted small"}, (entry.method || "POST") + " ",
            breakable(entry.url))),
      el("td", {class: "time next"}, next || el("span", {class: "muted"}, "-")),
      el("td", {class: "time last"}, last || el("span", {class: "muted"}, "never")),
      el("td", {class: "state"}, state),
      el("td", {class: "small msg last-error"}, error ? [
        el("span", {class: "err"}, clip(problemOf(error), 200)),
        el("div", {class: "muted time"}, inZone(error.scheduled ?? error.time,
                                                task.time_zone))] : null),
      el("td", {}, on
        ? button("Pause entry", "pause-entry", setRunning({...target, running: false}))
        : button("Resume entry", "resume-entry", setRunning({...target, running: true})))));
  }
  return body;
}

function errorRow(log, task) {
  const fire = JSON.stringify([log.identity, log.key, log.scheduled]);
  const done = resent.get(fire);
  const reply = log.response === null || log.response === undefined ? null
    : typeof log.response === "string" ? log.response : JSON.stringify(log.response);
  const notes = [log.trigger ? "fired now (/trigger)" : null, log.retry_of ? "a re-send" : null]
    .filter(Boolean).join(", ");
  const can = task && task.entries[log.key] && !(done && done.ok !== false);
  return el("tr", {class: "error-row", "data-identity": log.identity, "data-key": log.key},
    el("td", {class: "time"}, inZone(log.scheduled ?? log.time, task && task.time_zone)),
    el("td", {class: "wrap identity"}, log.identity),
    el("td", {class: "wrap key"}, log.key),
    el("td", {class: "msg"}, el("span", {class: "err message"}, clip(problemOf(log), 300)),
       reply ? el("div", {class: "muted small"}, "reply: " + clip(reply, 200)) : null,
       notes ? el("div", {class: "muted small"}, notes) : null),
    el("td", {}, log.attempts ?? ""),
    el("td", {}, done ? el("div", {class: "small resent "
                                   + (done.ok ? "ok" : done.ok === null ? "muted" : "err")},
                           done.text) : null,
       can ? button("Re-send", "resend", resend(log, fire)) : null));
}

let latest = null;  // what the latest load read; drawn again when a re-send changes

// A redraw waits while a button is pressed or text is selected: a click or a selection is
// never lost to a refresh.
let pressed = false;

function draw() {
  if (!latest || pressed || String(getSelection()).trim()) return;
  const {page, tasks, errors, matching, total} = latest;
  const signature = JSON.stringify([latest.signature, [...resent]]);
  if (signature === view.drawn) return;  // unchanged: leave the DOM (and focus) alone
  view.drawn = signature;
  const byIdentity = new Map(tasks.map((task) => [task.identity, task]));
  const lastErrors = new Map();
  for (const log of errors) {
    const at = JSON.stringify([log.identity, log.key]);
    if (!lastErrors.has(at)) lastErrors.set(at, log);
  }
  const table = $("tasks");
  table.querySelectorAll("tbody").forEach((old) => old.remove());
  const shown = page.map((identity) => byIdentity.get(identity)).filter(Boolean);
  for (const task of shown) table.append(taskRows(task, lastErrors));
  if (!shown.length) {
    table.append(el("tbody", {}, el("tr", {}, el("td", {colspan: 7, class: "empty"},
      total ? "No task matches the filter." : "No tasks yet: put one with POST /put."))));
  }
  const first = view.page * view.size;
  const tasksOf = (n) => n + (n === 1 ? " task" : " tasks");
  $("range").textContent = matching ? `${first + 1}-${first + page.length} of ${tasksOf(matching)}`
    + (matching < total ? ` (filtered from ${total})` : "") : `0 of ${tasksOf(total)}`;
  $("prev").disabled = view.page === 0;
  $("next").disabled = first + page.length >= matching;
  const rows = $("error-rows");
  rows.replaceChildren(...errors.slice(0, ERRORS_SHOWN).map(
    (log) => errorRow(log, byIdentity.get(log.identity))));
  if (!rows.children.length) {
    rows.append(el("tr", {}, el("td", {colspan: 6, class: "empty"}, "No failed fires logged.")));
  }
}

async function showHealth() {
  try {
    const h = (await (await fetch("/health", {cache: "no-store"})).json()).data;
    $("health").textContent = `v${h.version} \u00b7 ${h.tasks} tasks \u00b7 store ${h.store} `
      + (h.ok ? "ok" : "NOT OK") + (h.ready ? "" : " \u00b7 starting")
      + ` \u00b7 ${h.fires_running} fires running`
      + (h.log_dropped ? ` \u00b7 ${h.log_dropped} logs dropped` : "");
  } catch (e) {
    $("health").textContent = "the service does not answer";
  }
}

async function load() {
  showHealth();
  try {
    const [ids, found] = await Promise.all([
      api("/all"), api("/search", {type: "error", limit: ERRORS_READ})]);
    const needle = view.filter.trim().toLowerCase();
    const matching = needle ? ids.filter((id) => id.toLowerCase().includes(needle)) : ids;
    const pages = Math.max(1, Math.ceil(matching.length / view.size));
    view.page = Math.min(view.page, pages - 1);  // the last page, if this one went away
    const page = matching.slice(view.page * view.size, (view.page + 1) * view.size);
    const errors = found.hits.hits.map((hit) => hit._source);
    const named = errors.slice(0, ERRORS_SHOWN).map((log) => log.identity);
    const wanted = [...new Set([...page, ...named])];
    const tasks = wanted.length ? await api("/lists", {identity: wanted}) : [];
    latest = {page, tasks, errors, matching: matching.length, total: ids.length};
    latest.signature = JSON.stringify([page, tasks, errors, view.page, view.size, ids.length,
                                     matching.length]);
    draw();
    showProblem(null);
    $("updated").textContent = "updated " + new Date().toLocaleTimeString();
  } catch (e) {
    if (e instanceof NeedToken) askToken(); else showProblem(e.message);
  }
}

function refresh() {
  if (loading) { again = true; return loading; }
  clearTimeout(timer);
  loading = load().finally(() => {
    loading = null;
    if (again) { again = false; refresh(); } else later();
  });
  return loading;
}

function later() {
  clearTimeout(timer);
  if ($("auto").checked && !asking) timer = setTimeout(refresh, EVERY * 1000);
}

function showProblem(text) {
  $("problem").hidden = !text;
  $("problem").textContent = text || "";
}

function askToken() {
  if (asking) return;
  asking = true;
  clearTimeout(timer);
  const refused = sessionStorage.getItem(TOKEN) !== null;
  sessionStorage.removeItem(TOKEN);
  $("login-note").textContent = (refused ? "That token was refused. " : "")
    + "It is kept for this tab only and sent as Authorization: Bearer.";
  document.body.classList.add("locked");
  $("forget").hidden = true;
  $("login").hidden = false;
  $("token").focus();
}

$("login").addEventListener("submit", (event) => {
  event.preventDefault();
  sessionStorage.setItem(TOKEN, $("token").value);
  $("token").value = "";
  $("login").hidden = true;
  document.body.classList.remove("locked");
  $("forget").hidden = false;
  asking = false;
  view.drawn = "";
  refresh();
});
$("forget").addEventListener("click", () => {
  sessionStorage.removeItem(TOKEN);
  location.reload();
});
let typing = null;
$("filter").addEventListener("input", () => {
  clearTimeout(typing);
  typing = setTimeout(() => { view.filter = $("filter").value; view.page = 0; refresh(); }, 250);
});
$("size").addEventListener("change", () => {
  view.size = Number($("size").value);
  view.page = 0;
  refresh();
});
$("prev").addEventListener("click", () => { view.page = Math.max(0, view.page - 1); refresh(); });
$("next").addEventListener("click", () => { view.page += 1; refresh(); });
$("auto").addEventListener("change", later);
document.addEventListener("pointerdown", () => { pressed = true; });
document.addEventListener("pointerup", () => { pressed = false; setTimeout(draw); });
document.addEventListener("selectionchange", () => {
  if (!String(getSelection()).trim()) draw();
});
$("auto").parentElement.title = `every ${EVERY} s`;
$("forget").hidden = sessionStorage.getItem(TOKEN) === null;
refresh();
</script>
</body>
</html>
"""


def _inline_source(page: str, tag: str) -> str:
    """Return the CSP source naming the page's one inline <tag>: its SHA-256 (CSP 3)."""
    text = re.search(rf"<{tag}>(.*?)</{tag}>", page, re.DOTALL).group(1)
    return f"'sha256-{base64.b64encode(hashlib.sha256(text.encode()).digest()).decode()}'"


# Hashes rather than a nonce: the page stays one constant (no per-request templating) and
# only this exact script and style run; no 'unsafe-inline' at all. The script may talk to
# this origin only (connect-src 'self'); nothing else may load, frame it or be posted to.
STATUS_PAGE_CSP = (
    f"default-src 'none'; script-src {_inline_source(STATUS_PAGE, 'script')}; "
    f"style-src {_inline_source(STATUS_PAGE, 'style')}; connect-src 'self'; img-src data:; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
STATUS_PAGE_HEADERS = (
    ("Content-Security-Policy", STATUS_PAGE_CSP),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
    ("Cache-Control", "no-cache"),
)


# What each operation does and what its reply's data is (None: a plain {"error": 0, "msg":
# "ok"}), for GET /openapi.json; the requests come from REQUEST_FIELDS.
_DATE = {"type": "string", "format": "date-time",
         "description": f"RFC 3339 in the task's zone; {ZERO_DATE} for none"}
_LOG = {"type": "object", "required": ["type", "identity", "time"],
        "properties": {"type": {"enum": list(LOG_TYPES)}, "identity": {"type": "string"},
                       "time": {"type": "integer", "description": "UNIX seconds"}},
        "description": "a log: put, running and delete carry the request as body; success "
                       "and error the fire (README, /search)"}
_OPERATIONS: dict[str, tuple[str, dict | None]] = {
    "put": ("Create or replace a task", None),
    "get": ("One task, with next_date and last_date of each entry",
            {"$ref": "#/components/schemas/Task"}),
    "all": ("The identities of all tasks", {"type": "array", "items": {"type": "string"}}),
    "lists": ("Several tasks by identity", {"type": "array",
                                            "items": {"$ref": "#/components/schemas/Task"}}),
    "running": ("Pause or resume a task, or one of its entries", None),
    "delete": ("Stop and delete a task", None),
    "search": ("Search the logs, newest first, in Elasticsearch's shape", {
        "type": "object", "required": ["hits"], "properties": {"hits": {
            "type": "object", "required": ["total", "max_score", "hits"], "properties": {
                "total": {"type": "object", "required": ["value", "relation"],
                          "properties": {"value": {"type": "integer", "minimum": 0},
                                         "relation": {"const": "eq"}}},
                "max_score": {"type": "null"},
                "hits": {"type": "array", "items": {
                    "type": "object", "required": ["_index", "_type", "_id", "_score",
                                                   "_source"],
                    "properties": {"_index": {"type": "string"}, "_type": {"type": "string"},
                                   "_id": {"type": "string"}, "_score": {"type": "null"},
                                   "_source": _LOG}}}}}}}),
    "clear": ("Delete the logs of one task", None),
    "retry": ("Send a failed fire again, now, once; its new log",
              {**_LOG, "required": [*_LOG["required"], "_id"]}),
    "preview": ("The next fires of a cron_time, with what daylight saving did", {
        "type": "array", "items": {
            "type": "object", "required": ["date", "time", "dst"], "additionalProperties": False,
            "properties": {"date": _DATE, "time": {"type": "number"},
                           "dst": {"enum": ["moved", "merged", "repeated", None]}}}}),
    "trigger": ("Fire an entry now, once, outside its schedule", {
        "type": "object", "required": ["identity", "key", "scheduled", "fire_id"],
        "additionalProperties": False,
        "properties": {"identity": {"type": "string"}, "key": {"type": "string"},
                       "scheduled": {"type": "number"}, "fire_id": {"type": "string"}}}),
}


# A request of each operation, as README shows them.
_REQUEST_EXAMPLES = {
    "put": {"identity": "test", "time_zone": "Asia/Shanghai", "start": True, "entries": {
        "index": {"cron_time": "*/10 * * * * *", "url": "http://127.0.0.1:8080/",
                  "headers": {"Authorization": "Bearer abc"}, "body": {"hello": "world"}}}},
    "get": {"identity": "test"},
    "all": {},
    "lists": {"identity": ["test", "other"]},
    "running": {"identity": "test", "key": "index", "running": False},
    "delete": {"identity": "test"},
    "search": {"identity": "test", "type": "error", "limit": 20, "skip": 0,
               "time": {"gte": 1574902660, "lte": 1574903060}},
    "clear": {"identity": "test"},
    "retry": {"identity": "test", "key": "index", "scheduled": 1795593600},
    "preview": {"cron_time": "0 30 2 * * *", "time_zone": "America/New_York", "count": 2,
                "after": 1710000000},
    "trigger": {"identity": "test", "key": "index"},
}


def openapi_document(config: Config) -> dict:
    """Return the OpenAPI 3.1 document of the API as ``config`` serves it: each operation's
    request from REQUEST_FIELDS (the table validation checks against; additionalProperties
    false unless [server] ignore_unknown_fields), its replies, the statuses every endpoint
    may answer, and the bearer token when one is set. /openapi.json and /health are public.
    """
    strict = not config.ignore_unknown_fields
    error = {"$ref": "#/components/schemas/Error"}

    def envelope(status: int, why: str, headers: dict | None = None) -> tuple[str, dict]:
        answer = {"description": why, "content": {"application/json": {"schema": error}}}
        return str(status), {**answer, "headers": headers} if headers else answer
    common = dict([envelope(400, "malformed HTTP (a Content-Length that is not a number)")])
    guarded = dict([envelope(401, "missing or wrong Authorization: Bearer <token>", {
        "WWW-Authenticate": {"schema": {"const": "Bearer"}}})]) if config.token else {}
    view = request_schema("/put", strict, config)
    entry = view["properties"]["entries"]["additionalProperties"]
    entry["properties"].update(next_date=_DATE, last_date=_DATE)
    entry["required"] = ["cron_time", "url", "headers", "body", "next_date", "last_date"]
    view["required"] = ["identity", "time_zone", "start", "entries"]
    paths = {}
    for op in Service.OPERATIONS:
        summary, data = _OPERATIONS[op]
        fields = REQUEST_FIELDS[f"/{op}"]
        success = {"type": "object", "additionalProperties": False,
                   "required": ["error", "msg" if data is None else "data"],
                   "properties": {"error": {"const": 0}, **(
                       {"msg": {"const": "ok"}} if data is None else {"data": data})}}
        paths[f"/{op}"] = {"post": {
            "operationId": op, "summary": summary,
            "requestBody": {
                # An empty body counts as {}: required only where some field is.
                "required": any(spec.required for spec in fields.values()),
                "content": {"application/json": {
                    "schema": request_schema(f"/{op}", strict, config),
                    "example": _REQUEST_EXAMPLES[op]}}},
            "responses": {
                "200": {"description": "done (error 0), or refused, naming the field, with "
                                       "nothing changed (error 1)",
                        "content": {"application/json": {"schema": {
                            "oneOf": [success, error]}}}},
                **common, **guarded,
                **dict([envelope(411, "a chunked body: send a Content-Length"),
                        envelope(413, f"a body over {config.max_body_bytes} bytes, unread"),
                        envelope(500, "a bug; the service log has the traceback"),
                        envelope(503, "starting: the stored tasks are still loading", {
                            "Retry-After": {"schema": {"type": "integer"}}})])}}}
    health = {"type": "object", "required": ["version", "ready", "tasks", "store", "ok"],
              "properties": {"version": {"type": "string"}, "ready": {"type": "boolean"},
                             "tasks": {"type": "integer"}, "store": {"type": "string"},
                             "ok": {"type": "boolean"},
                             # with Elasticsearch (README, "Several replicas"):
                             "replica": {"type": "string"},
                             "partitions": {"type": "array", "items": {"type": "integer"}},
                             "lease_age": {"type": ["number", "null"]},
                             "replicas": {"type": "array", "items": {"type": "string"}}}}
    paths["/health"] = {"get": {
        "operationId": "health", "summary": "The store's state, for load balancers; public",
        "security": [], "responses": {"200": {
            "description": "always, while the service runs",
            "content": {"application/json": {"schema": {
                "type": "object", "required": ["error", "data"], "additionalProperties": False,
                "properties": {"error": {"const": 0}, "data": health}}}}}, **common}}}
    paths["/metrics"] = {"get": {
        "operationId": "metrics", "summary": "Prometheus' text format 0.0.4",
        **({"security": []} if config.metrics_public else {}),
        "responses": {"200": {"description": "the metrics (README, Metrics)",
                              "content": {"text/plain": {"schema": {"type": "string"}}}},
                      **common, **({} if config.metrics_public else guarded)}}}
    paths["/"] = {"get": {
        "operationId": "statusPage", "summary": "The status page for a person with a browser;"
        " public (it holds no data: its script calls the operations with the token)",
        "security": [], "responses": {"200": {"description": "the page",
                                              "content": {"text/html": {"schema": {
                                                  "type": "string"}}}}, **common}}}
    paths["/openapi.json"] = {"get": {
        "operationId": "openapi", "summary": "This document; public", "security": [],
        "responses": {"200": {"description": "OpenAPI 3.1",
                              "content": {"application/json": {"schema": {"type": "object"}}}},
                      **common}}}
    document = {
        "openapi": "3.1.0",
        "info": {"title": "schedule-api", "version": __version__, "description": (
            "Fires webhooks on cron schedules. Every operation takes POST with a JSON object "
            f"(at most {config.max_body_bytes} bytes, nested at most {MAX_JSON_DEPTH} levels;"
            " an empty body is {}) and answers HTTP 200 with {\"error\": 0, ...} or "
            "{\"error\": 1, \"msg\": \"...\"}; other statuses carry the same envelope. An "
            "unknown path answers 404, another method 405. Rules beyond this document "
            "(a cron_time that parses, a zone that exists, GET and DELETE webhooks without a "
            f"body, skip + limit at most {MAX_SEARCH_WINDOW}) are refused the same way, naming "
            "the field.")},
        "paths": paths,
        "components": {"schemas": {"Task": view, "Error": {
            "type": "object", "required": ["error", "msg"], "additionalProperties": False,
            "properties": {"error": {"const": 1}, "msg": {"type": "string"}}}}},
    }
    if config.token:
        document["components"]["securitySchemes"] = {"bearer": {"type": "http",
                                                                 "scheme": "bearer"}}
        document["security"] = [{"bearer": []}]
    return document


class _Handler(http.server.BaseHTTPRequestHandler):
    """JSON in, JSON out. A client's mistake is answered at once; anything else is logged
    with its traceback in one place and answered with a 500 envelope."""

    protocol_version = "HTTP/1.1"  # keep-alive
    server: _Server

    def version_string(self) -> str:
        return USER_AGENT
    disable_nagle_algorithm = True  # else a reply sent in two writes waits ~40 ms for an ACK

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)

    _body_read = True  # send_error() may answer before _dispatch() ran

    def send_error(self, code: int, message: str | None = None, explain: str | None = None):
        # The base class answers malformed requests with HTML; ours are JSON like the rest.
        self.close_connection = True
        self._reply(code, {"error": 1, "msg": message or self.responses.get(code, ("",))[0]})

    def _reply(self, status: int, payload: dict, headers: Iterable[tuple[str, str]] = ()):
        self._answer(status, json.dumps(payload).encode(), "application/json", headers)

    def _answer(self, status: int, body: bytes, content_type: str,
                headers: Iterable[tuple[str, str]] = ()):
        if not self._body_read and self.headers.get("Content-Length", "0").strip() != "0":
            # Answered without reading the body: the connection cannot serve another request.
            self.close_connection = True
        path = urllib.parse.urlsplit(getattr(self, "path", "")).path.rstrip("/") or "/"
        known = path in ("/", "/health", "/metrics", "/openapi.json") or \
            path[1:] in Service.OPERATIONS
        self.server.service.metrics.count("schedule_http_requests_total",
                                          endpoint=path if known else "other",
                                          status=str(status))
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            for name, value in headers:
                self.send_header(name, value)
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)
        except OSError:  # the client hung up; nothing to answer
            self.close_connection = True

    def _fail(self, status: int, message: str, headers: Iterable[tuple[str, str]] = ()):
        self._reply(status, {"error": 1, "msg": message}, headers)

    def _read_request(self) -> dict | None:
        """Return the request object, or answer the client's mistake and return None."""
        limit = self.server.config.max_body_bytes
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True
            self._fail(411, "send the body with a Content-Length, not chunked")
            return None
        try:
            length = int(self.headers.get("Content-Length", "0"))
            if length < 0:
                raise ValueError
        except ValueError:
            self.close_connection = True
            self._fail(400, "Content-Length is not a number")
            return None
        if length > limit:
            self.close_connection = True  # refuse without reading it
            self._fail(413, f"request body is over {limit} bytes")
            return None
        # The socket timeout bounds each read; this bounds them all, so a client that sends
        # its body a byte at a time cannot hold a thread for long.
        deadline = time.monotonic() + self.server.config.request_timeout
        raw = b""
        while len(raw) < length and time.monotonic() < deadline:
            chunk = self.rfile.read1(length - len(raw))
            if not chunk:
                break
            raw += chunk
        self._body_read = True
        if len(raw) < length:  # the client hung up, or was too slow: nothing to answer
            self.close_connection = True
            return None
        if not raw.strip():
            return {}
        try:
            request = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
        except UnicodeDecodeError:
            self._fail(200, "request body is not valid UTF-8")
            return None
        except RecursionError:
            self._fail(200, f"request body is nested deeper than {MAX_JSON_DEPTH} levels")
            return None
        except ValueError as exc:
            self._fail(200, f"request body is not valid JSON: {exc}")
            return None
        if not isinstance(request, dict):
            self._fail(200, "request body must be a JSON object")
            return None
        try:
            _check_json(request, "request body")
        except ValidationError as exc:
            self._fail(200, str(exc))
            return None
        return request

    def _authorized(self) -> bool:
        """Return True when no token is set or the request carries it; else answer 401."""
        token = self.server.config.token
        if not token:
            return True
        # The scheme is case-insensitive (RFC 9110 11.1): "bearer x" is "Bearer x".
        scheme, _, given = self.headers.get("Authorization", "").strip().partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(
                given.strip().encode("utf-8", "replace"), token.encode()):
            return True
        self._fail(401, "missing or wrong Authorization: Bearer <token>",
                   [("WWW-Authenticate", "Bearer")])
        return False

    def _dispatch(self) -> None:
        self._body_read = False
        path = urllib.parse.urlsplit(self.path).path.rstrip("/") or "/"
        name = path[1:]
        if path == "/health":
            self._reply(200, {"error": 0, "data": self.server.service.health()})
            return
        if path == "/":  # the status page holds no data: served without the token
            if self.command in ("GET", "HEAD"):
                self._answer(200, STATUS_PAGE.encode(), "text/html; charset=utf-8",
                             STATUS_PAGE_HEADERS)
            else:
                self._fail(405, "/ takes GET", [("Allow", "GET, HEAD")])
            return
        if path == "/openapi.json":  # public, as /health: the API's shape, no data in it
            self._answer(200, self.server.openapi, "application/json")
            return
        if path == "/metrics":  # Prometheus scrapes with GET
            if self.server.config.metrics_public or self._authorized():
                self._answer(200, self.server.service.metrics_text().encode(),
                             "text/plain; version=0.0.4; charset=utf-8")
            return
        if name not in Service.OPERATIONS:
            self._fail(404, f"no endpoint {path}; endpoints: "
                            + ", ".join("/" + op for op in Service.OPERATIONS))
            return
        if self.command != "POST":
            self._fail(405, f"{path} takes POST", [("Allow", "POST")])
            return
        if not self.server.service.ready.is_set():
            self._fail(503, "starting: the stored tasks are still loading; try again shortly",
                       [("Retry-After", "1")])
            return
        if not self._authorized():
            return
        request = self._read_request()
        if request is None:
            return
        try:
            data = getattr(self.server.service, name)(request)
        except ValidationError as exc:
            self._fail(200, str(exc))
        except StoreError as exc:
            log.warning("%s refused by the store: %s", path, exc)
            self.server.service.metrics.count("schedule_store_errors_total")
            self._fail(200, f"store unavailable, nothing changed: {exc}")
        except Exception:
            log.exception("%s failed", path)
            self._fail(500, "internal error; the service log has the details")
        else:
            self._reply(200, {"error": 0, "msg": "ok"} if data is None else
                        {"error": 0, "data": data})

    do_POST = do_GET = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = _dispatch

    def __getattr__(self, name: str) -> Any:
        # Every other method (TRACE, QUERY, ...) goes through the routes too, and is a 404 or
        # a 405 as a route table answers it, not the base class's 501: a server error to
        # clients and fuzzers, for what is the client's choice (found by schemathesis).
        if name.startswith("do_"):
            return self._dispatch
        raise AttributeError(name)


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128  # socketserver's 5 resets connections under a few dozen clients

    def __init__(self, config: Config, service: Service):
        self.config = config
        self.service = service
        self.openapi = json.dumps(openapi_document(config)).encode()
        handler = type("Handler", (_Handler,), {"timeout": config.request_timeout})
        super().__init__((config.host, config.port), handler)

    def handle_error(self, request, client_address) -> None:
        log.debug("connection from %s failed", client_address, exc_info=True)  # noqa: LOG014


def make_server(config: Config, service: Service) -> _Server:
    """Return a bound (not yet serving) HTTP server for the service."""
    return _Server(config, service)


# Main #######################################################################################

def open_store(config: Config):
    """Return the Elasticsearch store when [elasticsearch] hosts is set, else SQLite."""
    if config.es_hosts:
        return ElasticsearchStore(config)
    return SQLiteStore(config.data)


class App:
    """The whole service built from a Config: store, log writer, scheduler, service, server."""

    def __init__(self, config: Config, clock: Clock | None = None):
        self.config = config
        self.store = open_store(config)
        self.metrics = Metrics()
        days = config.log_retention_days
        if days < 0:  # the store's default
            days = SQLITE_RETENTION_DAYS if self.store.kind == "sqlite" else 0.0
        self.writer = LogWriter(self.store, os.path.join(config.data, "spool"),
                                interval=config.flush_interval,
                                spool_max_bytes=config.spool_max_bytes,
                                retention=days * 86400, max_bytes=config.max_log_bytes,
                                metrics=self.metrics)
        self.service = Service(config, self.store, self.writer, clock, self.metrics)
        self.server = make_server(config, self.service)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{'127.0.0.1' if host == '0.0.0.0' else host}:{port}"

    def start(self) -> None:
        """Serve HTTP from a thread (/health answers at once), then load the tasks and start
        firing. Raises StoreError if the store cannot be read; calling it again is safe."""
        if self._thread is None:
            self._thread = threading.Thread(target=self.server.serve_forever, args=(0.05,),
                                            daemon=True)
            self._thread.start()
            host, port = self.server.server_address[:2]
            log.info("schedule-api %s listening on http://%s:%d", __version__, host, port)
        count = self.service.start()
        log.info("ready: %d tasks loaded from the %s store", count, self.store.kind)

    def close(self, timeout: float = 10.0) -> None:
        """Stop accepting, let webhooks in flight finish, flush the logs, close the store."""
        if self._thread:
            self.server.shutdown()
        self.server.server_close()
        self.service.stop(timeout)
        self.writer.close(timeout)
        self.store.close()


class _JsonFormatter(logging.Formatter):
    """One JSON object a line, for log shippers: time, level, logger, message (and the
    traceback, when there is one)."""

    def format(self, record: logging.LogRecord) -> str:
        line = {"time": datetime.fromtimestamp(record.created, UTC).isoformat(
                    timespec="milliseconds").replace("+00:00", "Z"),
                "level": record.levelname, "logger": record.name,
                "message": record.getMessage()}
        if record.exc_info:
            line["traceback"] = self.formatException(record.exc_info)
        return json.dumps(line)


def _raise_open_files_limit() -> None:
    """Raise the soft limit of open files to the hard one, as Go's runtime does: a burst to
    many receivers needs max_connections sockets, and 1,024 is a common soft limit."""
    try:
        import resource
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ImportError, ValueError, OSError) as exc:  # not on this system, or not allowed
        log.debug("open files limit unchanged: %s", exc)


def _call(base: str, path: str, body: dict, token: str = "") -> Any:
    """POST a JSON body to an endpoint of a schedule-api (ours or the original); return the
    reply's data. Raises ValidationError with the message of an error reply, and
    ConnectionError when the service does not answer (or answers what is not its API)."""
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(base.rstrip("/") + path, json.dumps(body).encode(),
                                     headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=60) as reply:
            answer = json.loads(reply.read())
    except urllib.error.HTTPError as exc:
        if exc.code >= 500 or exc.code in (401, 404, 405):  # not a refusal of this task
            raise ConnectionError(f"{base}{path} answered HTTP {exc.code}") from None
        try:
            answer = json.loads(exc.read())
        except ValueError:
            raise ConnectionError(f"{base}{path} answered HTTP {exc.code}") from None
    except (OSError, ValueError) as exc:
        raise ConnectionError(f"{base} did not answer: {exc}") from None
    if not isinstance(answer, dict) or answer.get("error") != 0:
        raise ValidationError(path, str(answer.get("msg") if isinstance(answer, dict)
                                        else answer))
    return answer.get("data")


def import_tasks(source: str, into: str, source_token: str = "", token: str = "",
                 out=sys.stdout) -> tuple[int, int]:
    """Copy every task of a running schedule-api at ``source`` (the Go original or ours)
    into ours at ``into``, through their APIs: /all and /lists there, /put here, so each
    task is checked by our validation and scheduled at once, paused ones paused. Putting
    the same task again changes nothing (an unchanged entry keeps its next and last fire):
    running it twice is safe. Prints a line per task; returns (copied, refused)."""
    identities = _call(source, "/all", {}, source_token) or []
    copied = refused = 0
    for start in range(0, len(identities), MAX_LISTS):
        for task in _call(source, "/lists", {"identity": identities[start:start + MAX_LISTS]},
                          source_token) or []:
            identity = task.get("identity")
            try:
                _call(into, "/put", task, token)
            except ValidationError as exc:
                refused += 1
                print(f"refused {identity!r}: {exc}", file=out)
                continue
            copied += 1
            print(f"copied {identity!r}: {len(task.get('entries') or {})} entries, "
                  f"{'running' if task.get('start') else 'paused'}", file=out)
    print(f"{copied} copied, {refused} refused, of {len(identities)} tasks at {source}",
          file=out)
    return copied, refused


def _import_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="schedule_api.py import", description=import_tasks.__doc__.split(".")[0] + ".")
    parser.add_argument("source", help="the running service to copy from, e.g. "
                                       "http://old-host:3000")
    parser.add_argument("--into", default="http://127.0.0.1:3000",
                        help="our running service (default http://127.0.0.1:3000)")
    parser.add_argument("--source-token", default="", help="the source's token, if any")
    parser.add_argument("--token", default="", help="our [server] token, if set")
    args = parser.parse_args(argv)
    try:
        _, refused = import_tasks(args.source, args.into, args.source_token, args.token)
    except (ValidationError, ConnectionError) as exc:  # the source refused /all, or no answer
        print(f"schedule-api import: {exc}", file=sys.stderr)
        return 2
    return 1 if refused else 0


def _settings_help() -> str:
    """The epilog of --help: every option, its variable and its default."""
    lines = ["settings (config.ini [section] option, environment variable, default):"]
    for (section, option), name in CONFIG_KEYS.items():
        variable = f"SCHEDULE_API_{section}_{option}".upper()
        default = getattr(Config, name)
        if name == "log_retention_days":
            default = f"{SQLITE_RETENTION_DAYS:g} on SQLite, 0 (for ever) on Elasticsearch"
        lines.append(f"  [{section}] {option:<27} {variable:<46} {default!s}")
    return "\n".join(lines) + "\n\nimport: python schedule_api.py import SOURCE_URL --help"


def main(argv: list[str] | None = None) -> int:
    """Run the service until SIGTERM or SIGINT; return the exit status."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["import"]:
        return _import_main(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog=_settings_help(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="config.ini to read (default: ./config.ini if present)")
    parser.add_argument("--host", help="address to listen on (default 0.0.0.0)")
    parser.add_argument("--port", type=int, help="port to listen on (default 3000)")
    parser.add_argument("--data", help="data folder for the SQLite store and the log spool")
    parser.add_argument("--log-level", help="DEBUG, INFO, WARNING or ERROR (default INFO)")
    parser.add_argument("--version", action="version", version=__version__)
    args = parser.parse_args(argv)
    path = args.config or ("config.ini" if os.path.exists("config.ini") else None)
    try:
        config = load_config(path, host=args.host, port=args.port, data=args.data,
                             log_level=args.log_level and args.log_level.upper())
    except ValidationError as exc:
        print(f"schedule-api: {exc}", file=sys.stderr)
        return 2
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonFormatter() if config.log_format == "json" else
                         logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=config.log_level.upper(), handlers=[handler])
    if log.getEffectiveLevel() > logging.DEBUG:
        # The client logs every request at INFO and every failure with a traceback at
        # WARNING; the store's own messages say what failed in one line.
        for noisy in ("elasticsearch", "elastic_transport"):
            logging.getLogger(noisy).setLevel(logging.ERROR)
    _raise_open_files_limit()
    try:
        app = App(config)
    except (StoreError, OSError) as exc:
        log.error("cannot start: %s", exc)
        return 1

    stopping = threading.Event()

    def stop(signum, frame):
        log.info("signal %d: shutting down", signum)
        stopping.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    while not stopping.is_set():  # a cluster still starting (docker compose) is waited for
        try:
            app.start()
            break
        except StoreError as exc:
            log.warning("cannot load tasks, retrying in 5 s: %s", exc)
            stopping.wait(5)
    totals, summary_at = app.metrics.totals(), time.monotonic() + config.summary_interval
    while not stopping.wait(1):  # short waits: signal handlers run between them
        if config.summary_interval and time.monotonic() >= summary_at:
            line, totals = app.service.summary(totals)
            log.info("last %g s: %s", config.summary_interval, line)
            summary_at += config.summary_interval
    app.close(config.webhook_timeout)
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
