"""Bundle helpers: builders, validation (each bad entry against a real git server on loopback),
the doctor check's fetch, airflow.cfg editing, and the CLI as a real ``airflow`` process without DB."""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from git_server import SSHD, GitServer, GitSshServer
from localplane import AIRFLOW, NO_DB, wait_for

from airflow_remote_execution.agent import bundles
from airflow_remote_execution.cli import bundles_commands

TOKEN = ("git", "s3cret-token")
GOOD_CONN = json.dumps({"conn_type": "git", "login": TOKEN[0], "password": TOKEN[1]})
WRONG_CONN = json.dumps({"conn_type": "git", "login": TOKEN[0], "password": "wrong-token"})
DAG = "from airflow.sdk import dag\n"


@pytest.fixture(scope="module")
def git_repo():
    with GitServer(auth=TOKEN) as server:
        repo = server.create_repo("dags")
        repo.commit({"dags/hello.py": DAG, "README": "x"}, "first")
        repo.tag("v1")
        repo.commit({"other.txt": "y"}, "on a branch", branch="release")
        yield repo


@pytest.fixture
def conns(monkeypatch):
    monkeypatch.setenv("AIRFLOW_CONN_GIT_GOOD", GOOD_CONN)
    monkeypatch.setenv("AIRFLOW_CONN_GIT_WRONG", WRONG_CONN)
    monkeypatch.setenv("AIRFLOW_CONN_GIT_HOSTED", json.dumps({**json.loads(GOOD_CONN), "host": "PLACEHOLDER"}))
    monkeypatch.setenv("AIRFLOW_CONN_GIT_NOHOST", json.dumps({"conn_type": "git", "password": "x"}))


def problems_of(entry: dict, **kw) -> list[str]:
    return [p.message for p in bundles.validate([entry], **kw)]


# ------------------------------------------------------------------------------------------ builders


def test_git_bundle_builds_the_entry_airflow_reads():
    entry = bundles.git_bundle(
        "team-a", "https://git.example.com/a.git", conn_id="git_a", subdir="dags", tracking_ref="prod",
        refresh_interval=60,
    )
    assert entry == {
        "name": "team-a",
        "classpath": "airflow.providers.git.bundles.git.GitDagBundle",
        "kwargs": {
            "tracking_ref": "prod", "repo_url": "https://git.example.com/a.git", "git_conn_id": "git_a",
            "subdir": "dags", "refresh_interval": 60,
        },
    }
    assert bundles.git_bundle("b", conn_id="git_b")["kwargs"] == {"tracking_ref": "main", "git_conn_id": "git_b"}
    # Airflow's own parser takes it (and so does validate, offline).
    from airflow.dag_processing.bundles.manager import _parse_bundle_config

    assert _parse_bundle_config([entry])[0].name == "team-a"
    assert bundles.validate([entry], remote=False) == [
        bundles.Problem("team-a", "connection 'git_a' not found in the environment or the secrets backend (the agent "
                        "has no metadata DB): set AIRFLOW_CONN_GIT_A or add it to the secrets backend")
    ]


def test_local_bundle(tmp_path):
    assert bundles.local_bundle("here", tmp_path, refresh_interval=0) == {
        "name": "here",
        "classpath": "airflow.dag_processing.bundles.local.LocalDagBundle",
        "kwargs": {"path": str(tmp_path), "refresh_interval": 0},
    }
    assert bundles.validate([bundles.local_bundle("here", tmp_path)]) == []


@pytest.mark.parametrize(
    ("call", "error"),
    [
        (lambda: bundles.git_bundle("x"), "give repo_url, or conn_id"),
        (lambda: bundles.git_bundle("x", "https://u:tok@h/r.git"), "repo_url carries a password/token"),
        (lambda: bundles.git_bundle("x", "https://h/r.git", subdir="/abs"), "relative to the repository root"),
        (lambda: bundles.git_bundle("x", "https://h/r.git", subdir="../up"), "without '..'"),
        (lambda: bundles.git_bundle("x", "https://h/r.git", tracking_ref=""), "tracking_ref must be"),
        (lambda: bundles.git_bundle("x", "https://h/r.git", refresh_interval=-1), "refresh_interval must be"),
        (lambda: bundles.git_bundle("a/b", "https://h/r.git"), "directory name"),
        (lambda: bundles.git_bundle("example_dags", "https://h/r.git"), "reserved"),
        (lambda: bundles.local_bundle("", "/tmp"), "non-empty"),
    ],
)
def test_builders_refuse_bad_input(call, error):
    with pytest.raises(bundles.BundleConfigError, match=error.replace("(", r"\(")):
        call()


