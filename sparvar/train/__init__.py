"""Training of our own small Infinity-architecture model (tokenizer + transformer) on CIFAR-10.

No pretrained Infinity weights are reachable, and random weights have no attention structure, so the
sparse-vs-dense fidelity of SparVAR is measured on a model we train (bench/fidelity.py, weights/).

    python -m sparvar.train all --data ../shared/data/cifar10-jpeg.tar.gz --work runs/cifar --device cuda \\
        --tokenizer-seconds 90 --transformer-seconds 280 --export weights      # what made weights/ (one H100)

Modules: `data` (tarball -> uint8 images), `tokenizer` (encoder + multi-scale BSQ + our BSQDecoder),
`var` (teacher-forced next-scale bit prediction with `Infinity.forward_all_scales`), `loop` (seeded,
resumable loops with a wall-clock budget), `run` (the stages, evaluation, safetensors export the loaders read),
`report` (loss-curve PNGs), `__main__` (CLI).
"""
