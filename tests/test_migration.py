"""Old Perl configurations as TOML: every line loads, every left-out setting says why."""
from __future__ import annotations

import tomllib

import pytest

from realplexor.config import Config, ConfigError, validate
from realplexor.migration import convert

# The old daemon's main file as it shipped, in short.
OLD_MAIN = """\
%CONFIG = (
    SU_USER => "nobody",
    WAIT_TIMEOUT => 300,
    WAIT_MAXLEN => 1024 * 5,
    WAIT_ADDR => [ '0.0.0.0:8088', ],
    IN_ADDR => [ '127.0.0.1:10010' ],
    ID_BINDINGS_SERVERS => [ '127.0.0.1:11211' ],
    ID_BINDINGS_SERVER_NAME => "default",
    HOOK_CHECK_VISIBILITY => undef,
    USERS_FILE => "dklab_realplexor.htpasswd",
    IFRAME_FILE => "dklab_realplexor.html",
    SCRIPT_FILE => "/usr/lib/dklab_realplexor/dklab_realplexor.js",
    JS_DEBUG => 1,
    VERBOSITY => 3,
);
return 1;
"""


def converted(*texts: str) -> tuple[str, Config]:
    """The TOML for old files given as texts (named old1.conf, ...), and what it loads as."""
    toml = convert([(f"old{n}.conf", text) for n, text in enumerate(texts, 1)])
    return toml, validate(tomllib.loads(toml))


def comment_about(toml: str, name: str) -> str:
    lines = [line for line in toml.splitlines() if line.startswith(f"# {name} ")]
    assert len(lines) == 1, toml
    return lines[0]


def test_the_old_main_file_converts_and_loads():
    toml, config = converted(OLD_MAIN)
    assert config.SU_USER == "nobody"
    assert config.WAIT_MAXLEN == 5120 and config.WAIT_TIMEOUT == 300
    assert config.WAIT_ADDR == ("0.0.0.0:8088",) and config.IN_ADDR == ("127.0.0.1:10010",)
    assert config.JS_DEBUG is True and config.VERBOSITY == 3
    assert "JS_DEBUG = true\n" in toml and "WAIT_MAXLEN = 5120\n" in toml
    assert toml.startswith("# Realplexor configuration, converted by `realplexor convert-config`")


@pytest.mark.parametrize("name, says", [
    ("ID_BINDINGS_SERVERS", "= [\"127.0.0.1:11211\"] (old1.conf line 7): no equivalent here (the old daemon's "
                            "memcached online notifications; use ONLINE and WATCH on the IN line); left out"),
    ("ID_BINDINGS_SERVER_NAME", "(old1.conf line 8): no equivalent here"),
    ("HOOK_CHECK_VISIBILITY", "= undef (old1.conf line 9): no equivalent here (hooks are not supported"),
    ("IFRAME_FILE", "(old1.conf line 11): the old daemon's page, left out"),
    ("SCRIPT_FILE", "= \"/usr/lib/dklab_realplexor/dklab_realplexor.js\" (old1.conf line 12): "
                    "the old daemon's page, left out"),
])
def test_each_setting_left_out_is_one_comment_line(name, says):
    toml, config = converted(OLD_MAIN)
    assert says in comment_about(toml, name)
    assert getattr(config, name, None) == getattr(Config(), name, None)


def test_relative_users_file_is_kept_and_absolute_paths_need_no_note():
    toml, config = converted(OLD_MAIN, "$CONFIG{SCRIPT_FILE} = '/srv/rpl/custom.js';")
    assert config.USERS_FILE == "dklab_realplexor.htpasswd"
    assert comment_about(toml, "USERS_FILE") == (
        "# USERS_FILE (old1.conf line 10) was relative to the old daemon's own folder; here it is "
        "relative to this file's folder: copy the file here or make the path absolute")
    assert 'SCRIPT_FILE = "/srv/rpl/custom.js"\n' in toml
    assert not any(line.startswith("# SCRIPT_FILE") for line in toml.splitlines())


def test_override_files_apply_over_the_main_file():
    override = '$CONFIG{WAIT_ADDR} = [ "0.0.0.0:80" ];\n$CONFIG{SU_USER} = undef;\n$CONFIG{LOGGER} = "x";\n'
    toml, config = converted(OLD_MAIN, override)
    assert config.WAIT_ADDR == ("0.0.0.0:80",)
    assert config.SU_USER == ""
    assert comment_about(toml, "SU_USER").endswith('= undef (old2.conf line 2): the default stays ("")')
    assert comment_about(toml, "LOGGER") == '# LOGGER = "x" (old2.conf line 3): not an option here; left out'
    assert "#   old2.conf (over the files above)\n" in toml


