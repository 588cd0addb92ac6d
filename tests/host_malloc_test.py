"""runtime.host_malloc: when the programs restart themselves with glibc's huge-page tunable."""

import os
import subprocess
import sys

from diffusion_jax.runtime import host_malloc

MADVISE = "always [madvise] never\n"


def test_wanted_only_with_glibc_235_and_madvise_thp_and_no_tunable_yet():
    glibc = ("glibc", "2.36")
    assert host_malloc.wanted({}, glibc, MADVISE)
    assert not host_malloc.wanted({}, glibc, "[always] madvise never\n")  # every mapping gets them already
    assert not host_malloc.wanted({}, glibc, "always madvise [never]\n")
    assert not host_malloc.wanted({}, ("glibc", "2.31"), MADVISE)  # no hugetlb tunable before 2.35
    assert not host_malloc.wanted({}, ("", ""), MADVISE)  # musl, macOS
    assert not host_malloc.wanted({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, glibc, MADVISE)  # user's choice
    assert not host_malloc.wanted({host_malloc.OPT_OUT: "1"}, glibc, MADVISE)


def test_environment_appends_to_existing_tunables():
    env = host_malloc.environment({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2", "X": "1"})
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
    assert env["X"] == "1"
    assert host_malloc.environment({})["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"


def test_reexec_restarts_the_same_command_line(monkeypatch):
    calls = []
    monkeypatch.setattr(host_malloc, "wanted", lambda: True)
    monkeypatch.setattr(sys, "orig_argv", ["python", "-u", "train.py", "--workdir=w"])
    host_malloc.reexec(execve=lambda *a: calls.append(a))
    (exe, argv, env), = calls
    assert exe == sys.executable and argv == [sys.executable, "-u", "train.py", "--workdir=w"]
    assert "glibc.malloc.hugetlb=1" in env["GLIBC_TUNABLES"]
    monkeypatch.setattr(sys, "orig_argv", ["python", "-c", "pass"])  # nothing to restart
    host_malloc.reexec(execve=lambda *a: calls.append(a))
    assert len(calls) == 1


def test_a_program_restarted_once_sees_the_tunable(tmp_path):
    script = tmp_path / "prog.py"
    script.write_text("import os\nfrom diffusion_jax.runtime import host_malloc\n"
                      "host_malloc.reexec()\nprint(os.environ.get('GLIBC_TUNABLES', ''), os.getpid())\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    env.pop("GLIBC_TUNABLES", None)
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, check=True,
                         env=env).stdout.split()
    if host_malloc.wanted(env):
        assert out[0] == "glibc.malloc.hugetlb=1"  # restarted exactly once (the tunable stops a second)
    else:
        assert not out or "hugetlb" not in out[0]
