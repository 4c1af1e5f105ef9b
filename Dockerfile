# pandaguard container image. Multi-stage:
#   models  – Python 3.11: install the pinned wheels, rebuild the ONNX files and their
#             int8 variants from the pinned weights (checked against the model cards'
#             sha256), keep ONNX Runtime
#   build   – Rust: compile the release binary
#   runtime – slim Debian with the binary, config/, models/ and libonnxruntime, non-root
# No container engine runs on the machine this was written on, so this file is kept
# right by reading; see README "Container image".

FROM python:3.11-slim-bookworm AS models
WORKDIR /src
COPY requirements.txt ./
RUN python -m venv /venv \
 && /venv/bin/pip install --no-cache-dir --disable-pip-version-check --no-deps -r requirements.txt
COPY models/ models/
RUN /venv/bin/python models/convert/convert.py --check --out-dir models \
 && /venv/bin/python models/convert/quantize.py --check \
 && mkdir -p /out/lib \
 && cp /venv/lib/python3.11/site-packages/onnxruntime/capi/libonnxruntime.so.1.31.1 /out/lib/

FROM rust:1.95-slim-bookworm AS build
# cmake and nasm build the bundled libjpeg-turbo (JPEG decoding, with SIMD).
RUN apt-get update \
 && apt-get install -y --no-install-recommends cmake nasm \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock rustfmt.toml ./
COPY src/ src/
COPY benches/ benches/
RUN cargo build --release --locked --bin pandaguard

FROM debian:bookworm-slim AS runtime
RUN apt-get update \
 && apt-get install -y --no-install-recommends curl \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home-dir /app --shell /usr/sbin/nologin pandaguard
WORKDIR /app
COPY --from=build /src/target/release/pandaguard /app/pandaguard
COPY --from=models /out/lib/libonnxruntime.so.1.31.1 /app/lib/libonnxruntime.so.1.31.1
COPY --from=models /src/models/*.onnx /src/models/*.toml /src/models/imagenet_labels.txt /app/models/
COPY config/ /app/config/
ENV ORT_DYLIB_PATH=/app/lib/libonnxruntime.so.1.31.1 \
    PANDAGUARD_SERVER__BIND=0.0.0.0:8080
USER pandaguard
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
  CMD curl -fsS http://127.0.0.1:8080/health/live || exit 1
ENTRYPOINT ["/app/pandaguard"]
CMD ["serve", "--config", "/app/config/default.toml"]
