# Minimal GPU image: PyPI's torch 2.13.0 wheel for Linux x86_64 bundles its CUDA runtime.
# deepspeed is built against that torch (no build isolation), as tools/bootstrap.sh does.
# The cluster image with triton and megatron-core extras comes with the launch issue.
FROM python:3.11-slim-bookworm

ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
RUN pip install "torch==2.13.0" setuptools wheel \
    && pip install --no-build-isolation "deepspeed>=0.17"

RUN useradd --create-home --uid 1000 sessa
WORKDIR /home/sessa/sessa-train
COPY --chown=sessa:sessa pyproject.toml README.md ./
COPY --chown=sessa:sessa sessa_train ./sessa_train
RUN pip install .

USER sessa
ENTRYPOINT ["python", "-m", "sessa_train.train"]
