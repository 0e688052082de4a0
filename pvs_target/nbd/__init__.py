"""The target's NBD export: a sans-IO server state machine (``protocol``) and its asyncio
adapter (``server``), so that qemu, the kernel's nbd-client, nbdfuse, nbdcopy, qemu-img and fio
can use an attached vDisk."""
