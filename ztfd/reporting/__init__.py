"""What operators and astronomers read: status, Prometheus metrics, the night report and its light curves."""
