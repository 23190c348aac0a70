"""fetch(): download from a real local HTTP server, MD5 check, atomic extraction."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import http.server
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from persona_gym.data import ChecksumError, fetch, load_dataset

FILES = {
    "ml-1m/users.dat": "1::F::1::10::48067\n2::M::56::16::70072\n",
    "ml-1m/movies.dat": "1::Toy Story (1995)::Animation|Children's|Comedy\n"
    "2::Big Lebowski, The (1998)::Comedy|Crime\n",
    "ml-1m/ratings.dat": "1::1::5::978300760\n1::2::3::978302109\n2::2::4::978301968\n",
}


@contextlib.contextmanager
def _serve(root: Path) -> Iterator[str]:
    """Serve the files of ``root`` on 127.0.0.1; yields the base URL."""

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Quiet, directory=str(root))
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture()
def served(tmp_path: Path) -> Iterator[tuple[str, str]]:
    """A fixture zip laid out like grouplens' ml-1m.zip, served on 127.0.0.1; (url, md5)."""
    root = tmp_path / "www"
    root.mkdir()
    archive = root / "ml-1m.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for name, text in FILES.items():
            zf.writestr(name, text.encode("latin-1"))
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    with _serve(root) as base:
        yield f"{base}/ml-1m.zip", md5


def test_fetch_ok_extracts_and_loads(served: tuple[str, str], tmp_path: Path) -> None:
    url, md5 = served
    dest = tmp_path / "data"
    folder = fetch("ml-1m", dest, url=url, md5=md5)
    assert folder == dest / "ml-1m"
    assert sorted(p.name for p in folder.iterdir()) == ["movies.dat", "ratings.dat", "users.dat"]
    assert [p.name for p in dest.iterdir()] == ["ml-1m"]  # no temp folders left behind
    ds = load_dataset("ml-1m", data_dir=dest)
    assert len(ds.ratings) == 3 and ds.item_titles()[2] == "The Big Lebowski"
    # an existing folder is reused without downloading again
    assert fetch("ml-1m", dest, url="http://127.0.0.1:9/unreachable.zip", md5=md5) == folder


def test_fetch_checksum_mismatch_leaves_nothing(served: tuple[str, str], tmp_path: Path) -> None:
    url, _ = served
    dest = tmp_path / "data"
    with pytest.raises(ChecksumError, match=r"checksum mismatch.*expected 0{32}"):
        fetch("ml-1m", dest, url=url, md5="0" * 32)
    assert list(dest.iterdir()) == []


def test_fetch_unknown_name_needs_url_and_md5(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown dataset"):
        fetch("ml-25m", tmp_path)


def test_fetch_unreachable_server(tmp_path: Path) -> None:
    with pytest.raises(OSError, match="could not download"):
        fetch("ml-1m", tmp_path, url="http://127.0.0.1:9/x.zip", md5="0" * 32, timeout=5)
    assert list(tmp_path.iterdir()) == []


def test_load_dataset_downloads_when_asked(
    served: tuple[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from persona_gym.data import download

    url, md5 = served
    monkeypatch.setitem(download.KNOWN_DATASETS, "ml-1m", download.RemoteDataset(url, md5))
    ds = load_dataset("ml-1m", data_dir=tmp_path / "data", download=True)
    assert ds.name == "ml-1m" and len(ds.users) == 2


def test_fetch_force_replaces_and_no_force_keeps(served: tuple[str, str], tmp_path: Path) -> None:
    url, md5 = served
    dest = tmp_path / "data"
    folder = fetch("ml-1m", dest, url=url, md5=md5)
    (folder / "ratings.dat").write_text("edited by hand\n")
    fetch("ml-1m", dest, url=url, md5=md5)  # kept: no download, the edit stays
    assert (folder / "ratings.dat").read_text() == "edited by hand\n"
    fetch("ml-1m", dest, url=url, md5=md5, force=True)  # replaced by the archive's copy
    assert (folder / "ratings.dat").read_text() == FILES["ml-1m/ratings.dat"]
    assert [p.name for p in dest.iterdir()] == ["ml-1m"]


def test_fetch_refuses_an_archive_that_writes_outside_its_folder(tmp_path: Path) -> None:
    root = tmp_path / "www"
    root.mkdir()
    archive = root / "ml-1m.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("ml-1m/ratings.dat", "1::1::5::1\n")
        zf.writestr("../../escaped.txt", "zip slip")
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    with _serve(root) as base, pytest.raises(ValueError):
        fetch("ml-1m", tmp_path / "data", url=f"{base}/ml-1m.zip", md5=md5)
    assert not list(tmp_path.rglob("escaped.txt"))
