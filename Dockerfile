# The Rewind gateway image: a release build of `rewind` on a slim Debian.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --bin rewind

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/rewind /usr/local/bin/rewind
RUN useradd --system --home /var/lib/rewind rewind && mkdir -p /var/lib/rewind && chown rewind /var/lib/rewind
USER rewind
ENV REWIND_DATA_DIR=/var/lib/rewind REWIND_LISTEN=0.0.0.0:8080
EXPOSE 8080
ENTRYPOINT ["rewind"]
CMD ["serve"]
