"""The pvs wire protocol, without I/O: bytes in, events out. Used by pvsd and pvs_target."""