# ------------------------------------------------------------------------------------------ validation, offline


def test_each_structural_problem_is_reported_with_what_to_fix(tmp_path, monkeypatch):
    git = bundles.GIT_BUNDLE
    entries = [
        {"name": "keys", "classpath": git, "kwargs": {"tracking_ref": "main", "repo_url": "https://h/r.git"}, "ref": 1},
        {"name": "typo", "classpath": git, "kwargs": {"trackingref": "main", "repo_url": "https://h/r.git"}},
        {"name": "types", "classpath": git, "kwargs": {"tracking_ref": "main", "repo_url": "h", "refresh_interval": "5"}},
        {"name": "managed", "classpath": git, "kwargs": {"tracking_ref": "main", "repo_url": "h", "version": "abc"}},
        {"name": "cls", "classpath": "airflow.providers.nope.bundles.Nope", "kwargs": {}},
        {"name": "notbundle", "classpath": "pathlib.Path", "kwargs": {}},
        {"name": "nocls", "kwargs": {}},
        {"name": "kw", "classpath": git, "kwargs": ["tracking_ref"]},
        "a string",
        bundles.local_bundle("missing-dir", tmp_path / "nope"),
        bundles.local_bundle("missing-dir", tmp_path),
        {"name": "creds", "classpath": git, "kwargs": {"tracking_ref": "main", "repo_url": "https://u:t@h/r.git"}},
        {"name": "team", "classpath": bundles.LOCAL_BUNDLE, "kwargs": {"path": str(tmp_path)}, "team_name": "a"},
        {"name": "dags-folder", "classpath": bundles.LOCAL_BUNDLE, "kwargs": {}},
        {"name": "nokw", "classpath": bundles.LOCAL_BUNDLE},
    ]
    from airflow import settings

    dags_folder = tmp_path / "no-dags"
    monkeypatch.setattr(settings, "DAGS_FOLDER", str(dags_folder))
    got = [str(p) for p in bundles.validate(entries, remote=False)]
    assert got == [
        "keys: unknown key(s) ref: an entry has only name, classpath, kwargs, team_name (bundle options go inside "
        "kwargs)",
        "typo: unknown kwargs.trackingref for GitDagBundle: did you mean 'tracking_ref'? it accepts git_conn_id, "
        "prune_dotgit_folder, refresh_interval, repo_url, sparse_dirs, subdir, submodules, tracking_ref, "
        "view_url_template",
        "typo: kwargs.tracking_ref is required by GitDagBundle",
        "types: kwargs.refresh_interval='5' has the wrong type: expected int",
        "managed: kwargs.version is set by Airflow itself; remove it from kwargs",
        "cls: unknown classpath 'airflow.providers.nope.bundles.Nope': No module named 'airflow.providers.nope'",
        "notbundle: classpath 'pathlib.Path' is not a dag bundle class (a subclass of BaseDagBundle)",
        "nocls: classpath is missing: e.g. airflow.providers.git.bundles.git.GitDagBundle or "
        "airflow.dag_processing.bundles.local.LocalDagBundle",
        "kw: kwargs must be a JSON object of the bundle class's arguments",
        "#8: each entry must be a JSON object with name, classpath and kwargs, not str",
        f"missing-dir: kwargs.path '{tmp_path / 'nope'}' is not a directory here: create it or fix the path",
        "missing-dir: the name is used by an earlier entry too; bundle names must be unique",
        "creds: repo_url carries a password/token: move it into the password of the git connection",
        "team: team_name needs [core] multi_team = True; remove it or enable multi-team",
        f"dags-folder: no kwargs.path, so [core] dags_folder '{dags_folder}' is used, and it is not a directory here: "
        "create it, set kwargs.path, or remove this bundle",
        'nokw: kwargs is missing: Airflow requires it, "kwargs": {} when the bundle needs none',
    ]


