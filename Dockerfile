# Minimal GPU image: PyPI's torch 2.13.0 wheel for Linux x86_64 bundles its CUDA runtime.
# The cluster image with deepspeed, triton and megatron-core extras comes with the launch issue.
FROM python:3.11-slim-bookworm

ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
RUN pip install "torch==2.13.0"

RUN useradd --create-home --uid 1000 sessa
WORKDIR /home/sessa/sessa-train
COPY --chown=sessa:sessa pyproject.toml README.md ./
COPY --chown=sessa:sessa sessa_train ./sessa_train
RUN pip install .

USER sessa
ENTRYPOINT ["python", "-m", "sessa_train.train_synthetic"]
