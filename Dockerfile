# s2l_ray on an official Ray GPU image (CUDA, Python 3.12). Build: docker build -t s2l_ray:latest .
# docker run --rm s2l_ray:latest              (prints `s2l --help`)
# On a cluster whose nodes run this image (cluster_configs/aws.yaml, gcp.yaml, kuberay_rayjob.yaml):
#   ray job submit --working-dir . -- s2l run cluster_configs/pipeline_10m_autoscaling.yaml
FROM rayproject/ray:2.60.0-py312-gpu

WORKDIR /home/ray/s2l_ray
COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users s2l_ray ./s2l_ray
# The package with its GPU extra (faiss-gpu-cu12). Both faiss wheels install the same `faiss`
# module files, so removing faiss-cpu afterwards deletes files faiss-gpu shares with it: reinstall
# faiss-gpu over the gap. Any failing step fails the build (none of them is masked).
RUN pip install --no-cache-dir ".[gpu]" \
    && pip uninstall -y faiss-cpu \
    && pip install --no-cache-dir --no-deps --force-reinstall "faiss-gpu-cu12>=1.8" \
    && s2l --help > /dev/null
# The pipeline configs per scale, so a RayJob can run them by path without a working dir.
COPY --chown=ray:users cluster_configs ./cluster_configs

CMD ["s2l", "--help"]
