"""The coordinating site: the Flower ServerApp, the experiment plan and ``flower-server``."""
