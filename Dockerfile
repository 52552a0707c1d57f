# tinyhun serve: the OpenAI-compatible server on port 8080 (CPU image).
#   docker build -t tinyhun .
#   docker run -e MODEL_PATH=/models/hunyuan-0.5b -e MAX_TOKENS=512 -v /srv/models:/models:ro -p 8080:8080 tinyhun
# On a GPU host, add the cuda extra at build time: docker build --build-arg EXTRAS=cuda -t tinyhun:cuda .
FROM python:3.11-slim

ARG EXTRAS=""
# DL3064 reads MAX_TOKENS as a secret: it is a count of tokens (the API key is only ever given at run time)
# hadolint ignore=DL3064
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TINYHUN_HOME=/home/tinyhun/.cache/tinyhun \
    MODEL_PATH=/models/model \
    MAX_TOKENS=512

RUN useradd --create-home --uid 10001 tinyhun
WORKDIR /app
COPY pyproject.toml README.md ./
COPY tinyhun ./tinyhun
COPY kernels ./kernels
COPY weights/tiny-hunyuan ./weights/tiny-hunyuan
# DL3013 wants pinned versions: this installs the checkout itself, whose pyproject states its dependencies
# hadolint ignore=DL3013
RUN pip install --no-cache-dir ".${EXTRAS:+[$EXTRAS]}"

USER 10001
# Compile the kernels now (fp32 and INT4 layers, prefill and decode) into the Numba cache under TINYHUN_HOME, so
# the first request does not wait for it. The cache is keyed by the CPU: an image run on another CPU model
# compiles once at its first start instead.
RUN tinyhun quantize weights/tiny-hunyuan /tmp/tiny-q4 --quiet \
 && for m in weights/tiny-hunyuan /tmp/tiny-q4; do \
        tinyhun generate --model "$m" --raw --max-tokens 4 --quiet "warm up" > /dev/null || exit 1; \
    done \
 && rm -rf /tmp/tiny-q4

EXPOSE 8080
HEALTHCHECK --interval=15s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python", "-c", "import urllib.request as u; u.urlopen('http://127.0.0.1:8080/health', timeout=4)"]
CMD ["tinyhun", "serve", "--host", "0.0.0.0"]
