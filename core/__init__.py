"""What every stage of the pipeline shares, without importing torch: errors and exit codes, files,
downloads, instruction records and prompts, the argument convention and the ``gpt2-scratch`` command line.

Nothing here imports torch, transformers or datasets at module level, so the judge and ``--help``
start in a fraction of a second; the stages (``gpt2_scratch``, ``convert``, ``train``, ``eval``) build on it.
"""
