"""How sizes and addresses are written on pvs-target's command line: the text every command's
help ends with (and the pvs-target(8) man page), written once. The parsers are
`pvs_protocol.sizes` and `pvs_protocol.addresses`, shared with pvsctl and pvsd."""

from __future__ import annotations

from pvs_protocol.addresses import NBD_PORT, STREAM_PORT

NOTATION = f"""\
HOST:PORT (--server): a host name, an IPv4 address or an IPv6 address in brackets, and a
  port: 10.0.0.5:6910, pvs1.example:6910, [fd00::5]:6910; without a port, {STREAM_PORT}.
--nbd: HOST:PORT (port 0: any free port; without a port, {NBD_PORT}), unix:PATH, or an NBD
  URI: nbd://HOST[:PORT]/[EXPORT] or nbd+unix:///[EXPORT]?socket=PATH (the export is the vDisk).
SIZE: bytes, or a number with a unit, as in pvsctl and pvsd: K, M, G, T are powers of 1024
  (also written KiB, MiB, GiB, TiB), KB, MB, GB, TB powers of 1000: 4G = 4GiB = 4294967296,
  4GB = 4000000000; a fraction (1.5G) is rounded down to whole bytes.
exit status: 0 done; 1 a Standard Image could not be read whole with every block matching
  its manifest; 2 any other failure, said in one line on stderr; 130 interrupted."""

__all__ = ["NOTATION"]
