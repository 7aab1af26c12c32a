# svidgate: SPIFFE identity for Envoy (SDS, ext_authz with JWT-SVIDs, the SPIFFE Workload API).
#
#   docker build -t svidgate .
#   docker run --rm -v svidgate-state:/var/lib/svidgate -v svidgate-run:/run/svidgate svidgate
#
# With no arguments it runs `svidgate serve` on the embedded default configuration: the built-in CA for the
# development trust domain `svidgate.local`, sockets in /run/svidgate (share that volume with Envoy), metrics
# and health on 127.0.0.1:8082. Mount a config file and run `serve --config /etc/svidgate/config.yaml` for
# anything else; set SVIDGATE_HEALTH_URL when `listen.http` moves.

ARG PYTHON_VERSION=3.11

# -- build: install the package and its dependencies into a self-contained virtualenv ----------------------
FROM python:${PYTHON_VERSION}-slim AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/svidgate
WORKDIR /src
# Dependencies resolve from pyproject.toml; the README is part of the package metadata.
COPY pyproject.toml README.md ./
COPY svidgate ./svidgate
RUN /opt/svidgate/bin/pip install . \
 && /opt/svidgate/bin/svidgate --help > /dev/null

# -- runtime: the virtualenv on a slim base, no compilers, no pip cache, a non-root user -------------------
FROM python:${PYTHON_VERSION}-slim
RUN groupadd --system --gid 10001 svidgate \
 && useradd --system --uid 10001 --gid svidgate --no-create-home --home-dir /var/lib/svidgate \
        --shell /usr/sbin/nologin svidgate \
 && install -d -o svidgate -g svidgate -m 0700 /var/lib/svidgate \
 && install -d -o svidgate -g svidgate -m 0750 /run/svidgate
COPY --from=build /opt/svidgate /opt/svidgate
# XDG_* place the embedded default's state (the CA) in /var/lib/svidgate and its sockets in /run/svidgate.
ENV PATH=/opt/svidgate/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    XDG_STATE_HOME=/var/lib \
    XDG_RUNTIME_DIR=/run \
    SVIDGATE_HEALTH_URL=http://127.0.0.1:8082/healthz
USER 10001:10001
# The CA's private key lives here: keep it on a volume so that a new container keeps the trust domain.
VOLUME ["/var/lib/svidgate"]
# No curl in the image: the health check is a one-line Python HTTP GET of /healthz.
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, sys, urllib.request; sys.exit(0 if urllib.request.urlopen(os.environ['SVIDGATE_HEALTH_URL'], timeout=2).status == 200 else 1)"]
# SIGTERM drains (streams closed cleanly, in-flight checks answered) within server.drain_grace (10s default,
# below Docker's and Kubernetes' default stop timeouts); SIGHUP reloads the config file.
STOPSIGNAL SIGTERM
ENTRYPOINT ["svidgate"]
CMD ["serve"]
