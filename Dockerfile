# Mail OAuth gateway: a slim image that runs as an unprivileged user.
#
#   docker build -t mail-gateway .
#   docker run -d --name mail-gateway \
#     -v /srv/gateway/config.yaml:/etc/gateway/config.yaml:ro \
#     -v gateway-state:/var/lib/gateway \
#     -p 127.0.0.1:587:2525 -p 127.0.0.1:465:2465 -p 127.0.0.1:143:2143 -p 127.0.0.1:993:2993 \
#     -p 127.0.0.1:110:2110 -p 127.0.0.1:995:2995 -p 127.0.0.1:8025:8025 \
#     mail-gateway
#
# Inside the container the config must say `state_dir: /var/lib/gateway` and
# `listeners: {host: 0.0.0.0}` (the container's own network); publish the ports on the host's
# loopback as above, so the gateway is still reachable from this machine only.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    GATEWAY_CONFIG=/etc/gateway/config.yaml

RUN groupadd --system --gid 10001 gateway \
    && useradd --system --uid 10001 --gid gateway --home-dir /var/lib/gateway \
       --shell /usr/sbin/nologin gateway \
    && install -d -o gateway -g gateway -m 0700 /var/lib/gateway \
    && install -d -m 0755 /etc/gateway

WORKDIR /build
COPY pyproject.toml README.md ./
COPY gateway ./gateway
RUN pip install . && rm -rf /build

WORKDIR /var/lib/gateway
USER gateway
VOLUME ["/var/lib/gateway"]
EXPOSE 2525 2465 2143 2993 2110 2995 8025

HEALTHCHECK --interval=30s --timeout=10s --start-period=30s --retries=3 \
    CMD ["gateway", "health"]

STOPSIGNAL SIGTERM
CMD ["gateway", "run"]
