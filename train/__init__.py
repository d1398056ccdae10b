"""Training scripts: instruction finetuning (sft.py) and the spam classifier (classify.py)."""
