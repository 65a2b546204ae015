"""The hospital side: the Flower ClientApp and the ``flower-client`` command."""
