"""wanforge launcher: the CLI and everything around a run."""
