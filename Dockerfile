# Minimal image of the mlfabric daemon (control plane only: torch comes with the training side).
# Build:  docker build -t mlfabric .
# Run:    docker run --rm -p 7700:7700 -e MLFABRIC_ADVERTISE=HOST:7700 mlfabric
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /opt/mlfabric
COPY pyproject.toml README.md ./
COPY mlfabric ./mlfabric
RUN pip install --no-cache-dir . \
    && useradd --system --uid 10001 --create-home --home-dir /var/lib/mlfabric mlfabric

USER 10001
WORKDIR /var/lib/mlfabric
VOLUME ["/var/lib/mlfabric"]
EXPOSE 7700
ENTRYPOINT ["mlfabric"]
CMD ["node", "--listen", "0.0.0.0:7700", "--data-dir", "/var/lib/mlfabric"]
