"""Network boot from real pvsd processes over real HTTP: the iPXE scripts (the version a device
gets, the servers and the pinned identity on the kernel command line), the kernel and
initramfs (whole, in ranges, HEAD), every refusal as one line, boot files following their
version through version new, replication and merge, and no listener unless asked for.

The HTTP client is urllib: what matters is what goes over the socket, as iPXE would see it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from harness import Pvsd, Servers, free_port, make_vdisk, manifest_identity, random_bytes
from prometheus_client.parser import text_string_to_metric_families
from sites import Site

from pvs_protocol.manifest import Manifest
from pvsd.store import Store

MIB = 1 << 20
MAC = "52-54-00-12-34-56"
KERNEL = random_bytes(300_000, 21)
INITRD = random_bytes(1_000_000, 22)
CMDLINE = b"console=ttyS0 quiet\n"


class Answer:
    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status, self.headers, self.body = status, headers, body

    @property
    def text(self) -> str:
        return self.body.decode()


def http(url: str, *, method: str = "GET", headers: dict[str, str] | None = None) -> Answer:
    request = urllib.request.Request(url, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return Answer(answer.status, dict(answer.headers), answer.read())
    except urllib.error.HTTPError as error:
        with error:
            return Answer(error.code, dict(error.headers), error.read())


def boot_files(store: Path, stem: str, *, cmdline: bytes | None = CMDLINE) -> None:
    (store / f"{stem}.vmlinuz").write_bytes(KERNEL)
    (store / f"{stem}.initrd").write_bytes(INITRD)
    if cmdline is not None:
        (store / f"{stem}.cmdline").write_bytes(cmdline)


def boot_address(server: Pvsd) -> str:
    """The boot listener's address, given to ``server`` before it starts."""
    address = f"{server.host}:{free_port(server.host, span=1)}"
    server.args += ["--boot-listen", address]
    return address


def expected_script(
    boot: str, vdisk: str, version: int, servers: list[str], token: str, device: str,
    extra: str = "console=ttyS0 quiet",
) -> str:
    return (
        "#!ipxe\n"
        f"kernel http://{boot}/boot/{vdisk}/{version}/vmlinuz initrd=initrd ip=dhcp "
        f"pvs.vdisk={vdisk} pvs.servers={','.join(servers)} "
        f"pvs.identity={token} pvs.device={device}{' ' + extra if extra else ''}\n"
        f"initrd --name initrd http://{boot}/boot/{vdisk}/{version}/initrd\n"
        "boot\n"
    )


def until(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)
    return result


# -- one server, no site -------------------------------------------------------------------------


@pytest.fixture
def lone(pvsd_factory: Servers, tmp_path: Path) -> Iterator[tuple[Pvsd, str, Path]]:
    store = tmp_path / "store"
    make_vdisk(store, "deb", 4 * MIB, seed=5)
    boot_files(store, "deb")
    server = pvsd_factory("n1", store, start=False, args=["--admin", "off"])
    address = boot_address(server)
    server.start(vdisks=["deb"])
    server.wait_for_log("boot_listening", address=address)
    yield server, address, store


