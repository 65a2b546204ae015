"""A training site predicts from the probabilities it kept at the fold's closing validation.

The site-side half of ``EvaluateRequest.stage`` / ``PredictRequest.staged``
(``client.stagedrows``), on the real tiny cohort: the rows written from the kept
probabilities are exactly the rows the model itself gives; anything that does
not fit (another model, another round, a torn, foreign or inconsistent file, a
request that is neither weights nor digest) writes nothing and asks for the
weights, or is refused.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from client.requestcheck import RequestRejected, check_request
from client.site import SiteContext, SiteRunner
from common.config import ExperimentConfig, SiteConfig, with_sites
from common.configfile import load_config
from common.models import build_model
from common.protocol import CONFIG, PREDICT, Header, PredictRequest, ProtocolError
from common.records import ModelCodec, model_digest, to_transport

SITES = ("centre1", "centre2", "centre3")
PLATT = (1.5, -0.25)


def _cfg() -> ExperimentConfig:
    cfg = load_config("tiny", {"models": {"densenet2d": {"enabled": False}}, "train": {"rounds": 2}})
    return with_sites(cfg, tuple(SiteConfig(name=s) for s in SITES))


def _received(cfg: ExperimentConfig, seed: int = 0) -> np.ndarray:
    """A model as a site receives it (cast for the wire and back)."""
    import torch

    torch.manual_seed(seed)
    state = build_model("densenet3d", cfg.models.densenet3d, mask_channel=cfg.preprocess.mask_channel).state_dict()
    flat = ModelCodec.for_state_dict(state).pack(state)
    return to_transport(flat, cfg.federation.transport_dtype).astype(np.float32)


def _site(cfg: ExperimentConfig, cohort: dict[str, Path], out: Path, run: str = "r") -> SiteRunner:
    return SiteRunner(SiteContext("centre1", cohort["centre1"], out), cfg, run)


def _rows(site: SiteRunner) -> list[list[str]]:
    with (site.run_dir / "predictions" / "densenet3d_fold0.csv").open() as fh:
        return list(csv.reader(fh))


def _kept(site: SiteRunner) -> Path:
    return site.run_dir / "state" / "densenet3d_fold0_staged.npz"


def test_rows_from_kept_probabilities_are_the_rows_the_model_gives(cohort: dict[str, Path], tmp_path: Path) -> None:
    cfg = _cfg()
    flat = _received(cfg)
    digest = model_digest(flat, cfg.federation.transport_dtype)

    kept = _site(cfg, cohort, tmp_path / "kept")
    h_kept = kept.validate_round("densenet3d", 0, flat, 2, stage=True)
    assert _kept(kept).is_file()
    out = kept.predict_fold("densenet3d", 0, None, 2, "train", platt=PLATT, staged=digest)

    sent = _site(cfg, cohort, tmp_path / "sent")
    h_sent = sent.validate_round("densenet3d", 0, flat, 2)
    assert not _kept(sent).exists()  # kept only when asked
    ref = sent.predict_fold("densenet3d", 0, flat, 2, "train", platt=PLATT)

    for f in ("neg", "pos", "neg_sum", "pos_sum"):  # the validation released is the same
        np.testing.assert_array_equal(getattr(h_kept, f), getattr(h_sent, f))
    assert out.predicted == ref.predicted == len(kept.folds[0].val) + len(kept.folds[0].test) > 0
    assert not out.resend
    assert _rows(kept) == _rows(sent)  # every patient, split, label and probability, to the last digit
    assert not _kept(kept).exists()  # used once, then deleted


def test_a_prediction_with_the_weights_deletes_kept_probabilities(cohort: dict[str, Path], tmp_path: Path) -> None:
    cfg = _cfg()
    flat = _received(cfg)
    site = _site(cfg, cohort, tmp_path)
    site.validate_round("densenet3d", 0, flat, 2, stage=True)
    site.predict_fold("densenet3d", 0, flat, 2, "train")
    assert not _kept(site).exists()


def _rewrite(path: Path, split: str, values: Callable[[np.ndarray], np.ndarray], *, pickle: bool = False) -> None:
    """The kept file with one split's array replaced by ``values(old)``."""
    with np.load(path) as z:
        d = {k: z[k] for k in z.files}
    d[split] = values(d[split])
    buf = io.BytesIO()
    np.savez(buf, allow_pickle=pickle, **d)
    path.write_bytes(buf.getvalue())


def _objects(p: np.ndarray) -> np.ndarray:
    obj = np.empty(len(p), dtype=object)
    obj[:] = [0.5] * len(p)
    return obj


