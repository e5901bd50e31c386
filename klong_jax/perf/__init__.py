"""Performance accounting: model FLOPs per token, MFU, and the accelerator peak table."""
