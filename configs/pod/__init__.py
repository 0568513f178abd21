"""Pod-scale configs: realistic sizes for TPU pods and GPU hosts (plan them with `python -m training.plan`)."""
