"""BLIP (Li et al. 2022): one model for image-text matching (ITC, ITM) and captioning (LM), on transformers' BLIP classes."""
