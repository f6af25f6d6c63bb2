# The pipeline image: training and tuning jobs (k8s/jobs), `python -m pipeline …`.
#   docker build -t tfserving-pipeline:0.1.0 .
# Pinned base (a patch release of the Python we test on); pin its digest in your registry.
FROM python:3.11.7-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TF_CPP_MIN_LOG_LEVEL=2 \
    MPLCONFIGDIR=/tmp/matplotlib \
    HOME=/tmp

WORKDIR /app
RUN groupadd --gid 10001 app \
    && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /app --shell /usr/sbin/nologin app

# Dependencies first, so code changes do not reinstall TensorFlow.
COPY pyproject.toml README.md ./
COPY serving/protos/ serving/protos/
RUN mkdir -p pipeline serving && touch pipeline/__init__.py serving/__init__.py \
    && pip install '.[pipeline,server]' && pip uninstall -y tfserving-pipeline

COPY pipeline/ pipeline/
COPY serving/ serving/
COPY pipeline.toml ./
COPY configs/ configs/
RUN pip install --no-deps . && mkdir -p /app/artifacts && chown app:app /app/artifacts

# Numeric non-root user: Kubernetes can check runAsNonRoot against it.
USER 10001:10001
CMD ["python", "-m", "pipeline", "--help"]
