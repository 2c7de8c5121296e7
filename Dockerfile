# One image for every outbox process: `outbox migrate`, `outbox dispatch`, `outbox api`.
#   docker build -t outbox .
#   docker run --rm -e OUTBOX_DATABASE_URL=... outbox migrate
# See docs/deploy.md. Built on python:3.13-slim; the wheel is built in its own stage so
# the runtime image carries no compiler, no source tree and no pip cache.

FROM python:3.13-slim AS build
WORKDIR /src
COPY . .
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM python:3.13-slim AS runtime
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    OUTBOX_LOG_FORMAT=json
COPY --from=build /wheels /wheels
# [dispatcher,api]: everything a production process needs; not [demo] or [testing].
RUN for wheel in /wheels/pg_outbox-*.whl; do \
        pip install --no-cache-dir "${wheel}[dispatcher,api]"; \
    done \
    && rm -rf /wheels \
    && useradd --uid 10001 --no-create-home --shell /usr/sbin/nologin outbox
# A numeric user, so Kubernetes' runAsNonRoot can verify it without /etc/passwd.
USER 10001:10001
WORKDIR /tmp
EXPOSE 8000 9100
ENTRYPOINT ["outbox"]
CMD ["dispatch", "--metrics-port", "9100"]
