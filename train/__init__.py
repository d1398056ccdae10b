"""Training (``gpt2_scratch.train``): one loop (``loop.py``) and the tasks it runs: instruction finetuning
(``sft.py``, with ``--book-exact``: the book's own loop in ``book_exact.py``), DPO (``dpo.py``) and the spam
classifier (``classify.py``); a run's life (``run.py``), the shared options (``options.py``), LoRA (``lora.py``)."""