def test_scripts_files_and_ranges(lone: tuple[Pvsd, str, Path]) -> None:
    server, boot, store = lone
    chain = http(f"http://{boot}/boot/deb.ipxe")
    assert chain.status == 200 and chain.headers["Content-Type"].startswith("text/plain")
    assert chain.text == (
        "#!ipxe\n"
        "echo pvs: deb for device ${mac:hexhyp}\n"
        f"chain http://{boot}/boot/deb.ipxe?device=${{mac:hexhyp}}\n"
    )
    token = manifest_identity(store, "deb").token()
    script = http(f"http://{boot}/boot/deb.ipxe?device={MAC}")
    assert script.status == 200
    assert script.text == expected_script(boot, "deb", 1, [server.address], token, MAC)
    # the Host header the machine sent is the address it reached: written into the URLs
    named = http(f"http://{boot}/boot/deb.ipxe?device={MAC}",
                 headers={"Host": "boot.example:8080"})
    assert "http://boot.example:8080/boot/deb/1/vmlinuz " in named.text
    odd = http(f"http://{boot}/boot/deb.ipxe?device={MAC}", headers={"Host": "a b:1 x=y"})
    assert odd.text == expected_script(boot, "deb", 1, [server.address], token, MAC)

    kernel = http(f"http://{boot}/boot/deb/1/vmlinuz")
    assert kernel.status == 200 and kernel.body == KERNEL
    assert kernel.headers["Content-Length"] == str(len(KERNEL))
    initrd = http(f"http://{boot}/boot/deb/1/initrd")
    assert initrd.status == 200 and initrd.body == INITRD
    part = http(f"http://{boot}/boot/deb/1/initrd", headers={"Range": "bytes=1000-4999"})
    assert part.status == 206 and part.body == INITRD[1000:5000]
    assert part.headers["Content-Range"] == f"bytes 1000-4999/{len(INITRD)}"
    head = http(f"http://{boot}/boot/deb/1/vmlinuz", method="HEAD")
    assert head.status == 200 and head.body == b""
    assert head.headers["Content-Length"] == str(len(KERNEL))
    assert http(f"http://{boot}/boot/deb.ipxe?device={MAC}", method="HEAD").status == 200

    served = server.wait_for_log("boot_request", file="initrd", status=206)
    assert served["bytes"] == 4000 and served["vdisk"] == "deb" and served["version"] == 1
    assert served["client"] == "127.0.0.1"
    asked = server.wait_for_log("boot_request", file="script", status=200)
    assert asked["device"] == MAC and asked["version"] == 1
    assert server.wait_for_log("boot_request", file="vmlinuz", method="HEAD")["bytes"] == 0
    assert not server.trouble(), server.trouble()
    assert not server.find_logs("vdisk_refused")  # the boot files are nothing to the store


@pytest.mark.parametrize(
    ("path", "method", "status", "said"),
    [
        ("/boot/a..b.ipxe", "GET", 400, "vDisk name 'a..b' contains '..'"),
        ("/boot/a%20b.ipxe?device=x", "GET", 400, "vDisk name 'a b' has a character"),
        ("/boot/deb.ipxe?device=a%24b", "GET", 400, "device id 'a$b' is not a device id"),
        ("/boot/deb.ipxe?device=", "GET", 400, "device id '' is not a device id"),
        ("/boot/deb/x1/vmlinuz", "GET", 400, "version 'x1' is not a version number"),
        ("/boot/deb/7/vmlinuz", "GET", 404, "n1 holds no version 7 of deb"),
        ("/boot/deb/1/cmdline", "GET", 404, "no boot file 'cmdline'"),
        ("/boot/nope.ipxe?device=d1", "GET", 404, "no server of the site holds a vDisk named"),
        ("/v1/servers", "GET", 404, "nothing is served at '/v1/servers'"),
        ("/boot/deb.ipxe", "POST", 405, "POST is not served here: GET or HEAD only"),
        ("/boot/deb/1/vmlinuz", "PUT", 405, "PUT is not served here"),
    ],
)
def test_refusals_are_one_line_and_logged(
    lone: tuple[Pvsd, str, Path], path: str, method: str, status: int, said: str
) -> None:
    server, boot, _store = lone
    answer = http(f"http://{boot}{path}", method=method)
    assert answer.status == status, answer.text
    assert answer.text.startswith(said) and answer.text.count("\n") == 1, answer.text
    if status == 405:
        assert answer.headers["Allow"] == "GET, HEAD"
    refused = server.wait_for_log("boot_request_refused", status=status)
    assert refused["error"] == answer.text.strip()
    assert not server.trouble(), server.trouble()


def test_a_missing_file_is_named_with_where_to_put_it(lone: tuple[Pvsd, str, Path]) -> None:
    _server, boot, store = lone
    (store / "deb.initrd").unlink()
    for path in (f"/boot/deb.ipxe?device={MAC}", "/boot/deb/1/initrd"):
        answer = http(f"http://{boot}{path}")
        assert answer.status == 404
        assert answer.text == f"deb version 1 has no initramfs: put it at {store}/deb.initrd\n"
    (store / "deb.initrd").symlink_to("/etc/hostname")
    answer = http(f"http://{boot}/boot/deb/1/initrd")
    assert answer.status == 404 and "outside the store: copy the file into it" in answer.text
    (store / "deb.initrd").unlink()
    (store / "deb.initrd").write_bytes(INITRD)
    (store / "deb.cmdline").write_text('init="/bin/sh"\n')
    answer = http(f"http://{boot}/boot/deb.ipxe?device={MAC}")
    assert answer.status == 500 and "deb.cmdline holds '\"'" in answer.text
    (store / "deb.cmdline").unlink()
    answer = http(f"http://{boot}/boot/deb.ipxe?device={MAC}")
    assert answer.status == 200 and answer.text.split("\n")[1].endswith(f"pvs.device={MAC}")


