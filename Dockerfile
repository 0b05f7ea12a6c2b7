# syntax=docker/dockerfile:1
# One image for every role: the proxy (default), the emulator or the load generator by command.
ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim AS build
# Optional extras: "fast,hf" adds the Hugging Face tokenizer a real model needs (compose.yaml's vLLM variant).
ARG EXTRAS=fast
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
RUN python -m venv /opt/kvroute
ENV PATH=/opt/kvroute/bin:$PATH
WORKDIR /src
COPY pyproject.toml README.md ./
COPY kvblocks ./kvblocks
COPY emulator ./emulator
COPY proxy ./proxy
COPY loadgen ./loadgen
RUN pip install --upgrade pip && pip install ".[${EXTRAS}]" \
    && python -c "import kvblocks; kvblocks.get_tokenizer().encode('warm')"

FROM python:${PYTHON_VERSION}-slim AS runtime
RUN groupadd --system --gid 10001 kvroute \
    && useradd --system --uid 10001 --gid kvroute --home-dir /home/kvroute --create-home kvroute \
    && install -d -o kvroute -g kvroute -m 700 /var/lib/kvroute
COPY --from=build /opt/kvroute /opt/kvroute
ENV PATH=/opt/kvroute/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    KVROUTE_HOST=0.0.0.0 \
    KVROUTE_PORT=8000 \
    KVROUTE_LOG_FORMAT=json
# The image binds 0.0.0.0, so the admin API (/admin/: backends, strategy, cache resets) answers 403 to
# everyone until it has a key: pass KVROUTE_ADMIN_KEY_FILE (a mounted secret; compose.yaml generates
# one into /var/lib/kvroute) or KVROUTE_ADMIN_KEY. Backend credentials: KVROUTE_BACKEND_API_KEY.
USER kvroute
WORKDIR /home/kvroute
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=15s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('KVROUTE_PORT', '8000'), timeout=2)"]
STOPSIGNAL SIGTERM
CMD ["python", "-m", "proxy"]
