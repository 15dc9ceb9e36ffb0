# Halyard in a container: `docker build -t halyard .` then
#   docker run -p 1883:1883 -p 127.0.0.1:18083:18083 -v halyard-data:/var/lib/halyard halyard
# (the admin HTTP port on the host's loopback only). Clients need a password file: without
# one every client is anonymous, and anonymous clients are served on loopback only.
# The configuration is contrib/halyard-docker.toml (mount your own over it).
FROM rust:1-bookworm AS build
WORKDIR /src
# aws-lc-rs builds its C core with cmake.
RUN apt-get update && apt-get install -y --no-install-recommends cmake && rm -rf /var/lib/apt/lists/*
COPY . .
RUN cargo build --release -p halyard --locked && strip target/release/halyard

FROM debian:bookworm-slim
RUN useradd --system --home /var/lib/halyard --shell /usr/sbin/nologin halyard \
    && mkdir -p /var/lib/halyard /etc/halyard && chown halyard:halyard /var/lib/halyard
COPY --from=build /src/target/release/halyard /usr/local/bin/halyard
COPY contrib/halyard-docker.toml /etc/halyard/halyard.toml
USER halyard
VOLUME /var/lib/halyard
EXPOSE 1883 8080 18083
# SIGTERM starts the graceful shutdown (clients told, buffers drained).
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=30s --timeout=3s CMD ["/usr/local/bin/halyard", "ctl", "status", "--data-dir", "/var/lib/halyard"]
ENTRYPOINT ["/usr/local/bin/halyard"]
CMD ["serve", "-c", "/etc/halyard/halyard.toml"]
