"""pvs_target: attaches a vDisk streamed by pvsd."""
