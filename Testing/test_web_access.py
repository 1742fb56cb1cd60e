"""Who may reach the browser editor: loopback by default, another host only with a token, the
token checked on the page and on the websocket, files only from inside --data-root."""
from __future__ import annotations

import os
import subprocess
import sys
import urllib.error
import urllib.request

import pytest

from web_fixtures import DEMO_BUNDLE, ROOT, TOKEN, WebServer, browser, open_page  # noqa: F401



def cli(*args):
    env = {"PYTHONPATH": f"{ROOT / 'GEM3DCore'}:{ROOT / 'GEM3DEditor'}:{ROOT / 'GEM3DWeb'}", "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, "-m", "gem3d_web", "--bundle", str(DEMO_BUNDLE), *args],
                          capture_output=True, text=True, timeout=60, env=env)


def test_another_host_without_a_token_is_refused_at_start(tmp_path):
    result = cli("--host", "0.0.0.0")
    assert result.returncode == 2 and "--token-file" in result.stderr and "Traceback" not in result.stderr
    short = tmp_path / "token"
    short.write_text("abc")
    result = cli("--host", "0.0.0.0", "--token-file", str(short))
    assert result.returncode == 2 and "at least 16 characters" in result.stderr


def test_paths_stay_inside_the_data_root(tmp_path):
    from gem3d_web.access import confined

    root = tmp_path / "data"
    root.mkdir()
    (root / "scan.nrrd").write_bytes(b"x")
    (tmp_path / "secret.nrrd").write_bytes(b"x")
    (root / "link.nrrd").symlink_to(tmp_path / "secret.nrrd")
    assert confined(root.resolve(), "scan.nrrd") == str((root / "scan.nrrd").resolve())
    for outside in ("../secret.nrrd", "link.nrrd", str(tmp_path / "secret.nrrd"), "missing.nrrd"):
        with pytest.raises(ValueError, match="not in the data folder"):
            confined(root.resolve(), outside)
    with pytest.raises(ValueError, match="without --data-root"):
        confined(None, "scan.nrrd")
    (root / "escape.nhdr").write_text("NRRD0004\ntype: uchar\ndimension: 3\nsizes: 2 2 2\nencoding: raw\n"
                                      "data file: ../secret.nrrd\n\n")  # its voxels lie outside the root
    with pytest.raises(ValueError, match="not in the data folder"):
        confined(root.resolve(), "escape.nhdr")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    server = WebServer(tmp_path_factory.mktemp("web_access"))
    yield server
    server.stop()


def status_of(url, headers=None):
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=30) as response:
            return response.status, response.read().decode(errors="replace"), response.headers
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace"), e.headers


def test_the_page_and_the_websocket_need_the_token(server):
    websocket = {"Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13",
                 "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}
    for url, headers in ((server.base, {}), (server.base + "index.html?token=wrong-token-0123456789", {}),
                         (server.base + "ws", websocket),
                         (server.base + "ws", {**websocket, "Cookie": "gem3d_web_token=wrong-token-0123456789"})):
        code, text, _ = status_of(url, headers)
        assert code == 403 and "access token" in text, (url, code)
    code, text, headers = status_of(server.base + f"index.html?token={TOKEN}")
    assert code == 200 and "gem3d_web_token" in headers.get("Set-Cookie", "")


def test_a_browser_with_the_token_gets_the_editor_and_one_without_gets_a_sentence(browser, server):  # noqa: F811
    page = browser.new_page()
    page.goto(server.base)
    assert "access token" in page.inner_text("body")
    page.close()
    page = open_page(browser, server.url)  # the page loads and its websocket connects (the Sample button is drawn)
    assert page.is_enabled("#sample")
    page.close()


@pytest.mark.parametrize("entries, needle", [
    ({"/etc/x.dcm": b"x"}, "outside its folder"), ({"a/../../x.dcm": b"x"}, "outside its folder"),
    ({"link.dcm": None}, "a link"), ({f"{i}.dcm": b"" for i in range(4001)}, "4001 files"),
    ({"big.dcm": b"\0" * 9000}, "unpacks to"),
])
def test_an_unsafe_zip_is_refused_before_anything_is_extracted(tmp_path, entries, needle):
    import zipfile

    from gem3d_web import uploads

    archive = tmp_path / "upload.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as z:
        for name, content in entries.items():
            if content is None:  # a symbolic link, as `zip -y` stores one
                info = zipfile.ZipInfo(name)
                info.external_attr = (0o120777 << 16)
                z.writestr(info, "/etc/passwd")
            else:
                z.writestr(name, content)
    with pytest.raises(ValueError, match=needle) as refused:
        uploads.dicom_zip_to_nrrd(str(archive), str(tmp_path / "dicom"), max_unpacked=8000)
    assert str(refused.value).count(": ") == 1 and not (tmp_path / "dicom").exists()


@pytest.mark.parametrize("name, header", [
    ("scan.nrrd", "NRRD0004\ntype: uchar\ndimension: 3\nsizes: 2 2 2\nencoding: raw\ndata file: {secret}\n\n"),
    ("scan.mha", "ObjectType = Image\nNDims = 3\nDimSize = 2 2 2\nElementType = MET_UCHAR\nElementDataFile = {secret}\n"),
])
def test_an_upload_whose_header_names_a_server_file_is_refused(tmp_path, name, header):
    from gem3d_web import uploads

    secret = tmp_path / "secret.raw"
    secret.write_bytes(bytes(range(8)))
    folder = tmp_path / "session"
    folder.mkdir()
    content = header.format(secret=secret).encode()
    with pytest.raises(ValueError, match="detached data file") as refused:
        uploads.save([{"name": name, "content": content, "size": len(content)}], str(folder), max_bytes=10**6)
    assert str(secret) not in str(refused.value) and os.listdir(folder) == []
