# The daemon, the worker, wk-jobs and the operator CLI in one image. Run the daemon (default)
# or `watchkeeper-worker ...`; contrib/kubernetes/watchkeeper.yaml shows both with probes.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked \
        -p watchkeeper-daemon -p watchkeeper-worker -p watchkeeper-jobs -p watchkeeper-cli

FROM debian:bookworm-slim
RUN useradd --system --uid 65532 --user-group --no-create-home watchkeeper \
    && install -d -o watchkeeper -g watchkeeper -m 0700 \
        /var/lib/watchkeeper-daemon /var/lib/watchkeeper-worker /run/watchkeeper
COPY --from=build /src/target/release/watchkeeper-daemon /src/target/release/watchkeeper-worker \
     /src/target/release/wk-jobs /src/target/release/watchkeeper /usr/local/bin/
COPY contrib/config/daemon.toml contrib/config/worker.toml /etc/watchkeeper/
USER 65532:65532
# Exit 0 when the daemon answers on its socket (watchkeeper's exit codes: 2 probe failed).
HEALTHCHECK --interval=30s --timeout=10s --retries=3 \
    CMD ["watchkeeper", "probe", "--socket", "/run/watchkeeper/daemon.sock", "--timeout", "5s"]
CMD ["watchkeeper-daemon", "--socket=/run/watchkeeper/daemon.sock", \
     "--state-dir=/var/lib/watchkeeper-daemon", "--config=/etc/watchkeeper/daemon.toml"]
