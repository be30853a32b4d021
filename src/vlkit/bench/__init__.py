"""Few-shot benchmark harness: tasks x methods x shots x seeds, resumable, with
Markdown tables and CoOp-style plots (`vlkit bench fewshot`)."""
