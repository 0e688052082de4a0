"""pvsd: the pvs server daemon and its admin console."""
