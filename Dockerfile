# querygate gateway image: `querygate serve`, configured by QUERYGATE_* variables only.
#
# Two stages: `build` installs querygate and its dependencies into a virtualenv; `runtime`
# copies only that virtualenv onto a fresh base, with no compilers, no pip cache and no
# source tree, and runs as an unprivileged user. The base is pinned to an exact version
# (bump it deliberately; a release pipeline may pin it further by digest).
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
RUN python -m venv /opt/querygate
COPY pyproject.toml README.md LICENSE requirements.lock ./
COPY app ./app
COPY querygate_client ./querygate_client
# The runtime dependencies exactly as locked, each checked against its hash (make lock);
# then querygate itself, with nothing resolved on the day of the build.
RUN /opt/querygate/bin/pip install --no-compile --require-hashes -r requirements.lock \
    && /opt/querygate/bin/pip install --no-compile --no-deps . \
    && /opt/querygate/bin/python -m compileall -q /opt/querygate/lib

FROM ${PYTHON_IMAGE} AS runtime
# A fixed, non-root uid/gid, matching runAsUser/runAsGroup in deploy/k8s.
RUN groupadd --system --gid 10001 querygate \
    && useradd --system --uid 10001 --gid 10001 --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin querygate
COPY --from=build /opt/querygate /opt/querygate
ENV PATH=/opt/querygate/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    QUERYGATE_HOST=0.0.0.0 \
    QUERYGATE_PORT=8080
USER 10001:10001
EXPOSE 8080
ENTRYPOINT ["querygate"]
CMD ["serve"]
