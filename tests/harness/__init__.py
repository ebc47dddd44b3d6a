"""What the integration and fault tests share to run real workers on real brokers."""
