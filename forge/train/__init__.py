"""Training: a plain loop over token splits for LoRA, rsLoRA, QLoRA and full fine-tuning, exactly resumable.

recipe.run_training is the entry point (the train stage calls it); loop.py holds the loop itself.
"""
