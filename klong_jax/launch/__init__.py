"""Launching: the xmanager-shaped experiment description, the local process runner, and the AOT
memory plan a pod launch checks first. The launcher scripts are in the repo's `launch/`."""