FILE_ATTACKS: dict[str, Callable[[Path], object]] = {
    "missing": lambda p: p.unlink(),
    "torn": lambda p: p.write_bytes(p.read_bytes()[:100]),
    "not a zip": lambda p: p.write_bytes(b"not an npz file"),
    "a split short": lambda p: _rewrite(p, "test", lambda a: a[:-1]),
    "NaN probabilities": lambda p: _rewrite(p, "val", lambda a: np.full_like(a, np.nan)),
    "pickled objects": lambda p: _rewrite(p, "val", _objects, pickle=True),
    "integers": lambda p: _rewrite(p, "val", lambda a: np.zeros(len(a), np.int64)),
    "another model": lambda p: None,  # the request names another digest (below)
    "another round": lambda p: None,  # the request names another round (below)
}


@pytest.mark.parametrize("attack", list(FILE_ATTACKS))
def test_a_missing_torn_foreign_or_other_models_kept_file_asks_for_the_weights(
    attack: str, cohort: dict[str, Path], tmp_path: Path
) -> None:
    cfg = _cfg()
    flat = _received(cfg)
    site = _site(cfg, cohort, tmp_path)
    site.validate_round("densenet3d", 0, flat, 2, stage=True)
    FILE_ATTACKS[attack](_kept(site))
    named = _received(cfg, seed=1) if attack == "another model" else flat
    rnd = 1 if attack == "another round" else 2
    out = site.predict_fold(
        "densenet3d", 0, None, rnd, "train", staged=model_digest(named, cfg.federation.transport_dtype)
    )
    assert out.resend and out.predicted == 0
    assert not (site.run_dir / "predictions" / "densenet3d_fold0.csv").exists()  # nothing guessed
    assert not _kept(site).exists()


def test_the_digest_is_the_same_on_both_sides_of_a_float16_wire() -> None:
    rng = np.random.default_rng(0)
    server = rng.normal(size=1000).astype(np.float32)  # the aggregate, as checkpointed
    site = to_transport(server, "float16").astype(np.float32)  # what the site decodes
    assert model_digest(site, "float16") == model_digest(server, "float16")
    assert model_digest(site, "float32") != model_digest(server, "float32")  # float32: the very bytes
    nudged = server.copy()
    nudged[3] = np.nextafter(nudged[3], np.float32(np.inf))
    assert model_digest(nudged, "float32") != model_digest(server, "float32")


def test_a_prediction_request_is_weights_or_a_digest_of_a_kept_network() -> None:
    cfg = _cfg()
    w = np.zeros(4, np.float32)
    digest = "ab" * 32
    ok = [
        PredictRequest(model="densenet3d", fold=0, round=2, role="train", weights=w),
        PredictRequest(model="densenet3d", fold=0, round=2, role="train", staged=digest),
        PredictRequest(model="densenet3d", fold=0, round=2, role="external", weights=w),
    ]
    for req in ok:
        check_request(req, cfg, "predict")
    bad = {
        "neither": PredictRequest(model="densenet3d", fold=0, round=2, role="train"),
        "both": PredictRequest(model="densenet3d", fold=0, round=2, role="train", weights=w, staged=digest),
        "external": PredictRequest(model="densenet3d", fold=0, round=2, role="external", staged=digest),
    }
    for name, req in bad.items():
        with pytest.raises(RequestRejected, match=r"weights|training site"):
            check_request(req, cfg, name)
    radiomics = with_sites(
        load_config("tiny", {"models": {"radiomics": True}}), tuple(SiteConfig(name=s) for s in SITES)
    )
    with pytest.raises(RequestRejected, match="radiomics"):
        check_request(PredictRequest(model="radiomics", fold=0, round=1, role="train", staged=digest), radiomics, "p")


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize("bad", ["AB" * 32, "ab" * 31, "ab" * 32 + "00", "../../etc/passwd", "", 7])
def test_a_malformed_digest_is_refused_on_decode(bad: object) -> None:
    header = Header(experiment={"name": "t"}, run_id="r")
    msg = PREDICT.message(header, PredictRequest(model="densenet3d", fold=0, round=2, role="train", staged="ab" * 32), 1)
    assert PREDICT.read_request(msg)[1].staged == "ab" * 32
    msg.content.config_records[CONFIG]["staged"] = bad  # type: ignore[assignment]
    with pytest.raises(ProtocolError, match="digest"):
        PREDICT.read_request(msg)


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize("flag", [0.5, 2, -1, float("nan")])
def test_a_resend_flag_other_than_0_or_1_is_refused(flag: float) -> None:
    from flwr.app import Message

    from common.protocol import PredictReply, encode

    content = encode(PredictReply(predicted=0, resend=True))
    assert PREDICT.read_reply(Message(content, dst_node_id=1, message_type=PREDICT.type)).resend
    content.metric_records["metrics"]["resend"] = flag
    with pytest.raises(ProtocolError):
        PREDICT.read_reply(Message(content, dst_node_id=1, message_type=PREDICT.type))