def test_no_version_to_give_is_503(lone: tuple[Pvsd, str, Path]) -> None:
    _server, boot, store = lone
    subprocess.run(
        [sys.executable, "-m", "pvsd.ctl", "vdisk", "set", "deb", "--store", str(store),
         "--maintenance", "on"], check=True, capture_output=True, timeout=60,
    )
    answer = until(
        lambda: (a := http(f"http://{boot}/boot/deb.ipxe?device={MAC}")).status == 503 and a,
        10, "the vDisk in maintenance",
    )
    assert answer.text.startswith("deb is in maintenance: only its maintenance devices get it")
    assert http(f"http://{boot}/boot/deb/1/vmlinuz").body == KERNEL  # the files are still there


def test_the_store_takes_boot_files_for_nothing(tmp_path: Path) -> None:
    """Beside images, and alone (a version deleted by hand), boot files are no vDisk and no
    refusal: the catalog looks at .img files only."""
    store = tmp_path / "store"
    make_vdisk(store, "deb", MIB, seed=5)
    boot_files(store, "deb")
    boot_files(store, "deb@9")  # no image of version 9
    boot_files(store, "odd name")
    found = Store(store)
    try:
        changes = found.poll()
        assert sorted(found.vdisks) == ["deb"] and len(changes) == 1
        assert found.poll() == []
    finally:
        found.close()


def test_nothing_listens_without_boot_listen(pvsd_factory: Servers, tmp_path: Path) -> None:
    store = tmp_path / "store"
    make_vdisk(store, "deb", MIB, seed=5)
    boot_files(store, "deb")
    server = pvsd_factory("n2", store, vdisks=["deb"], args=["--admin", "off"])
    assert listening_ports(server.pid) == {server.port}
    assert not server.find_logs("boot_listening")


