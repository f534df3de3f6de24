# arbstream image: the Spark streaming job (`arbstream stream`, the default command), the
# producers (`arbstream produce --all`, `arbstream replay ...`), the e-mail alert worker
# (`arbstream alerts run`) and `arbstream grafana publish`. Used by docker-compose.yml
# (docs/docker.md).
#
# Python 3.11 on Debian bookworm: Spark needs Java 17+, and bookworm is where Debian ships
# openjdk-17-jre-headless. The tag is an exact patch release; pin its digest too
# (`python:3.11.10-slim-bookworm@sha256:...`) where the registry is reachable.
FROM python:3.11.10-slim-bookworm

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# procps: Spark's launch scripts call `ps`. The man1 directory works around the JRE package's
# post-install script failing on slim images, which omit /usr/share/man.
RUN mkdir -p /usr/share/man/man1 \
    && apt-get update \
    && apt-get install -y --no-install-recommends openjdk-17-jre-headless procps \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
# Dependencies first, from the lock file: every distribution checked against its sha256
# (deploy/requirements.lock: the base dependencies of pyproject.toml plus the build backend,
# without the `local` extra's servers). This layer is cached until the lock changes.
COPY deploy/requirements.lock ./deploy/requirements.lock
RUN pip install --require-hashes --no-deps -r deploy/requirements.lock

# README.md* : optional (the wildcard lets the build go on while it does not exist yet).
COPY pyproject.toml README.md* ./
COPY arbstream ./arbstream
COPY producers ./producers
COPY spark_jobs ./spark_jobs
COPY alerts ./alerts
COPY ml ./ml
COPY backtest ./backtest
# The grafana package ships its provisioning files (dashboards) as package data.
COPY grafana/__init__.py grafana/*.py ./grafana/
COPY grafana/provisioning ./grafana/provisioning
# The package alone: its dependencies are the locked ones above, and the build backend too
# (no build isolation, so nothing unpinned is downloaded).
RUN pip install --no-deps --no-build-isolation . \
    && pip check

# Spark settings of the containers (deploy/spark/spark-defaults.conf: no kill links in the
# UI) and the stream job's healthcheck.
COPY deploy/spark/spark-defaults.conf /opt/arbstream/spark/spark-defaults.conf
COPY deploy/stream_healthcheck.py /usr/local/bin/arbstream-stream-healthcheck
ENV SPARK_CONF_DIR=/opt/arbstream/spark \
    SPARK_LOCAL_IP=127.0.0.1

# A non-root user owning the state directory (Spark checkpoints, the lake, the model
# registry): a named volume mounted at /state takes this ownership when first created.
RUN groupadd --system --gid 10001 arbstream \
    && useradd --system --uid 10001 --gid arbstream --home-dir /home/arbstream \
       --create-home --shell /usr/sbin/nologin arbstream \
    && mkdir -p /state \
    && chown arbstream:arbstream /state \
    && chmod 0750 /state
ENV ARB_STATE_DIR=/state \
    HOME=/home/arbstream
VOLUME ["/state"]
USER arbstream:arbstream
# A directory of its own to run in: relative paths (a .env, Spark's scratch files) land there,
# never in the root-owned /app.
WORKDIR /home/arbstream

CMD ["arbstream", "stream"]
