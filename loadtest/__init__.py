"""Load tests of the HTTP service: Locust scenario, local server control, real MNIST digits as PNG uploads."""