def test_lower_case_names_were_ignored_by_the_old_daemon_and_are_left_out():
    toml, config = converted("$CONFIG{wait_timeout} = 5;")
    assert "the old daemon ignored it too: option names are upper case" in comment_about(toml, "wait_timeout")
    assert config.WAIT_TIMEOUT == 300


def test_every_option_converts():
    old = """%CONFIG = (
        WAIT_ADDR => ['127.0.0.1:1', '127.0.0.1:2'], WAIT_TIMEOUT => 25.5, WAIT_MAXLEN => 1e4,
        IN_ADDR => ['[::1]:3'], IN_TIMEOUT => 7, IN_MAXLEN => 0.5 * 4096, EVENT_CHAIN_LEN => 5,
        OFFLINE_TIMEOUT => 0, MAX_DATA_FOR_ID => 3, CLEAN_ID_AFTER => 60 * 60 * 2, CHARSET => 'koi8-r',
        USERS_FILE => '/etc/rpl/users', IFRAME_FILE => 'frame.html', IFRAME_ID => 'FRAME',
        SCRIPT_FILE => '/srv/script.js', SCRIPT_ID => 'JS', IDENTIFIER => 'ident',
        JS_MAX_BOUNCES => 3, JS_WAIT_RECONNECT_DELAY => 0.5, JS_WAIT_URI => '/rpl/', JS_DEBUG => 0,
        VERBOSITY => 2, MAX_MEM_MB => 512, SU_USER => 'www-data', CORS_ORIGINS => ['https://a.example'],
        WAIT_ENGINE => "lean",
    );"""
    toml, config = converted(old)
    assert config == Config(
        WAIT_ADDR=("127.0.0.1:1", "127.0.0.1:2"), WAIT_TIMEOUT=25.5, WAIT_MAXLEN=10000,
        IN_ADDR=("[::1]:3",), IN_TIMEOUT=7, IN_MAXLEN=2048, EVENT_CHAIN_LEN=5, OFFLINE_TIMEOUT=0,
        MAX_DATA_FOR_ID=3, CLEAN_ID_AFTER=7200, CHARSET="koi8-r", USERS_FILE="/etc/rpl/users",
        IFRAME_FILE="frame.html", IFRAME_ID="FRAME", SCRIPT_FILE="/srv/script.js", SCRIPT_ID="JS",
        IDENTIFIER="ident", JS_MAX_BOUNCES=3, JS_WAIT_RECONNECT_DELAY=0.5, JS_WAIT_URI="/rpl/",
        JS_DEBUG=False, VERBOSITY=2, MAX_MEM_MB=512, SU_USER="www-data",
        CORS_ORIGINS=("https://a.example",), WAIT_ENGINE="lean")
    assert "WAIT_MAXLEN = 10000\n" in toml and "IN_MAXLEN = 2048\n" in toml


def test_strings_that_need_escaping_in_toml_come_out_whole():
    toml, config = converted("""$CONFIG{SU_USER} = 'a"b\\\\c';\n$CONFIG{OTHER} = "x\\ty";\n""")
    assert config.SU_USER == 'a"b\\c'
    assert tomllib.loads(toml) == {"SU_USER": 'a"b\\c'}
    assert '# OTHER = "x\\u0009y"' in toml


@pytest.mark.parametrize("texts, message", [
    (["%CONFIG = (\n  WAIT_TIMEOUT => 'soon',\n);"],
     "old1.conf line 2: option WAIT_TIMEOUT must be a number, not 'soon'"),
    (["$CONFIG{WAIT_ADDR} = [ '0.0.0.0:8088' ];", "\n$CONFIG{IN_ADDR} = [ 'localhost' ];"],
     "old2.conf line 2: option IN_ADDR: 'localhost' is not host:port"),
    (["$CONFIG{WAIT_MAXLEN} = 1.5 * 1023;"], "old1.conf line 1: option WAIT_MAXLEN must be a whole number"),
    (["$CONFIG{VERBOSITY} = 4;"], "old1.conf line 1: option VERBOSITY must be 0..3"),
    (["$CONFIG{JS_DEBUG} = 'yes';"], "old1.conf line 1: option JS_DEBUG must be true or false"),
    ([OLD_MAIN, "\n\n$CONFIG{HOOK_CHECK_VISIBILITY} = sub { 1 };"], "old2.conf line 3: `sub` is Perl code"),
])
def test_refusals_name_the_file_and_line(texts, message):
    with pytest.raises(ConfigError) as caught:
        convert([(f"old{n}.conf", text) for n, text in enumerate(texts, 1)])
    assert str(caught.value).startswith(message)
