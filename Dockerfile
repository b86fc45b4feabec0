# The amqp-queue sidecar: `amqp-queue serve` with the PostgreSQL and Redis state backends.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# `amqp-queue serve` binds to loopback by default; in a container it must take every interface.
ENV AMQP_QUEUE_BIND=0.0.0.0:8080

WORKDIR /src
# Only what the distribution is built from, so tests and local state never enter the image.
COPY pyproject.toml README.md ./
COPY state ./state
COPY amqp_queue ./amqp_queue
RUN pip install '.[postgres,redis]'

RUN useradd --system --uid 10001 --home-dir /home/amqp-queue --create-home amqp-queue
USER amqp-queue
WORKDIR /home/amqp-queue

EXPOSE 8080
ENTRYPOINT ["amqp-queue"]
CMD ["serve"]
