# schedule-api: a minimal image. Build: docker build -t schedule-api .
# BASE: any Debian-like image with python3 (>= 3.11), pip, useradd and setpriv (util-linux).
# CI builds on a stand-in made with debootstrap where python:3.11-slim cannot be pulled.
ARG BASE=python:3.11-slim
FROM ${BASE}

# PYTHONTZPATH empty: time zones come from the pinned tzdata package below, never from
# whatever /usr/share/zoneinfo the base image happens to have (or lacks).
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PYTHONTZPATH=""
WORKDIR /app

COPY requirements.txt .
# The entrypoint starts as root only to give the data folder to the service's user (a bind
# mount Docker creates is owned by root), then runs the service as that user (uid 10001).
RUN pip install --no-cache-dir --disable-pip-version-check --root-user-action=ignore \
        -r requirements.txt tzdata==2026.6 \
    && useradd --system --uid 10001 --user-group --home-dir /app --shell /usr/sbin/nologin schedule \
    && mkdir -p /app/data && chown schedule:schedule /app/data \
    && printf '%s\n' \
    '#!/bin/sh' \
    '# schedule-api entrypoint: run "$@" as uid 10001 with a data folder it can write.' \
    'data=/app/data' \
    'as_service() { setpriv --reuid=10001 --regid=10001 --clear-groups -- "$@"; }' \
    'if [ "$(id -u)" = 0 ]; then' \
    '  find "$data" ! -user 10001 -exec chown 10001:10001 {} + 2>/dev/null' \
    '  if ! as_service test -w "$data"; then' \
    '    echo "schedule-api: $data (the mounted data folder) cannot be written by uid 10001 and could not be given to it (mounted read-only?); on the host run: sudo chown -R 10001:10001 THE_FOLDER_MOUNTED_AT_/app/data" >&2' \
    '    exit 1' \
    '  fi' \
    '  if [ -e config.ini ] && ! as_service test -r config.ini; then' \
    '    echo "schedule-api: /app/config.ini (mounted) cannot be read by uid 10001; on the host run: chmod a+r CONFIG_FILE" >&2' \
    '    exit 1' \
    '  fi' \
    '  exec setpriv --reuid=10001 --regid=10001 --clear-groups -- "$@"' \
    'fi' \
    'if [ ! -w "$data" ]; then' \
    '  echo "schedule-api: $data cannot be written by uid $(id -u); on the host run: sudo chown -R $(id -u) THE_FOLDER_MOUNTED_AT_/app/data" >&2' \
    '  exit 1' \
    'fi' \
    'exec "$@"' \
    > /usr/local/bin/schedule-entrypoint \
    && chmod 755 /usr/local/bin/schedule-entrypoint

COPY schedule_api.py .

EXPOSE 3000
# Tasks (SQLite) and the log spool; mount config.ini at /app/config.ini as in the original.
VOLUME /app/data

# The port and address are those the service reads: config.ini, then SCHEDULE_API_* variables
# (a --port given as a command-line flag is not seen: set the port in config.ini or the
# environment). Not through a proxy: HTTP_PROXY set for webhooks must not catch this.
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u, schedule_api as s; c = s.load_config('config.ini' if os.path.exists('config.ini') else None); h = c.host if c.host not in ('', '0.0.0.0', '::') else '127.0.0.1'; h = f'[{h}]' if ':' in h else h; u.build_opener(u.ProxyHandler({})).open(f'http://{h}:{c.port}/health', timeout=4)"]

# On SIGTERM the service finishes the webhooks in flight (up to [webhook] timeout, 10 s by
# default) and flushes the fire logs: give it more than docker stop's default 10 s, e.g.
# docker run --stop-timeout 30, docker stop -t 30, or stop_grace_period: 30s in compose.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/schedule-entrypoint"]
CMD ["python", "schedule_api.py"]
