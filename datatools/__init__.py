"""The book's data tools for chapter 7 (``gpt2-scratch data dedup | prefs | generate``)."""
