"""Multi-run studies built from the pipeline (e.g. the KLong ablation over seeds)."""
