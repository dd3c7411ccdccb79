"""tomtransfer's services: thin adapters that run the domain core on real engines (Ray Serve, Ray Train, MLflow)."""
