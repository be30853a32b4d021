"""Few-shot adaptation of a frozen dual encoder: CoOp and its neighbours."""

# Cached augmented views per training image (kept here, torch-free, for the CLI's
# defaults). Few views cost accuracy: over CoOp's 200 epochs the prompt then sees the
# same few crops again and again, where the reference draws a fresh crop every step.
# On vlkit-tiny, emoji-group 16 shots, 3 seeds (bench/coop_speed.py, BENCHMARKS.md),
# 4 views lost 6.2 points to the fresh-crop loop, 32 views 3.2, and 64 views matched
# it (+0.6).
DEFAULT_VIEWS = 64
