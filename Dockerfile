# Mail OAuth gateway: a slim image that runs as an unprivileged user (uid/gid 10001).
#
#   docker build -t mail-gateway .
#   docker run -d --name mail-gateway --stop-timeout 60 \
#     -v /srv/gateway/config.yaml:/etc/gateway/config.yaml:ro \
#     -v gateway-state:/var/lib/gateway \
#     -p 127.0.0.1:587:2525 -p 127.0.0.1:465:2465 -p 127.0.0.1:143:2143 -p 127.0.0.1:993:2993 \
#     -p 127.0.0.1:110:2110 -p 127.0.0.1:995:2995 -p 127.0.0.1:8025:8025 \
#     mail-gateway
#
# --stop-timeout 60: on `docker stop` the gateway lets sends in flight finish for up to 30 s, then
# parks the rest on disk; Docker's default of 10 s would SIGKILL it first (Compose:
# `stop_grace_period: 60s`; Podman: the same --stop-timeout).
#
# State: GATEWAY_STATE_DIR below makes /var/lib/gateway (the volume) the state directory, whatever
# the config's state_dir says. A named volume (as above) gets the right owner by itself. For a
# bind mount instead (-v /srv/gateway/state:/var/lib/gateway), give the directory to the image's
# user first:
#   install -d -m 0700 /srv/gateway/state && chown 10001:10001 /srv/gateway/state
# The config file must be readable by uid 10001 (e.g. chgrp 10001 config.yaml; chmod 0640).
#
# Inside the container the config must say `listeners: {host: 0.0.0.0}` (the container's own
# network); publish the ports on the host's loopback as above, so the gateway is still reachable
# from this machine only. Operations commands run in the container, e.g.
#   docker exec mail-gateway gateway queue list
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    GATEWAY_CONFIG=/etc/gateway/config.yaml \
    GATEWAY_STATE_DIR=/var/lib/gateway

RUN groupadd --system --gid 10001 gateway \
    && useradd --system --uid 10001 --gid gateway --home-dir /var/lib/gateway \
       --shell /usr/sbin/nologin gateway \
    && install -d -o gateway -g gateway -m 0700 /var/lib/gateway \
    && install -d -m 0755 /etc/gateway

WORKDIR /build
# The product only: the provider sandbox (sandbox/, for `gateway demo` and the tests) is its own
# distribution and is kept out of the build context by .dockerignore.
COPY pyproject.toml README.md LICENSE ./
COPY gateway ./gateway
RUN pip install '.[postgresql]' && rm -rf /build

WORKDIR /var/lib/gateway
USER gateway
VOLUME ["/var/lib/gateway"]
EXPOSE 2525 2465 2143 2993 2110 2995 8025

HEALTHCHECK --interval=30s --timeout=10s --start-period=30s --retries=3 \
    CMD ["gateway", "health"]

STOPSIGNAL SIGTERM
CMD ["gateway", "run"]
