"""Development tooling: the local control plane, kwok nodes and the local node that runs pods."""