def test_connections_come_from_env_or_secrets_backend_never_the_db(tmp_path, monkeypatch, conns):
    entry = bundles.git_bundle("b", "https://h/r.git", conn_id="git_in_file")
    assert "connection 'git_in_file' not found" in problems_of(entry, remote=False)[0]
    # A real secrets backend (Airflow's local-filesystem one) is consulted like on the agent.
    from airflow.sdk.configuration import clear_secrets_backends_cache

    (tmp_path / "conns.json").write_text(json.dumps({"git_in_file": {"conn_type": "git", "host": "https://h/r.git"}}))
    monkeypatch.setenv("AIRFLOW__SECRETS__BACKEND", "airflow.secrets.local_filesystem.LocalFilesystemBackend")
    monkeypatch.setenv("AIRFLOW__SECRETS__BACKEND_KWARGS", json.dumps({"connections_file_path": str(tmp_path / "conns.json")}))
    clear_secrets_backends_cache()
    try:
        assert problems_of(entry, remote=False) == []
        assert problems_of(bundles.git_bundle("c", conn_id="git_in_file"), remote=False) == []
    finally:
        monkeypatch.delenv("AIRFLOW__SECRETS__BACKEND")
        clear_secrets_backends_cache()
    # No repo_url: the connection's host must hold it.
    assert problems_of(bundles.git_bundle("d", conn_id="git_nohost"), remote=False) == [
        "connection 'git_nohost' has no host: put the repository URL there or set repo_url"
    ]
    assert problems_of({"name": "e", "classpath": bundles.GIT_BUNDLE, "kwargs": {"tracking_ref": "main"}}) == [
        "no repo_url and no connection 'git_default': set kwargs.repo_url or kwargs.git_conn_id"
    ]


# ------------------------------------------------------------------------------------------ validation, remote


def test_valid_git_entries_against_the_real_server(git_repo, conns, monkeypatch):
    monkeypatch.setenv("AIRFLOW_CONN_GIT_HOSTED", json.dumps({**json.loads(GOOD_CONN), "host": git_repo.url}))
    entries = [
        bundles.git_bundle("token", git_repo.url, conn_id="git_good", subdir="dags"),
        bundles.git_bundle("host-from-conn", conn_id="git_hosted"),
        bundles.git_bundle("tag", git_repo.url, conn_id="git_good", tracking_ref="v1"),
        bundles.git_bundle("branch", git_repo.url, conn_id="git_good", tracking_ref="release"),
        bundles.git_bundle("sha", git_repo.url, conn_id="git_good", tracking_ref=git_repo.head()),
    ]
    assert bundles.validate(entries) == []
    assert ("GET", "/dags.git/info/refs", 200) in git_repo.server.requests


def test_each_remote_problem_against_the_real_server(git_repo, conns):
    url = git_repo.url
    cases = {
        "wrong-token": (bundles.git_bundle("x", url, conn_id="git_wrong"), "refused access with connection 'git_wrong'"),
        "anonymous": (bundles.git_bundle("x", url), "refused access with connection (none: anonymous)"),
        "no-conn": (bundles.git_bundle("x", url, conn_id="git_missing"), "connection 'git_missing' not found"),
        "no-repo": (bundles.git_bundle("x", url.replace("dags.git", "nope.git"), conn_id="git_good"), "does not exist"),
        "bad-ref": (bundles.git_bundle("x", url, conn_id="git_good", tracking_ref="mian"),
                    "tracking_ref 'mian' is not a branch or tag of the repository (branches: main, release)"),
        # Port 1: privileged, nothing listens there (a freed ephemeral port may be taken by another test's server).
        "down": (bundles.git_bundle("x", "http://127.0.0.1:1/r.git"), "cannot reach repository"),
    }
    for case, (entry, expected) in cases.items():
        got = problems_of(entry)
        assert len(got) == 1 and expected in got[0], (case, got)
        assert TOKEN[1] not in got[0] and "wrong-token" not in got[0]


