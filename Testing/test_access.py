"""One access rule for both servers (gem3d.access): `gem3d serve` and `gem3d-web` read, check and
compare their tokens the same way."""
from __future__ import annotations

import pytest
from click.testing import CliRunner

from gem3d.access import MIN_TOKEN_LENGTH, is_loopback, read_token, token_matches
from gem3d.cli import main


@pytest.mark.parametrize("host, loopback", [("127.0.0.1", True), ("localhost", True), ("::1", True),
                                            ("127.0.0.2", True), ("0.0.0.0", False), ("10.1.2.3", False),
                                            ("example.org", False), ("", False)])
def test_loopback_hosts(host, loopback):
    assert is_loopback(host) is loopback


def test_a_token_is_one_long_word_and_compared_whole(tmp_path):
    good = tmp_path / "good"
    good.write_text("  " + "k" * MIN_TOKEN_LENGTH + "\n")
    assert read_token(str(good)) == "k" * MIN_TOKEN_LENGTH
    for name, text in (("short", "k" * (MIN_TOKEN_LENGTH - 1)), ("two_words", "abcdefghij klmnopqrstu"),
                       ("empty", "")):
        (tmp_path / name).write_text(text)
        with pytest.raises(ValueError, match=f"one word of at least {MIN_TOKEN_LENGTH} characters"):
            read_token(str(tmp_path / name))
    with pytest.raises(ValueError, match="does not exist"):
        read_token(str(tmp_path / "missing"))
    token = "k" * MIN_TOKEN_LENGTH
    assert token_matches(token, token)
    assert not any(token_matches(given, token) for given in ("", token[:-1], token + "k", token.upper()))


def test_gem3d_serve_refuses_the_tokens_the_browser_editor_refuses(tmp_path):
    """A token with a space was accepted by `gem3d serve` and refused by `gem3d-web` (two rules)."""
    (tmp_path / "token").write_text("abcdefghij klmnopqrstu\n")
    result = CliRunner().invoke(main, ["serve", "--host", "0.0.0.0", "--token-file", str(tmp_path / "token")])
    assert result.exit_code == 1 and "one word of at least 16 characters" in result.output
    assert "Traceback" not in result.output
