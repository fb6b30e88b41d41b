"""modelling.pretrained: weights are kept only when their SHA-256 checks out; nothing else is left behind."""
from __future__ import annotations

import hashlib
import io
import os
import pathlib

import pytest

from conftest import tiny_opts
from modelling import pretrained
from modelling.pretrained import FetchError, WeightSource, check, fetch, main


def _published(tmp_path: pathlib.Path, data: bytes, *, name_digest: bytes | None = None) -> str:
    """A file:// URL of ``data`` named torch.hub-style with the SHA-256 prefix of ``name_digest`` (default: of data)."""
    prefix = hashlib.sha256(data if name_digest is None else name_digest).hexdigest()[:8]
    served = tmp_path / "server" / f"weights-{prefix}.pth"
    served.parent.mkdir(exist_ok=True)
    served.write_bytes(data)
    return served.as_uri()


@pytest.fixture
def source(tmp_path, monkeypatch):
    """Point the resnet18 entry at a local 'published' file; returns (its bytes, models folder)."""
    data = os.urandom(3 << 20)  # three read blocks
    monkeypatch.setitem(pretrained.WEIGHT_SOURCES, "resnet18", WeightSource(_published(tmp_path, data), "r18.pth"))
    return data, tmp_path / "models"


def _listing(folder: pathlib.Path) -> list[str]:
    return sorted(os.listdir(folder)) if folder.exists() else []


def test_fetch_writes_the_published_file_under_the_recipe_name(source, capsys):
    data, models = source
    path = fetch("resnet18", str(models), progress=False)
    assert path == str(models / "r18.pth")
    assert (models / "r18.pth").read_bytes() == data
    assert _listing(models) == ["r18.pth"]  # no temporary file left
    assert f"MODEL.PRETRAIN_PATH {path}" in capsys.readouterr().out


def test_a_download_with_another_checksum_is_not_kept(tmp_path, monkeypatch):
    url = _published(tmp_path, b"tampered weights", name_digest=b"the published weights")
    monkeypatch.setitem(pretrained.WEIGHT_SOURCES, "resnet18", WeightSource(url, "r18.pth"))
    models = tmp_path / "models"
    with pytest.raises(FetchError, match=r"has SHA-256 [0-9a-f]{64}, not a SHA-256 starting [0-9a-f]{8}.*not kept"):
        fetch("resnet18", str(models), progress=False)
    assert not models.exists()  # nor the folder the download had created


def test_a_file_in_place_that_checks_out_is_kept_without_downloading(source, monkeypatch, capsys):
    data, models = source
    fetch("resnet18", str(models), progress=False)

    def no_network(*args, **kwargs):
        raise AssertionError("downloaded again")

    monkeypatch.setattr(pretrained.urllib.request, "urlopen", no_network)
    assert fetch("resnet18", str(models), progress=False) == str(models / "r18.pth")
    assert "nothing downloaded" in capsys.readouterr().out
    assert (models / "r18.pth").read_bytes() == data


def test_another_file_in_place_is_replaced_only_with_force(source):
    data, models = source
    models.mkdir()
    (models / "r18.pth").write_bytes(b"someone's own weights")
    with pytest.raises(FetchError, match=r"r18.pth exists but its SHA-256 .* left as it is.*--force"):
        fetch("resnet18", str(models), progress=False)
    assert (models / "r18.pth").read_bytes() == b"someone's own weights"
    fetch("resnet18", str(models), force=True, progress=False)
    assert (models / "r18.pth").read_bytes() == data
    assert _listing(models) == ["r18.pth"]


def test_unreachable_source_says_how_to_fetch_by_hand(tmp_path, monkeypatch):
    monkeypatch.setitem(pretrained.WEIGHT_SOURCES, "resnet18",
                        WeightSource((tmp_path / "nowhere" / "w-0123abcd.pth").as_uri(), "r18.pth"))
    models = tmp_path / "models"
    with pytest.raises(FetchError, match=r"Cannot download .*w-0123abcd\.pth.*copy it to .*r18\.pth.*--check"):
        fetch("resnet18", str(models), progress=False)
    assert _listing(models) == []


def test_a_download_cut_short_is_not_kept(source, monkeypatch):
    data, models = source

    class CutShort(io.BytesIO):
        headers = {"Content-Length": str(len(data))}

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.close()

    monkeypatch.setattr(pretrained.urllib.request, "urlopen", lambda url, timeout: CutShort(data[:1000]))
    with pytest.raises(FetchError, match=f"stopped after 1000 of {len(data)} bytes"):
        fetch("resnet18", str(models), progress=False)
    assert not models.exists()
    models.mkdir()  # a folder that was there before stays
    with pytest.raises(FetchError, match=f"stopped after 1000 of {len(data)} bytes"):
        fetch("resnet18", str(models), progress=False)
    assert _listing(models) == [] and models.is_dir()


