# The root filesystem of the pouch-driver managed plugin (see plugin/config.json).
#
# Build it with scripts/build-plugin, which first puts the wheels of the package and of its
# dependencies into the build context (wheels/), so this build needs no package index: it
# works where containers have no network. Any base with python3 (>= 3.11, with the venv
# module) works; iptables, ipset and iproute2 are installed with apt only if the base lacks
# them (ipset: traffic inside a bridge accepted by one set lookup; without it, more rules).
#
#   scripts/build-plugin --base python:3.11-slim --name pouch-driver
ARG BASE=python:3.11-slim
FROM ${BASE}

COPY wheels/ /tmp/wheels/

# One RUN, one layer. A venv keeps us out of the distribution's site-packages (PEP 668) and
# gives a console script with an absolute interpreter path, the same on Debian's python3 and on
# the python:* images.
RUN set -eu; \
    if ! command -v iptables-restore >/dev/null || ! command -v ip >/dev/null \
            || ! command -v ipset >/dev/null; then \
        apt-get update; \
        DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
            iptables ipset iproute2; \
        rm -rf /var/lib/apt/lists/*; \
    fi; \
    python3 -m venv /opt/pouch-driver; \
    /opt/pouch-driver/bin/python -m pip install --no-index --find-links /tmp/wheels \
        --no-cache-dir --disable-pip-version-check --no-compile pouch-driver; \
    /opt/pouch-driver/bin/python -m pip uninstall -y -q pip setuptools 2>/dev/null || true; \
    /opt/pouch-driver/bin/python -m compileall -q /opt/pouch-driver/lib; \
    ln -sf /opt/pouch-driver/bin/pouch-driver /usr/local/bin/pouch-driver; \
    rm -rf /tmp/wheels; \
    mkdir -p /run/docker/plugins /var/lib/pouch-driver; \
    pouch-driver serve --help >/dev/null

ENTRYPOINT ["/usr/local/bin/pouch-driver"]
CMD ["serve", "--socket", "/run/docker/plugins/pouch.sock"]
