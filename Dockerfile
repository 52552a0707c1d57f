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
COPY weights/tiny-hunyuan-moe ./weights/tiny-hunyuan-moe
COPY weights/tiny-llama ./weights/tiny-llama
# DL3013 wants pinned versions: this installs the checkout itself, whose pyproject states its dependencies
# hadolint ignore=DL3013
RUN pip install --no-cache-dir ".${EXTRAS:+[$EXTRAS]}"

USER 10001
# Compile the kernels now, into the Numba cache under TINYHUN_HOME, so that the first request does not wait for
# them: one prefill and decode on a tiny checkpoint in each weight format that tinyhun's own tools write, for each
# layer kind (a combination not warmed here compiles at the model's first load: ~20 s for the default model when
# only Hunyuan fp32 and INT4 were warmed):
#   Hunyuan dense (QK norm)   fp32 (float checkpoints, `tinyhun merge`, a GGUF's F32/F16/BF16 and other types);
#                             `tinyhun quantize`: INT4 symmetric with an INT8 head (a GGUF's Q4_0 + Q8_0),
#                             --asym (Q4_1), --head q4, --head f16
#   Llama (SmolLM2's layer)   fp32; INT4 asymmetric with an INT8 head = a GGUF import's Q4_1 + Q8_0, as the
#                             default model has
#   Hunyuan MoE               fp32; `tinyhun quantize`
# A Llama layer and a Hunyuan dense one of the same weight formats are one compiled layer (Llama's empty QK-norm has
# a loaded norm's type), and the ops inside a layer are cached on their own, so most of these runs load what an
# earlier one compiled; the tiny Llama's, --asym and --head q4 are kept so that a change that splits them again
# cannot quietly leave the default model cold.
# The cache is keyed by the CPU: an image run on another CPU model compiles once at its first start.
RUN tinyhun quantize weights/tiny-hunyuan /tmp/warm/q4-sym --quiet \
 && tinyhun quantize weights/tiny-hunyuan /tmp/warm/q4-asym --asym --quiet \
 && tinyhun quantize weights/tiny-hunyuan /tmp/warm/q4-head-q4 --head q4 --quiet \
 && tinyhun quantize weights/tiny-hunyuan /tmp/warm/q4-head-f16 --head f16 --quiet \
 && tinyhun quantize weights/tiny-llama /tmp/warm/llama-q4-asym --asym --quiet \
 && tinyhun quantize weights/tiny-hunyuan-moe /tmp/warm/moe-q4 --quiet \
 && for m in weights/tiny-hunyuan weights/tiny-llama weights/tiny-hunyuan-moe /tmp/warm/*; do \
        tinyhun generate --model "$m" --raw --max-tokens 4 --quiet "warm up" > /dev/null || exit 1; \
    done \
 && rm -rf /tmp/warm

EXPOSE 8080
HEALTHCHECK --interval=15s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python", "-c", "import urllib.request as u; u.urlopen('http://127.0.0.1:8080/health', timeout=4)"]
CMD ["tinyhun", "serve", "--host", "0.0.0.0"]
