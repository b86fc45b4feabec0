# The amqp-queue sidecar: `amqp-queue serve` with the PostgreSQL and Redis state backends.
#   docker build -t amqp-queue .
#   docker run -e AMQP_URL=amqp://USER:PASSWORD@BROKER:5672/ -e AMQP_QUEUE_TOKENS=operator:TOKEN \
#       -v amqp-queue-state:/data -p 127.0.0.1:8080:8080 amqp-queue
# AMQP_QUEUE_TOKENS is name:token[,name:token...]: a bare token is refused (serve exits 2).
# `docker stop` waits 10 s by default, less than the 30 s serve gives in-flight requests on
# SIGTERM: stop it with `docker stop --time 45` (docker-compose.yml sets stop_grace_period).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# `amqp-queue serve` binds to loopback by default; in a container it must take every interface.
# The default state index is a SQLite file on the /data volume, so a re-created container keeps
# it; set AMQP_QUEUE_STATE_URL to PostgreSQL (as docker-compose.yml does) or Redis instead.
ENV AMQP_QUEUE_BIND=0.0.0.0:8080 \
    AMQP_QUEUE_STATE_URL=sqlite+aiosqlite:////data/commands.db

WORKDIR /src
# Only what the distribution is built from, so tests and local state never enter the image.
COPY pyproject.toml README.md ./
COPY state ./state
COPY amqp_queue ./amqp_queue
# The service runs as uid/gid 10001, which owns /data: a named volume mounted there takes that
# ownership from the image on first use (a bind mount must be chowned to 10001 by hand).
RUN pip install "./[postgres,redis]" \
    && groupadd --system --gid 10001 amqp-queue \
    && useradd --system --uid 10001 --gid 10001 --home-dir /home/amqp-queue --create-home amqp-queue \
    && mkdir /data \
    && chown 10001:10001 /data
VOLUME ["/data"]
USER 10001:10001
WORKDIR /home/amqp-queue

EXPOSE 8080
# /healthz answers 503 while the broker or the state index is unreachable; urlopen raises on
# it, so the check fails. The slim image has no curl, and the port follows AMQP_QUEUE_BIND.
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ['AMQP_QUEUE_BIND'].rpartition(':')[2] + '/healthz', timeout=4)"]
ENTRYPOINT ["amqp-queue"]
CMD ["serve"]