def test_full_sha256_for_a_mirror(source, tmp_path):
    data, models = source
    mirror = tmp_path / "mirror.bin"  # a name without checksum digits
    mirror.write_bytes(data)
    with pytest.raises(FetchError, match="carries no checksum digits.*--sha256"):
        fetch("resnet18", str(models), url=mirror.as_uri(), progress=False)
    wrong = hashlib.sha256(b"other").hexdigest()
    with pytest.raises(FetchError, match=f"not SHA-256 {wrong}"):
        fetch("resnet18", str(models), url=mirror.as_uri(), sha256=wrong, progress=False)
    assert _listing(models) == []
    fetch("resnet18", str(models), url=mirror.as_uri(), sha256=hashlib.sha256(data).hexdigest().upper(),
          progress=False)
    assert (models / "r18.pth").read_bytes() == data
    with pytest.raises(FetchError, match="not a SHA-256 digest"):
        fetch("resnet18", str(models), sha256="abc", progress=False)


def test_another_release_by_full_digest_is_saved_under_its_own_digits(tmp_path, monkeypatch):
    data = b"another release of the same weights"
    digest = hashlib.sha256(data).hexdigest()
    mirror = tmp_path / "mirror.pth"
    mirror.write_bytes(data)
    published = WeightSource((tmp_path / "resnet18-5c106cde.pth").as_uri(), "resnet18-5c106cde.pth")
    monkeypatch.setitem(pretrained.WEIGHT_SOURCES, "resnet18", published)
    models = tmp_path / "models"
    path = fetch("resnet18", str(models), url=mirror.as_uri(), sha256=digest, progress=False)
    assert os.path.basename(path) == f"resnet18-{digest[:8]}.pth"  # not a name that claims 5c106cde
    assert "matches the published" in check(path)
    assert pretrained.saved_name(published, "5c106cde" + "0" * 56) == "resnet18-5c106cde.pth"
    no_digits = WeightSource(published.url, "r18.pth")
    assert pretrained.saved_name(no_digits, digest) == "r18.pth"


def test_check_compares_with_the_name_or_the_recipe_file_name(tmp_path):
    good = tmp_path / f"w-{hashlib.sha256(b'abc').hexdigest()[:10]}.pth"
    good.write_bytes(b"abc")
    assert check(str(good)).endswith(f"matches the published {good.name}.")
    bad = tmp_path / f"w-{hashlib.sha256(b'abd').hexdigest()[:10]}.pth"
    bad.write_bytes(b"abc")
    with pytest.raises(FetchError, match="so it is not the published w-"):
        check(str(bad))
    recipe_name = tmp_path / pretrained.WEIGHT_SOURCES["resnet50_ibn_a"].filename  # r50_ibn_a.pth: no digits
    recipe_name.write_bytes(b"abc")
    with pytest.raises(FetchError, match=f"does not start with {pretrained.WEIGHT_SOURCES['resnet50_ibn_a'].sha256_prefix}"):
        check(str(recipe_name))
    with pytest.raises(FetchError, match="is a folder"):
        check(str(tmp_path))
    plain = tmp_path / "mine.pth"
    plain.write_bytes(b"abc")
    assert "carries no checksum" in check(str(plain))


def test_known_sources_carry_their_checksum_and_fit_the_recipes():
    for name, source in pretrained.WEIGHT_SOURCES.items():
        assert len(source.sha256_prefix) == 8, name
    recipes = pathlib.Path(__file__).resolve().parent.parent / "configs"
    assert f"./models/{pretrained.WEIGHT_SOURCES['resnet50'].filename}" in (recipes / "256_resnet50.yml").read_text()
    assert f"./models/{pretrained.WEIGHT_SOURCES['resnet50_ibn_a'].filename}" in (
        recipes / "320_resnet50_ibn_a.yml").read_text()


def test_command_line(source, capsys):
    data, models = source
    assert main(["--list"]) == 0
    listed = capsys.readouterr().out
    assert all(name in listed for name in pretrained.WEIGHT_SOURCES)
    assert main(["resnet18", "--dir", str(models)]) == 0
    assert main(["--check", str(models / "r18.pth")]) == 0  # the recipe name of the patched entry
    assert main(["no_such_net", "--dir", str(models)]) == 2
    assert "No ImageNet weights are known for 'no_such_net'" in capsys.readouterr().err


def test_training_with_missing_weights_stops_before_reading_data_and_says_how_to_fetch(tmp_path):
    from modelling.ctl_model import CTLModel
    from modelling.weights import WeightsError
    from config import load_config
    from utils.run import run

    opts = tiny_opts(str(tmp_path / "no_data_here"), str(tmp_path / "out"), **{
        "MODEL.NAME": "resnet50", "MODEL.BACKBONE_EMB_SIZE": "2048", "MODEL.PRETRAINED": "True",
        "MODEL.PRETRAIN_PATH": str(tmp_path / "models" / "resnet50-19c8e357.pth")})
    with pytest.raises(WeightsError, match=r"file not found: .*resnet50-19c8e357\.pth.*"
                                           r"python -m modelling\.pretrained resnet50 "):
        run(CTLModel, load_config(opts=opts))  # the data root does not exist: a DatasetError if read first
