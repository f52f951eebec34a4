"""What a run gives back: LoRA files (export), validation videos and contact sheets, the Hub upload and model card,
trackers and webhooks."""
