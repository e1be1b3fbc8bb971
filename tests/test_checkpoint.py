"""The checkpoint format: what a card records, and what is checked without torch."""

from __future__ import annotations

import json
import shutil
import struct
import zipfile
from pathlib import Path

import pytest
import torch

from wsi_pipeline.checkpoint import (
    CheckpointError,
    ModelCard,
    check_checkpoint,
    load_checkpoint,
    resolve_checkpoint,
    save_checkpoint,
)
from wsi_pipeline.config import ConfigError, SegmentConfig
from wsi_pipeline.models import create_model
from wsi_pipeline.segment.job import prepare_config


@pytest.fixture()
def lanet(tmp_path: Path) -> Path:
    model = create_model("lanet", num_classes=3)
    return save_checkpoint(tmp_path / "lanet", model, ModelCard(architecture="lanet", mpp=0.5))


def test_saved_cards_record_the_size_divisor_of_their_architecture(lanet: Path) -> None:
    assert json.loads((lanet / "model.json").read_text())["size_divisor"] == 32
    for shipped in (
        "nuclei-unet16",
        "nuclei-unet16-v2",
        "nuclei-unet16-v3",
        "nuclei-unet16-v4",
        "nuclei-unet16-v5",
        "nuclei-unet16-v6",
    ):
        _, card = check_checkpoint(shipped)
        assert card.size_divisor == 16


def test_a_tile_that_does_not_fit_the_model_is_refused_from_the_card(lanet: Path) -> None:
    assert prepare_config(SegmentConfig(checkpoint=str(lanet), tile=256)).tile == 256
    with pytest.raises(ConfigError, match="not a multiple of 32"):
        prepare_config(SegmentConfig(checkpoint=str(lanet), tile=272))


def test_an_older_card_without_a_divisor_takes_its_architectures(lanet: Path) -> None:
    card = json.loads((lanet / "model.json").read_text())
    del card["size_divisor"]
    (lanet / "model.json").write_text(json.dumps(card))
    assert check_checkpoint(lanet)[1].size_divisor is None
    with pytest.raises(ConfigError, match="not a multiple of 32"):
        prepare_config(SegmentConfig(checkpoint=str(lanet), tile=272))
    card["architecture"] = "no-such-net"
    (lanet / "model.json").write_text(json.dumps(card))
    with pytest.raises(CheckpointError, match="unknown model 'no-such-net'"):
        prepare_config(SegmentConfig(checkpoint=str(lanet), tile=256))
    with pytest.raises(CheckpointError, match="unknown model 'no-such-net'"):
        load_checkpoint(lanet)


def _rewrite(weights: Path, change) -> None:
    """Rewrite the torch archive ``weights`` member by member through ``change(name, data)``."""
    with zipfile.ZipFile(weights) as archive:
        members = [(info, archive.read(info)) for info in archive.infolist()]
    with zipfile.ZipFile(weights, "w") as archive:
        for info, data in members:
            if (data := change(info.filename, data)) is not None:
                archive.writestr(info, data)


def _flip_a_stored_byte(weights: Path) -> None:
    """Corrupt one weight's bytes in place, leaving its CRC as it was (a bad disk block):
    ``torch.load`` does not check CRCs and would load the wrong weight silently."""
    with zipfile.ZipFile(weights) as archive:
        info = max(archive.infolist(), key=lambda i: i.file_size)
    raw = bytearray(weights.read_bytes())
    # The local header's own name and extra lengths (at +26), not the central directory's.
    name_length, extra_length = struct.unpack_from("<HH", raw, info.header_offset + 26)
    data_start = info.header_offset + 30 + name_length + extra_length
    raw[data_start + info.file_size // 2] ^= 0xFF
    weights.write_bytes(bytes(raw))


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (lambda w: w.write_bytes(w.read_bytes()[:1000]), "cannot load the weights"),
        (lambda w: w.write_bytes(b"not a zip"), "File is not a zip file"),
        (_flip_a_stored_byte, "is corrupt"),
        (
            lambda w: _rewrite(w, lambda name, data: None if name.endswith("data.pkl") else data),
            "not a torch.save archive",
        ),
        (lambda w: w.unlink(), "no model.pt"),
    ],
)
def test_damaged_weights_are_found_without_loading_them(
    damage, reason: str, tmp_path: Path
) -> None:
    path = tmp_path / "damaged"
    shutil.copytree(resolve_checkpoint(None), path)
    check_checkpoint(path)  # intact
    damage(path / "model.pt")
    with pytest.raises(CheckpointError, match=reason):
        check_checkpoint(path)


@pytest.mark.parametrize(
    "save",
    [
        pytest.param(
            lambda state, f: torch.save(state, f, _use_new_zipfile_serialization=False),
            id="legacy-format",
        ),
        pytest.param(lambda state, f: _save_without_crcs(state, f), id="crc-off"),
    ],
)
def test_weights_torch_loads_are_not_refused(save, lanet: Path) -> None:
    """Formats ``torch.load`` accepts pass the check and load: the pre-archive format, and
    archives written with torch's CRCs turned off (stored as 0)."""
    model, _ = load_checkpoint(lanet)
    save(model.state_dict(), lanet / "model.pt")
    check_checkpoint(lanet)
    reloaded, _ = load_checkpoint(lanet)
    for name, value in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], value)


def _save_without_crcs(state: dict, path: Path) -> None:
    torch.serialization.set_crc32_options(False)
    try:
        torch.save(state, path)
    finally:
        torch.serialization.set_crc32_options(True)
    with zipfile.ZipFile(path) as archive:
        assert any(info.CRC == 0 and info.file_size for info in archive.infolist())


def test_after_a_failed_job_the_weights_are_blamed_only_when_they_do_not_load(
    lanet: Path,
) -> None:
    from wsi_pipeline.segment.job import _raise_if_the_weights_are_why

    failure = RuntimeError("a worker died")
    _raise_if_the_weights_are_why(str(lanet), failure)  # they load: the job's error stands
    card = json.loads((lanet / "model.json").read_text())
    card["kwargs"] = {"agg_channels": 7}
    (lanet / "model.json").write_text(json.dumps(card))
    with pytest.raises(CheckpointError, match="cannot load the weights") as raised:
        _raise_if_the_weights_are_why(str(lanet), failure)
    assert raised.value.__cause__ is failure
