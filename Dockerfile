# s2l_ray on an official Ray GPU image (CUDA, Python 3.12). Build: docker build -t s2l_ray .
# Run a job on a cluster using this image:  ray job submit -- s2l run mathinstruct run.ray_address=auto
FROM rayproject/ray:2.60.0-py312-gpu

WORKDIR /home/ray/s2l_ray
COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users s2l_ray ./s2l_ray
# faiss-gpu replaces faiss-cpu (both provide the `faiss` module)
RUN pip install --no-cache-dir ".[gpu]" && pip uninstall -y faiss-cpu || true

CMD ["s2l", "--help"]
