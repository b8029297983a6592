"""electra-fast: ELECTRA pretraining exact to the paper, on DeepSpeed, with fused Triton kernels.

Importing the package is cheap: DeepSpeed, datasets and transformers are imported only by the modules
that need them (the trainer modules, the data modules, hf).
"""

__version__ = "0.1.0"
