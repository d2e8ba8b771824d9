# GPU image for clusters: CUDA 12.8 devel (nvcc for DeepSpeed's JIT ops), Python 3.11,
# torch 2.13.0 from PyPI (it bundles its CUDA runtime), deepspeed built against it, then this
# package with its GPU extras, every other package at the version of requirements.lock (the
# lock's CPU torch line left out). Build and run: docs/cluster.md.
FROM nvidia/cuda:12.8.1-cudnn-devel-ubuntu22.04

ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH
# Ubuntu's security updates replace package versions: pinning them would break rebuilds
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv python3.11-dev git pdsh openssh-client \
    && rm -rf /var/lib/apt/lists/* \
    && python3.11 -m venv /opt/venv

# the same order as tools/bootstrap.sh: the pinned torch first, deepspeed without build isolation
COPY requirements.lock /opt/requirements.lock
RUN grep -v '^torch==' /opt/requirements.lock > /opt/constraints.txt \
    && pip install --constraint /opt/constraints.txt "torch==2.13.0" "setuptools>=68" "wheel>=0.40" \
    && pip install --constraint /opt/constraints.txt --no-build-isolation "deepspeed>=0.17"

RUN useradd --create-home --uid 1000 sessa
WORKDIR /home/sessa/sessa-train
COPY --chown=sessa:sessa pyproject.toml README.md ./
COPY --chown=sessa:sessa sessa_train ./sessa_train
COPY --chown=sessa:sessa configs ./configs
COPY --chown=sessa:sessa launch ./launch
# the local package; its dependencies are ranges that the pinned torch above satisfies
# hadolint ignore=DL3013
RUN pip install --constraint /opt/constraints.txt ".[gpu]"

USER 1000
ENTRYPOINT ["python", "-m", "sessa_train.train"]
