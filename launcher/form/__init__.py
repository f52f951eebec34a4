"""The notebook config form: widgets generated from the config schema, the panels under it, and its launch."""
