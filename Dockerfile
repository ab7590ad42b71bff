# schedule-api: a minimal image. Build: docker build -t schedule-api .
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
WORKDIR /app

COPY requirements.txt .
RUN pip install --no-cache-dir --disable-pip-version-check -r requirements.txt \
    && useradd --system --uid 10001 --home-dir /app --shell /usr/sbin/nologin schedule \
    && mkdir -p /app/data && chown schedule /app/data

COPY schedule_api.py .

USER schedule
EXPOSE 3000
# Tasks (SQLite) and the log spool; mount config.ini at /app/config.ini as in the original.
VOLUME /app/data

HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:3000/health', timeout=4)"]

STOPSIGNAL SIGTERM
CMD ["python", "schedule_api.py"]
