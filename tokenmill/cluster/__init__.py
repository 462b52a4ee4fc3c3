"""Scale-out on existing platforms: the autoscaling policy (pure), Ray Serve, Kubernetes helpers."""