def test_a_silent_repository_times_out(conns):
    with socket.socket() as listener:  # accepts connections, never answers
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/r.git"
        started = time.monotonic()
        got = problems_of(bundles.git_bundle("slow", url), timeout=2)
    assert got == [f"repository {url} did not answer within 2s"]
    assert time.monotonic() - started < 15


@pytest.mark.skipif(not SSHD, reason="sshd not installed (Debian: openssh-server)")
def test_ssh_key_connections_against_a_real_sshd(git_repo, monkeypatch):
    with GitSshServer(git_repo.server) as ssh:
        url = ssh.url(git_repo)
        pinned = {"strict_host_key_checking": "yes", "known_hosts_file": str(ssh.known_hosts)}
        for conn_id, extra in {
            "ssh_file": {"key_file": str(ssh.client_key), **pinned},
            "ssh_inline": {"private_key": ssh.client_key.read_text(), **pinned},
            "ssh_other": {"key_file": str(ssh.other_key), **pinned},
            "ssh_unpinned": {"key_file": str(ssh.client_key), "strict_host_key_checking": "yes",
                             "known_hosts_file": os.devnull},
        }.items():
            monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", json.dumps({"conn_type": "git", "extra": extra}))
        assert problems_of(bundles.git_bundle("k", url, conn_id="ssh_file")) == []
        assert problems_of(bundles.git_bundle("k", url, conn_id="ssh_inline", tracking_ref="release")) == []
        [refused] = problems_of(bundles.git_bundle("k", url, conn_id="ssh_other"))
        assert refused.startswith(f"repository {url} refused the SSH key of connection 'ssh_other': set key_file or")
        assert "Permission denied (publickey)" in refused
        [unknown_host] = problems_of(bundles.git_bundle("k", url, conn_id="ssh_unpinned"))
        assert "refused the SSH key of connection 'ssh_unpinned'" in unknown_host
        assert "Host key verification failed" in unknown_host
        [bad_ref] = problems_of(bundles.git_bundle("k", url, conn_id="ssh_file", tracking_ref="nope"))
        assert bad_ref.startswith("tracking_ref 'nope' is not a branch or tag")


# ------------------------------------------------------------------------------------------ fetch / doctor check


def test_doctor_check_fetches_each_bundle(git_repo, conns, tmp_path, monkeypatch):
    monkeypatch.setenv("AIRFLOW__DAG_PROCESSOR__DAG_BUNDLE_STORAGE_PATH", str(tmp_path / "storage"))
    good = [bundles.git_bundle("repo", git_repo.url, conn_id="git_good", subdir="dags"), bundles.local_bundle("l", tmp_path)]
    monkeypatch.setenv("AIRFLOW__DAG_PROCESSOR__DAG_BUNDLE_CONFIG_LIST", json.dumps(good))
    result = bundles.bundles_check()
    assert result.ok, result
    assert result.detail == f"repo @ {git_repo.head()[:12]}, l ({tmp_path})"
    assert (tmp_path / "storage" / "repo" / "tracking_repo" / "dags" / "hello.py").read_text() == DAG
    # A subdir that is not in the repository only shows once fetched.
    bad = [bundles.git_bundle("repo2", git_repo.url, conn_id="git_good", subdir="nope")]
    monkeypatch.setenv("AIRFLOW__DAG_PROCESSOR__DAG_BUNDLE_CONFIG_LIST", json.dumps(bad))
    result = bundles.bundles_check()
    assert not result.ok and "repo2: fetching failed" in result.detail and "does not exist after fetching" in result.detail
    monkeypatch.setenv("AIRFLOW__DAG_PROCESSOR__DAG_BUNDLE_CONFIG_LIST", json.dumps([{**good[0], "kwargs": {}}]))
    result = bundles.bundles_check()
    assert not result.ok and result.detail == "repo: kwargs.tracking_ref is required by GitDagBundle"
    assert "bundles validate" in result.hint
    monkeypatch.setenv("AIRFLOW__DAG_PROCESSOR__DAG_BUNDLE_CONFIG_LIST", "{not json")
    assert "is not valid JSON" in bundles.bundles_check().detail


