"""Every measurement kd_cluster makes of itself, behind ``kd-cluster bench ...`` and ``kd-cluster plan``.

- :mod:`~kd_cluster.bench.data`: the shard stream against torchvision's ImageFolder, images/s per core;
- :mod:`~kd_cluster.bench.teacher` (and its Ray half :mod:`~kd_cluster.bench.teacher_ray`): student and teacher
  rates, colocated against teacher actors;
- :mod:`~kd_cluster.bench.checkpoint`: what a checkpoint of a real student costs;
- :mod:`~kd_cluster.bench.planner`: how to split N GPUs between students and teachers, from measured rates;
- :mod:`~kd_cluster.bench.fidelity`: distilled students against the from-scratch one on Fashion-MNIST.

The package sits above :mod:`kd_cluster.cluster` (it may use Ray and the driver); nothing below imports it.
Importing it imports nothing: each module is imported by the command that needs it.
"""
