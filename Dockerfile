# arbstream image: the Spark streaming job (`arbstream stream`, the default command), the
# e-mail alert worker (`arbstream alerts run`), `arbstream grafana publish` and the
# replay producer (`arbstream replay ...`). Used by docker-compose.yml.
#
# Pinned to Debian bookworm: Spark needs Java 17+, and bookworm is where Debian ships
# openjdk-17-jre-headless (the plain python:3.11-slim tag follows the newest Debian release).
FROM python:3.11-slim-bookworm

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
# README.md* : optional (the wildcard lets the build go on while it does not exist yet).
COPY pyproject.toml README.md* ./
COPY arbstream ./arbstream
COPY producers ./producers
COPY spark_jobs ./spark_jobs
COPY alerts ./alerts
COPY ml ./ml
# The grafana package ships its provisioning files (dashboards) as package data.
COPY grafana/__init__.py grafana/*.py ./grafana/
COPY grafana/provisioning ./grafana/provisioning
RUN pip install .

# Spark checkpoints live under the state directory: keep it on a volume.
ENV ARB_STATE_DIR=/state
VOLUME ["/state"]

CMD ["arbstream", "stream"]
