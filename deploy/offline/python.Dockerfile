# A Python 3.11 base like python:3.11-slim, from Debian's own packages, for hosts without a container
# registry: deploy/e2e.sh builds it on a debootstrap-made Debian 12 image (whose python3 is 3.11).
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin
CMD ["python3"]
