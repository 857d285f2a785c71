"""Multi-process inference and training on torch.distributed (torchrun); see docs/parallel.md.

Nothing here is imported by the models: parallelism is applied from outside (hooks, wrappers, FSDP2).
Modules: ``context`` (the world from torchrun's environment, seed broadcast, timeouts), ``comm``
(differentiable, byte-counting collectives), ``sequence`` (Ulysses sequence split of the DiT),
``guidance`` (cond/uncond on two rank halves), ``fsdp`` (weight sharding or replication), ``vae``
(tile-parallel decode), ``apply`` (``parallelize(pipe, world, …)``).
"""
