"""The network boot scripts and file names (pvsd/boot.py), without sockets: what iPXE and the
kernel are given, and everything refused before it could be given to them."""

from __future__ import annotations

import pytest

from pvsd import boot
from pvsd.boot import BootError, BootFile, BootScript
from pvsd.names import InvalidName

TOKEN = "3-1764628000123456789-1073741824-16384-" + "ab" * 32


def script(**changes: object) -> BootScript:
    values: dict[str, object] = {
        "host": "10.0.2.2:6912", "vdisk": "deb", "version": 3,
        "servers": ("127.0.0.11:6910", "127.0.0.12:6910"), "identity": TOKEN,
        "device": "52-54-00-12-34-56", "extra": "",
    }
    return BootScript(**(values | changes))  # type: ignore[arg-type]


def test_the_script_boots_the_version_with_its_root_pinned() -> None:
    text = script(extra="console=ttyS0 quiet").render()
    assert text == (
        "#!ipxe\n"
        "kernel http://10.0.2.2:6912/boot/deb/3/vmlinuz initrd=initrd ip=dhcp "
        "pvs.vdisk=deb pvs.servers=127.0.0.11:6910,127.0.0.12:6910 "
        f"pvs.identity={TOKEN} pvs.device=52-54-00-12-34-56 console=ttyS0 quiet\n"
        "initrd --name initrd http://10.0.2.2:6912/boot/deb/3/initrd\n"
        "boot\n"
    )


def test_an_ip_argument_of_the_administrator_replaces_dhcp() -> None:
    line = script(extra="ip=10.0.0.9::10.0.0.1:255.255.255.0::eth0:off").kernel_arguments()
    assert "ip=dhcp" not in line and line.endswith("ip=10.0.0.9::10.0.0.1:255.255.255.0::eth0:off")


def test_the_chain_script_asks_again_with_the_mac() -> None:
    assert boot.chain_script("[fd00::5]:6912", "deb") == (
        "#!ipxe\n"
        "echo pvs: deb for device ${mac:hexhyp}\n"
        "chain http://[fd00::5]:6912/boot/deb.ipxe?device=${mac:hexhyp}\n"
    )
    with pytest.raises(InvalidName):
        boot.chain_script("10.0.2.2:6912", "../etc")


def test_file_names_follow_the_image_stem() -> None:
    assert boot.stem_of("deb@3.img") == "deb@3" and boot.stem_of("deb.img") == "deb"
    assert boot.file_names("deb@3") == {
        BootFile.vmlinuz: "deb@3.vmlinuz", BootFile.initrd: "deb@3.initrd",
        BootFile.cmdline: "deb@3.cmdline",
    }
    assert boot.file_url("h:1", "deb", 3, BootFile.initrd) == "http://h:1/boot/deb/3/initrd"
    assert (BootFile.vmlinuz, BootFile.initrd) == boot.SERVED


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("10.0.2.2:6912", "10.0.2.2:6912"),
        ("pvs1.example:6912", "pvs1.example:6912"),
        ("pvs1.example", "pvs1.example:80"),
        ("[fd00::5]:6912", "[fd00::5]:6912"),
        (None, "127.0.0.5:6912"),
        ("", "127.0.0.5:6912"),
        (":6912", "127.0.0.5:6912"),
        ("a b:1", "127.0.0.5:6912"),
        ("h:1/x", "127.0.0.5:6912"),
        ("h:0", "127.0.0.5:6912"),
        ("h:${x}", "127.0.0.5:6912"),
        ("h\n:1", "127.0.0.5:6912"),
        ("evil.example:1 initrd=x", "127.0.0.5:6912"),
        ("fd00::5", "127.0.0.5:6912"),
    ],
)
def test_the_host_header_is_used_only_when_it_is_a_plain_address(
    header: str | None, expected: str
) -> None:
    assert boot.request_host(header, "127.0.0.5:6912") == expected


@pytest.mark.parametrize(
    ("text", "said"),
    [
        ("a\nb", "2 lines"),
        ('quiet init="/bin/sh"', "'\"'"),
        ("quiet \\", "'\\\\'"),
        ("x=${net0/ip}", "'$'"),
        ("a || shell", "'|'"),
        ("a && b", "'&'"),
        ("a # b", "'#'"),
        ("café", "'é'"),
        ("a\tb\x07", "'\\x07'"),
        ("root=/dev/sda1", "gives root="),
        ("pvs.servers=10.0.0.1:1", "gives pvs.servers="),
        ("pvs.identity=x", "gives pvs.identity="),
        ("initrd=other", "gives initrd="),
    ],
)
def test_unsafe_administrator_arguments_are_refused(text: str, said: str) -> None:
    with pytest.raises(BootError, match=r"deb@3\.cmdline") as caught:
        boot.extra_arguments(text, "/store/deb@3.cmdline")
    assert said in str(caught.value)


def test_administrator_arguments_are_one_line_of_words() -> None:
    assert boot.extra_arguments("  console=ttyS0,115200n8   quiet\n\n", "f") == (
        "console=ttyS0,115200n8 quiet"
    )
    assert boot.extra_arguments("", "f") == ""
    assert boot.extra_arguments("pvs.cache=ram pvs.cache_size=2G", "f") == (
        "pvs.cache=ram pvs.cache_size=2G"
    )


@pytest.mark.parametrize(
    ("changes", "error", "said"),
    [
        ({"device": "a b"}, InvalidName, "not a device id"),
        ({"device": "${mac}"}, InvalidName, "not a device id"),
        ({"device": ""}, InvalidName, "not a device id"),
        ({"device": "x" * 129}, InvalidName, "not a device id"),
        ({"vdisk": "a b"}, InvalidName, "not allowed"),
        ({"servers": ()}, BootError, "no server streams deb version 3"),
        ({"servers": ("10.0.0.1:6910 root=/dev/sda",)}, BootError, "server address"),
        ({"identity": "3 x"}, BootError, "not one"),
        ({"extra": "x" * 2000}, BootError, "over the kernel's 2047"),
    ],
)
def test_nothing_unchecked_reaches_the_kernel_command_line(
    changes: dict[str, object], error: type[Exception], said: str
) -> None:
    with pytest.raises(error, match=said):
        script(**changes).render()


def test_servers_are_this_one_first_then_by_name_at_most_sixteen() -> None:
    holders = [(f"s{i:02}", f"10.0.0.{i}:6910") for i in range(20, 0, -1)]
    order = boot.placement_order(holders, "s07")
    assert order[0] == "10.0.0.7:6910" and order[1] == "10.0.0.1:6910"
    assert len(order) == boot.MAX_SERVERS
    assert boot.placement_order(holders[:2], "elsewhere") == ("10.0.0.19:6910", "10.0.0.20:6910")


def test_a_server_listening_everywhere_is_named_by_the_address_it_was_reached_at() -> None:
    assert boot.own_address("0.0.0.0:6910", "10.0.2.2:6912") == "10.0.2.2:6910"
    assert boot.own_address("[::]:6910", "[fd00::5]:6912") == "[fd00::5]:6910"
    assert boot.own_address("10.1.1.11:6910", "10.0.2.2:6912") == "10.1.1.11:6910"
