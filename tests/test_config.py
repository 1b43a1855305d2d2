"""Configuration: defaults, TOML loading, validation with clear errors."""
from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

import pytest

from realplexor.config import Config, ConfigError, load_config, parse_address, validate


def test_defaults_need_no_file():
    config = load_config(None)
    assert config.WAIT_ADDR == ("127.0.0.1:8088",)
    assert config.IN_ADDR == ("127.0.0.1:10010",)
    assert (config.WAIT_TIMEOUT, config.WAIT_MAXLEN, config.IN_TIMEOUT, config.IN_MAXLEN) == (300, 5120, 20, 204800)
    assert (config.EVENT_CHAIN_LEN, config.OFFLINE_TIMEOUT, config.MAX_DATA_FOR_ID, config.CLEAN_ID_AFTER) == (1000, 30, 30, 3600)
    assert (config.IFRAME_ID, config.SCRIPT_ID, config.IDENTIFIER) == ("IFRAME", "SCRIPT", "identifier")
    assert (config.JS_MAX_BOUNCES, config.JS_WAIT_RECONNECT_DELAY, config.JS_WAIT_URI) == (10, 0.01, "/")
    for path in (config.USERS_FILE, config.IFRAME_FILE, config.SCRIPT_FILE):
        assert os.path.isfile(path), path
    assert open(config.USERS_FILE).read().strip() == ":"


def test_keys_are_case_insensitive_and_lists_accept_strings(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('wait_addr = "0.0.0.0:80, 127.0.0.1:81"\nWait_Timeout = 5\njs_debug = 1\n')
    config = load_config(str(path))
    assert config.WAIT_ADDR == ("0.0.0.0:80", "127.0.0.1:81")
    assert config.WAIT_TIMEOUT == 5.0 and config.JS_DEBUG is True


def test_a_list_option_takes_one_address_as_a_string(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('WAIT_ADDR = "0.0.0.0:8088"\nCORS_ORIGINS = "https://a.example"\n')
    config = load_config(str(path))
    assert config.WAIT_ADDR == ("0.0.0.0:8088",)
    assert config.CORS_ORIGINS == ("https://a.example",)


def test_an_unknown_option_far_from_any_gets_no_suggestion():
    with pytest.raises(ConfigError) as caught:
        validate({"COLOUR": "blue"})
    assert str(caught.value) == "unknown option 'COLOUR'"


def test_relative_files_are_relative_to_the_config_file(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('users_file = "users"\n')
    assert load_config(str(path)).USERS_FILE == str(tmp_path / "users")


@pytest.mark.parametrize("raw, message", [
    ({"NO_SUCH": 1}, "unknown option 'NO_SUCH'"),
    ({"wait_timout": 1}, "unknown option 'wait_timout'; did you mean WAIT_TIMEOUT?"),
    ({"in_adr": []}, "did you mean IN_ADDR?"),
    ({"wait_timeout": "soon"}, "WAIT_TIMEOUT must be a number"),
    ({"WAIT_MAXLEN": 1.5}, "WAIT_MAXLEN must be a whole number"),
    ({"JS_DEBUG": "yes"}, "JS_DEBUG must be true or false"),
    ({"WAIT_ADDR": []}, "WAIT_ADDR must be a non-empty list"),
    ({"IN_ADDR": ["localhost"]}, "IN_ADDR: 'localhost' is not host:port"),
    ({"IN_ADDR": ["1.2.3.4:99999"]}, "IN_ADDR"),
    ({"MAX_DATA_FOR_ID": 0}, "MAX_DATA_FOR_ID must be at least 1"),
    ({"MAX_MEM_MB": 63}, "MAX_MEM_MB must be 0 (off) or at least 64, not 63"),
    ({"VERBOSITY": 4}, "VERBOSITY must be 0..3"),
    ({"IDENTIFIER": "a b"}, "IDENTIFIER must be a word"),
    ({"CHARSET": "klingon"}, "unknown charset"),
    ({"CHARSET": 5}, "CHARSET must be a string"),
    ({"JS_WAIT_URI": '/a"b'}, "JS_WAIT_URI must be a URI path"),
])
def test_validation_errors_name_the_key(raw, message):
    with pytest.raises(ConfigError) as caught:
        validate(raw)
    assert message in str(caught.value)


def test_unreadable_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(str(tmp_path / "missing.toml"))
    bad = tmp_path / "bad.toml"
    bad.write_text("wait_addr = [\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(str(bad))


def test_parse_address():
    assert parse_address("127.0.0.1:8088") == ("127.0.0.1", 8088)
    assert parse_address(":8088") == ("0.0.0.0", 8088)
    assert parse_address("[::1]:8088") == ("::1", 8088)


def test_substitutions_render_every_option():
    values = Config().substitutions()
    assert values["WAIT_TIMEOUT"] == "300" and values["JS_DEBUG"] == "false"
    assert values["JS_WAIT_RECONNECT_DELAY"] == "0.01" and values["WAIT_ADDR"] == "127.0.0.1:8088"


EXAMPLE = Path(__file__).resolve().parent.parent / "contrib" / "realplexor.toml"
# Their defaults are files inside the installed package, so the example
# names them in comments only: an uncommented line would need the file.
PACKAGED_FILE_OPTIONS = {"USERS_FILE", "IFRAME_FILE", "SCRIPT_FILE"}


def test_example_file_names_every_option_with_its_default():
    lines = EXAMPLE.read_text().splitlines()
    set_here = {m.group(1) for m in map(re.compile(r"([A-Z_]+) = ").match, lines) if m}
    commented = {m.group(1) for m in map(re.compile(r"# ([A-Z_]+) = ").match, lines) if m}
    names = {f.name for f in dataclasses.fields(Config)}
    assert set_here == names - PACKAGED_FILE_OPTIONS
    assert commented == PACKAGED_FILE_OPTIONS
    for number, line in enumerate(lines):
        if re.match(r"(# )?[A-Z_]+ = ", line):
            assert lines[number - 1].startswith("# ") and not re.match(r"# [A-Z_]+ = ", lines[number - 1]), line
    assert load_config(str(EXAMPLE)) == Config()


def test_max_mem_mb_is_off_or_above_an_idle_server():
    assert validate({"MAX_MEM_MB": 0}).MAX_MEM_MB == 0
    assert validate({"MAX_MEM_MB": 64}).MAX_MEM_MB == 64
