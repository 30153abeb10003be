"""The sparse training path of TopK-style families, split by job:

- ops.py: sparse primitives (decode through the active latents, segment sums, sampled dot products)
- selection.py: which entries a code keeps, chosen without autograd from chunked pre-activations
- cpu_select.py: the CPU top-k and candidate filter compiled with numba
- topk_step.py: the fused TopK step (decoder, losses and all gradients in one autograd function)
- prefix_step.py: the fused Matryoshka step (nested-prefix losses)
- nested_k_step.py: the fused MSAE step (one top-K selection serves every nested k)
- steps.py: `FusedTopKStep`, what a family declares as its `train_step`

This package imports nothing from hsae.models at import time except base.py (steps.py), so base.py
may import ops.py.
"""
