"""rnnkit's Triton GPU kernels (``backend="triton"``).

Minimal package file of the ``triton-elem`` branch (issue 12, part B): it only
makes ``rnnkit.triton.elementwise`` and ``rnnkit.triton.conv`` importable. Part A
(branch ``triton``) owns this file and registers the backend; take theirs on merge.
"""
