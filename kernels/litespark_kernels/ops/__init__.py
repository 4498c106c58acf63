"""One module per op: ``<op>.py`` holds the PyTorch reference (the specification, CPU fallback and test oracle) and
the dispatcher; ``_<op>_triton.py`` holds its Triton kernels, launch functions and autograd Function.

This package re-exports nothing: ``litespark_kernels.ops.attention`` is always the module, while the package
``litespark_kernels`` re-exports the functions (``litespark_kernels.attention`` is the function).
"""