def test_check_is_registered_for_the_doctor():
    from airflow_remote_execution.agent import checks

    assert "airflow_remote_execution.agent.bundles" in checks.CHECK_MODULES
    assert checks.CHECKS["bundles"] is bundles.bundles_check


def test_periodic_cleanup_stops_and_can_be_disabled(monkeypatch):
    calls = []
    monkeypatch.setattr(bundles, "remove_stale_versions", lambda: calls.append(time.monotonic()))
    monkeypatch.setenv("AIRFLOW__DAG_PROCESSOR__STALE_BUNDLE_CLEANUP_INTERVAL", "0")
    stop = threading.Event()
    bundles.remove_stale_versions_periodically(stop)  # returns at once: disabled
    assert calls == []
    monkeypatch.setenv("AIRFLOW__DAG_PROCESSOR__STALE_BUNDLE_CLEANUP_INTERVAL", "1")
    thread = threading.Thread(target=bundles.remove_stale_versions_periodically, args=(stop,))
    started = time.monotonic()
    thread.start()
    wait_for(lambda: len(calls) >= 2, 30, "two cleanups")
    stop.set()
    thread.join(5)
    assert not thread.is_alive()
    assert calls[0] - started >= 0.9 and calls[1] - calls[0] >= 0.9  # every interval, not at once


# ------------------------------------------------------------------------------------------ airflow.cfg editing


CFG = """\
[core]
# keep this comment
dags_folder = /d

[dag_processor]
refresh_interval = 7
dag_bundle_config_list = [
    {"name": "old", "classpath": "x", "kwargs": {}}
    ]
# trailing comment
stale_bundle_cleanup_interval = 10

[logging]
base_log_folder = /l
"""


def test_replace_option_keeps_the_rest_of_the_file():
    entries = [bundles.local_bundle("new", "/data/100%")]
    out = bundles_commands.replace_option(CFG, entries)
    assert out.replace(bundles_commands.render_option(entries), "").splitlines() == [
        line for line in CFG.splitlines() if line not in ("dag_bundle_config_list = [", '    {"name": "old", '
                                                          '"classpath": "x", "kwargs": {}}', "    ]")
    ]
    for text in (out, bundles_commands.replace_option("[dag_processor]\nrefresh_interval = 1\n", entries),
                 bundles_commands.replace_option("[core]\nx = 1", entries), bundles_commands.replace_option("", entries)):
        assert _airflow_reads(text) == entries


def _airflow_reads(text: str) -> list:
    """What Airflow's own config parser makes of the file (interpolation included)."""
    from airflow.configuration import AirflowConfigParser

    parser = AirflowConfigParser()
    parser.read_string(text)
    return json.loads(parser.get("dag_processor", "dag_bundle_config_list"))


def _args(**kw) -> argparse.Namespace:
    defaults = {"write": True, "skip_checks": False, "refresh_interval": None, "output": "json", "offline": False,
                "timeout": 10.0, "tracking_ref": "main", "subdir": None, "conn_id": None, "submodules": False,
                "repo_url": None}
    return argparse.Namespace(**{**defaults, **kw})


