"""Only enrolled hospitals, each under its own name: the enrolment registry and the ServerApp's site check.

Pure rules first (``server/identity.py``'s ``decide``), then the real plan's
discovery and rejoin against the real ClientApp in process, with nodes
presenting public keys as the SuperLink reports them (``Grid.get_nodes()``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

import pytest
from flwr.cli.supernode.register import try_load_public_key
from flwr.proto.node_pb2 import NodeInfo

from client.keys import make_keypair
from common.config import SiteConfig, with_sites
from common.configfile import load_config
from server.enrolment import Enrolment, EnrolmentError, key_fingerprint
from server.identity import Claim, SiteGate, decide
from server.runner import PlanRunner

from .inprocess import InProcessGrid

SITES = ("centre1", "centre2", "centre3")


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``flower-client keygen`` key pairs: the three hospitals and an outsider; name -> public key file."""
    folder = tmp_path_factory.mktemp("keys")
    return {name: make_keypair(folder, name)[1] for name in (*SITES, "outsider")}


@pytest.fixture(scope="module")
def sites_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Shared site output folder: each site's preprocessing cache is made once for the module."""
    return tmp_path_factory.mktemp("identity-sites")


def flower_form(pub: Path) -> bytes:
    """The key as the SuperLink stores and reports it (what `flwr supernode register` sends)."""
    return try_load_public_key(pub)


def test_fingerprint_is_the_same_for_the_pub_file_and_flowers_pem(keys: dict[str, Path]) -> None:
    pub = keys["centre1"]
    assert flower_form(pub).startswith(b"-----BEGIN PUBLIC KEY")
    assert key_fingerprint(pub.read_bytes()) == key_fingerprint(flower_form(pub))
    assert key_fingerprint(keys["centre2"].read_bytes()) != key_fingerprint(pub.read_bytes())
    with pytest.raises(EnrolmentError):
        key_fingerprint(b"ssh-ed25519 garbage")


def test_registry_binds_one_key_to_one_site(keys: dict[str, Path], tmp_path: Path) -> None:
    folder = tmp_path / "enrolled"
    folder.mkdir()
    for s in SITES:
        (folder / f"{s}.pub").write_bytes(keys[s].read_bytes())
    reg = Enrolment.from_key_dir(folder)
    assert set(reg.sites) == set(SITES)
    assert reg.site_of(key_fingerprint(flower_form(keys["centre2"]))) == "centre2"
    assert reg.site_of(key_fingerprint(keys["outsider"].read_bytes())) is None
    reg.save(tmp_path / "enrolment.json")
    assert Enrolment.load(tmp_path / "enrolment.json") == reg
    with pytest.raises(EnrolmentError, match="two sites"):
        reg.with_key("centre4", keys["centre1"].read_bytes())  # one key cannot speak for two sites
    with pytest.raises(EnrolmentError, match="another key"):
        reg.with_key("centre1", keys["outsider"].read_bytes())  # nor a site take a second key
    with pytest.raises(EnrolmentError, match="site name"):
        Enrolment({"../centre1": "ab"})
    for bad in ('{"sites": ["centre1"]}', "[]", "{"):
        (tmp_path / "bad.json").write_text(bad)
        with pytest.raises(EnrolmentError, match="not an enrolment registry"):
            Enrolment.load(tmp_path / "bad.json")
    (folder / "centre4.pub").write_bytes(keys["centre1"].read_bytes())
    with pytest.raises(EnrolmentError, match=r"centre4\.pub"):
        Enrolment.from_key_dir(folder)


def test_decide_refuses_unenrolled_keys_other_sites_names_and_a_second_node(keys: dict[str, Path]) -> None:
    reg = Enrolment({s: key_fingerprint(keys[s].read_bytes()) for s in SITES})
    k = {name: flower_form(p) for name, p in keys.items()}
    claims = [
        Claim(1, "centre1", k["centre1"]),
        Claim(2, "centre2", k["centre2"]),
        Claim(7, "centre3", k["outsider"]),  # not enrolled
        Claim(8, "centre1", k["centre3"]),  # centre3's key claiming centre1
        Claim(9, "centre2", b""),  # no key at all
    ]
    verdicts = decide(claims, reg, held={}, online={1, 2, 7, 8, 9})
    assert [v.accepted for v in verdicts] == [True, True, False, False, False]
    assert verdicts[2].reason == "its key is not enrolled"
    assert verdicts[3].reason == "its key is enrolled for site centre3, not centre1"
    # a second node for a connected site, even with the right key (e.g. a copied key) while the first is online
    (twin,) = decide([Claim(5, "centre2", k["centre2"])], reg, held={"centre2": 2}, online={1, 2, 5})
    assert not twin.accepted and twin.reason == "site centre2 is already connected as node 2"
    # once the first node is gone, the site's own key may come back under a new node id
    (back,) = decide([Claim(5, "centre2", k["centre2"])], reg, held={"centre2": 2}, online={1, 5})
    assert back.accepted