def listening_ports(pid: int) -> set[int]:
    """The TCP ports process ``pid`` listens on, from /proc (its sockets' inodes)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:["):-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as lines:
            next(lines)
            for line in lines:
                fields = line.split()
                if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                    ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


# -- a site: versions, devices, replication ------------------------------------------------------


@pytest.fixture
def site(tmp_path: Path) -> Iterator[tuple[Site, list[str]]]:
    built = Site(tmp_path, test_devices="lab-*")
    for index in (1, 2, 3):
        boot_files(tmp_path / f"store{index}", "disk")
    boots = [boot_address(server) for server in built.servers]
    try:
        built.start()
        yield built, boots
    finally:
        built.stop()


def ctl(site: Site, *args: str, index: int = 0) -> str:
    server = site.servers[index]
    result = subprocess.run(
        [sys.executable, "-m", "pvsd.ctl", *args, "--admin", f"{server.host}:{server.port + 1}",
         "--key-file", str(site.key)],
        capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL, check=False,
        env={**os.environ, "COLUMNS": "250"},
    )
    assert result.returncode == 0, f"pvsctl {' '.join(args)}: {result.stderr}"
    return result.stdout


def test_a_device_boots_the_version_its_login_would_get(site: tuple[Site, list[str]]) -> None:
    built, boots = site
    store = [built.workdir / f"store{index}" for index in (1, 2, 3)]
    s1, s2, s3 = (server.address for server in built.servers)
    one = manifest_identity(store[0], "disk").token()
    assert http(f"http://{boots[1]}/boot/disk.ipxe?device={MAC}").text == expected_script(
        boots[1], "disk", 1, [s2, s1, s3], one, MAC
    )

    # version new copies the boot files along, under the new version's names
    ctl(built, "vdisk", "version", "new", "disk")
    for kind, data in (("vmlinuz", KERNEL), ("initrd", INITRD), ("cmdline", CMDLINE)):
        assert (store[0] / f"disk@2.{kind}").read_bytes() == data
    two = Manifest.decode((store[0] / "disk@2.manifest").read_bytes()).identity.token()
    ctl(built, "vdisk", "version", "promote", "disk")  # test: test devices get it
    assert http(f"http://{boots[0]}/boot/disk.ipxe?device=lab-7").text == expected_script(
        boots[0], "disk", 2, [s1], two, "lab-7"
    )
    assert http(f"http://{boots[0]}/boot/disk.ipxe?device={MAC}").text == expected_script(
        boots[0], "disk", 1, [s1, s2, s3], one, MAC
    )
    lacking = http(f"http://{boots[1]}/boot/disk.ipxe?device=lab-7")
    assert lacking.status == 503 and lacking.text.startswith(
        "s2 holds no good copy of disk version 2 (v2:"
    )
    assert "the one lab-7 gets: boot it from a server that does (s1)" in lacking.text
    assert "pvsctl vdisk replicate disk --version 2 --to s2" in lacking.text

    # replication brings them: the same bytes on every server
    ctl(built, "vdisk", "replicate", "disk", "--version", "2", "--all")
    for index in (1, 2):
        for kind, data in (("vmlinuz", KERNEL), ("initrd", INITRD), ("cmdline", CMDLINE)):
            assert (store[index] / f"disk@2.{kind}").read_bytes() == data
        assert not list(store[index].glob(".*.partial")), "temporary files left"
    built.servers[1].wait_for_log("replication_boot_file", file="disk@2.initrd",
                                  bytes=len(INITRD))
    expected = expected_script(boots[1], "disk", 2, [s2, s1, s3], two, "lab-7")
    until(lambda: http(f"http://{boots[1]}/boot/disk.ipxe?device=lab-7").text == expected,
          10, "s2 to see version 2 on every server")
    assert http(f"http://{boots[2]}/boot/disk/2/initrd").body == INITRD

    # merge removes the older version with its boot files
    ctl(built, "vdisk", "version", "promote", "disk", "--version", "2")
    ctl(built, "vdisk", "version", "merge", "disk")
    for index in (0, 1, 2):
        left = sorted(path.name for path in store[index].glob("disk.*"))
        assert left == ["disk.vdisk.toml"], left
    assert http(f"http://{boots[2]}/boot/disk/1/vmlinuz").status == 404
    expected = expected_script(boots[2], "disk", 2, [s3, s1, s2], two, MAC)
    until(lambda: http(f"http://{boots[2]}/boot/disk.ipxe?device={MAC}").text == expected,
          10, "the ordinary device to get version 2")

    metrics = scrape(f"{built.servers[1].host}:{built.servers[1].port + 1}")
    assert metrics[("script", "ok")] >= 1 and metrics[("script", "unavailable")] == 1
    for server in built.servers:
        assert not server.trouble(), server.trouble()


def test_vdisk_show_says_which_versions_boot(tmp_path: Path) -> None:
    store = tmp_path / "store"
    make_vdisk(store, "deb", MIB, seed=5)
    boot_files(store, "deb", cmdline=None)
    shown = subprocess.run(
        [sys.executable, "-m", "pvsd.ctl", "vdisk", "show", "deb", "--store", str(store)],
        capture_output=True, text=True, timeout=60, check=True,
        env={**os.environ, "COLUMNS": "250"},
    ).stdout
    header, row = (line for line in shown.splitlines() if "Boot" in line or "deb" in line)
    assert header.split("┃")[11].strip() == "Boot" and row.split("│")[11].strip() == "yes"
    (store / "deb.initrd").unlink()
    shown = subprocess.run(
        [sys.executable, "-m", "pvsd.ctl", "vdisk", "show", "deb", "--store", str(store),
         "--json"], capture_output=True, text=True, timeout=60, check=True,
    ).stdout
    assert '"boot": false' in shown and f'"vmlinuz": "{store}/deb.vmlinuz"' in shown


def scrape(address: str) -> dict[tuple[str, str], float]:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    return {
        (sample.labels["file"], sample.labels["outcome"]): sample.value
        for family in text_string_to_metric_families(text) if family.name == "pvsd_boot_requests"
        for sample in family.samples if sample.name == "pvsd_boot_requests_total"
    }