def test_add_and_remove_write_airflow_cfg(tmp_path, monkeypatch, capsys):
    cfg = tmp_path / "airflow.cfg"
    cfg.write_text("[core]\n# mine\nload_examples = False\n")
    monkeypatch.setattr(bundles_commands, "_config_path", lambda: cfg)
    bundles_commands.bundles_add_local(_args(name="local", path=str(tmp_path)))
    # Airflow's default bundle stays: adding one must not drop the dags folder silently.
    assert [e["name"] for e in _airflow_reads(cfg.read_text())] == ["dags-folder", "local"]
    assert cfg.read_text().startswith("[core]\n# mine\nload_examples = False\n")
    with pytest.raises(SystemExit, match="bundle 'local' is already in"):
        bundles_commands.bundles_add_local(_args(name="local", path=str(tmp_path)))
    with pytest.raises(SystemExit) as exc:  # checked before writing: nothing written
        bundles_commands.bundles_add_local(_args(name="gone", path=str(tmp_path / "gone")))
    assert exc.value.code == 1 and "is not a directory here" in capsys.readouterr().err
    bundles_commands.bundles_add_local(_args(name="gone", path=str(tmp_path / "gone"), skip_checks=True))
    bundles_commands.bundles_remove(_args(name="dags-folder"))
    assert [e["name"] for e in _airflow_reads(cfg.read_text())] == ["local", "gone"]
    with pytest.raises(SystemExit, match=r"no bundle 'nope' in .* \(bundles there: local, gone\)"):
        bundles_commands.bundles_remove(_args(name="nope"))
    capsys.readouterr()
    bundles_commands.bundles_add_git(_args(name="g", repo_url="https://h/r.git", write=False, skip_checks=True))
    assert json.loads(capsys.readouterr().out)["kwargs"] == {"tracking_ref": "main", "repo_url": "https://h/r.git"}


# ------------------------------------------------------------------------------------------ CLI, real process


@pytest.mark.e2e  # each `airflow` start costs ~6 s here: kept out of the quick loop
def test_cli_on_an_agent_without_metadata_db(git_repo, tmp_path):
    """``airflow remote-execution bundles ...`` as a process with a DB URL that cannot work."""
    home = tmp_path / "home"
    (home / "dags").mkdir(parents=True)  # for the default dags-folder bundle that --write keeps
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")},
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": NO_DB,
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW_CONN_GIT_GOOD": GOOD_CONN,
    }

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([AIRFLOW, "remote-execution", "bundles", *args], env=env, capture_output=True, text=True,
                              timeout=180)

    added = cli("add-git", "dags", "--repo-url", git_repo.url, "--conn-id", "git_good", "--subdir", "dags", "--write")
    assert added.returncode == 0, added.stderr
    assert cli("add-git", "bad", "--repo-url", git_repo.url, "--tracking-ref", "nope", "--conn-id", "git_good",
               "--skip-checks", "--write").returncode == 0
    validated = cli("validate")
    assert validated.returncode == 1, validated.stderr
    assert validated.stdout.strip().splitlines() == [
        "bad: tracking_ref 'nope' is not a branch or tag of the repository (branches: main, release)"
    ]


def test_list_and_validate_handlers(git_repo, conns, monkeypatch, capsys):
    entries = [bundles.git_bundle("dags", git_repo.url, conn_id="git_good", subdir="dags"),
               bundles.git_bundle("anon", git_repo.url, tracking_ref="release")]
    monkeypatch.setenv("AIRFLOW__DAG_PROCESSOR__DAG_BUNDLE_CONFIG_LIST", json.dumps(entries))
    bundles_commands.bundles_list(_args())
    listed = json.loads(capsys.readouterr().out)
    assert [(r["name"], r["class"], r["subdir"], r["conn_id"], r["tracking_ref"]) for r in listed] == [
        ("dags", "GitDagBundle", "dags", "git_good", "main"), ("anon", "GitDagBundle", "", "", "release")
    ]
    with pytest.raises(SystemExit) as exc:
        bundles_commands.bundles_validate(_args())
    assert exc.value.code == 1
    assert capsys.readouterr().out.splitlines() == [
        f"anon: repository {git_repo.url} refused access with connection (none: anonymous): for HTTPS put an access "
        "token in the connection's password (login: its user name); fatal: could not read Username for "
        f"'{git_repo.server.url}': terminal prompts disabled"
    ]
    bundles_commands.bundles_validate(_args(offline=True))
    assert capsys.readouterr().out == "2 bundle(s) OK (offline: repositories not contacted)\n"
    monkeypatch.setenv("AIRFLOW__DAG_PROCESSOR__DAG_BUNDLE_CONFIG_LIST", json.dumps(entries[:1]))
    bundles_commands.bundles_validate(_args())
    assert capsys.readouterr().out == "1 bundle(s) OK\n"


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
