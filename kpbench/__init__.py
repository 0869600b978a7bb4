"""kpbench: how Kubernetes Services spread long-lived connections over pods."""

__version__ = "0.1.0"
