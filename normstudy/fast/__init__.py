"""The fast path: what makes a run quick without changing what it computes.

- :mod:`.kernels`: Triton kernels for the memory-bound layers (fused ReLU + norm, max-pool,
  the first 3-channel conv), switched on per model by ``models.use_triton_kernels``;
- :mod:`.self_check`: whether a model computes with the kernels what it computes without them
  (run once per process after they compile; where it fails, runs use PyTorch's modules);
- :mod:`.graph_epoch`: a whole training epoch replayed as a few CUDA graphs;
- :mod:`.steps`: one training step, eager or recorded once and replayed as a CUDA graph;
- :mod:`.optimizers`: SGD and its schedule without ``torch.optim``'s start-up cost;
- :mod:`.amp`: dynamic loss scaling for fp16 (GPUs without bf16, such as Colab's T4) that a CUDA
  graph can record.

Which of them a run uses is its runtime (:mod:`normstudy.runtime`): the ``fast`` preset turns them
all on where they apply, ``eager`` runs PyTorch's own modules step by step. The fast path imports
only :mod:`normstudy.runtime`, :mod:`normstudy.data` and :mod:`normstudy.divergence` of the package
(it knows the model only by the ``fused`` switch of its blocks).
"""
