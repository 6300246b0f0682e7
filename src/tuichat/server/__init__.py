"""Running servers: launch profiles, the launcher and its process groups, GPU and metrics readers, fleets."""
