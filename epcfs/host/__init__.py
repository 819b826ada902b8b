"""The host layer: what talks to the host kernel about processes, namespaces and real
cgroups. Below fs and service; uses the model's types."""
