"""Several processes on PyTorch's own stack (torchrun, ``torch.distributed``, FSDP2, DTensor):

    world.py        the process group from torchrun's environment, one device per process
    parallel.py     a model wrapped for DDP or sharded with FSDP2 (``fully_shard`` per block)
    checkpoint.py   sharded checkpoints (safetensors through ``torch.distributed.checkpoint``)
                    that resume on another number of processes

The optimizers step FSDP2 shards themselves (``optim/sharded.py``).
"""