def test_open_enrolment_still_refuses_a_second_node_for_a_connected_site() -> None:
    # the finding: with discovery {1: centre1, 2: centre2}, node 99 claiming centre2 replaced node 2
    (v,) = decide([Claim(99, "centre2", b"k")], None, held={"centre1": 1, "centre2": 2}, online={1, 2, 99})
    assert not v.accepted and "already connected as node 2" in v.reason
    both = decide([Claim(4, "centre3", b"a"), Claim(3, "centre3", b"b")], None, held={}, online={3, 4})
    assert [v.accepted for v in both] == [False, True]  # within one batch the lowest node id wins


class KeyedGrid(InProcessGrid):
    """The in-process grid, reporting each node's public key as the SuperLink would."""

    def __init__(self, *args: object, node_keys: dict[int, bytes], **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.node_keys = node_keys

    def add_node(self, node_id: int, claims: str, data_of: str, key: bytes) -> None:
        """A further SuperNode whose node config says ``site=claims`` (data of ``data_of``)."""
        template = next(c for n, c in self.node_config.items() if self.nodes[n] == data_of)
        self.nodes[node_id] = claims
        self.node_config[node_id] = {**template, "site": claims}
        self.node_keys[node_id] = key

    def get_nodes(self) -> Iterable[NodeInfo]:
        return [NodeInfo(node_id=n, public_key=self.node_keys.get(n, b"")) for n in self.nodes]


def _cfg():  # type: ignore[no-untyped-def]
    cfg = load_config("tiny", {"run_folds": [0], "models": {"densenet2d": {"enabled": False}}})
    return with_sites(cfg, tuple(SiteConfig(name=s) for s in SITES))


@pytest.mark.usefixtures("task_identity")
def test_discovery_admits_each_enrolled_hospital_under_its_name_only(
    keys: dict[str, Path],
    tiny_cohort: Path,
    sites_out: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    registry = tmp_path / "enrolment.json"
    Enrolment({s: key_fingerprint(keys[s].read_bytes()) for s in SITES}).save(registry)
    grid = KeyedGrid(
        {s: tiny_cohort / s for s in SITES},
        sites_out,
        node_keys={100 + i: flower_form(keys[s]) for i, s in enumerate(SITES)},
    )
    grid.add_node(
        98, claims="centre1", data_of="centre3", key=flower_form(keys["centre3"])
    )  # another site's key
    grid.add_node(99, claims="centre2", data_of="centre3", key=flower_form(keys["outsider"]))  # not enrolled
    gate = SiteGate(registry)
    runner = PlanRunner(grid, _cfg(), tmp_path / "run", "id1", gate=gate)
    with caplog.at_level(logging.WARNING, logger="server.identity"):
        sites = runner.discover(expected=5, wait_s=0)
    assert {n: s.site for n, s in sites.items()} == {100: "centre1", 101: "centre2", 102: "centre3"}
    assert {r["node"]: r["reason"] for r in gate.refused} == {
        98: "its key is enrolled for site centre3, not centre1",
        99: "its key is not enrolled",
    }
    assert "refused node 98 claiming site centre1" in caplog.text


@pytest.mark.usefixtures("task_identity")
def test_only_a_sites_own_node_can_report_it_unavailable(
    keys: dict[str, Path], tiny_cohort: Path, sites_out: Path, tmp_path: Path
) -> None:
    registry = tmp_path / "enrolment.json"
    Enrolment({s: key_fingerprint(keys[s].read_bytes()) for s in SITES}).save(registry)
    grid = KeyedGrid(
        {s: tiny_cohort / s for s in SITES[:2]},
        sites_out,
        node_keys={100 + i: flower_form(keys[s]) for i, s in enumerate(SITES[:2])},
    )
    # centre3's own node, in report-only mode (its data failed validation): recorded, with its reason
    grid.add_node(102, claims="centre3", data_of="centre2", key=flower_form(keys["centre3"]))
    grid.node_config[102]["unavailable"] = "no valid case"
    # a node with centre3's key saying centre1 is unavailable: refused, centre1 is not marked down
    grid.add_node(98, claims="centre1", data_of="centre2", key=flower_form(keys["centre3"]))
    grid.node_config[98]["unavailable"] = "disk failure"
    gate = SiteGate(registry)
    runner = PlanRunner(grid, _cfg(), tmp_path / "run", "id3", gate=gate)
    sites = runner.discover(expected=4, wait_s=0)
    assert {n: s.site for n, s in sites.items()} == {100: "centre1", 101: "centre2"}
    assert runner.registry.unavailable == {"centre3": "no valid case"}
    assert [(r["node"], r["claimed_site"]) for r in gate.refused] == [(98, "centre1")]


@pytest.mark.usefixtures("task_identity")
def test_a_node_claiming_a_connected_site_after_discovery_does_not_replace_it(
    tiny_cohort: Path, sites_out: Path, tmp_path: Path
) -> None:
    grid = KeyedGrid({s: tiny_cohort / s for s in SITES}, sites_out, node_keys={})
    runner = PlanRunner(grid, _cfg(), tmp_path / "run", "id2")  # open enrolment: no registry
    runner.discover(expected=3, wait_s=0)
    grid.add_node(199, claims="centre2", data_of="centre1", key=b"")
    assert runner.rejoin() == {100: "centre1", 101: "centre2", 102: "centre3"}
    assert [r["node"] for r in runner.gate.refused] == [199]
