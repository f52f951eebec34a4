"""Data: clips and images found, probed, captioned, bucketed by size, cached as latents and text embeddings, and
served to the loop in batches. Imports the model package (the VAE and text encoder encode the caches)."""
